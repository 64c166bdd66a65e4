"""Frames, the unit the network transports carry, and the connection that sends and receives them.

`FramedConnection` is everything the shared link layer (`transports/_links.py`) needs of a transport: send
some frames in order, receive the next frame under a size limit, close. TCP implements it over a byte
stream with a 4-byte big-endian length before each frame (`StreamConnection`, built on the sans-I/O
`FrameDecoder`); a websocket transport maps one binary message to one frame.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Sequence

import trio

from graft_trio.transport import TransportError

FRAME_HEADER = struct.Struct(">I")
LARGEST_FRAME = 2**32 - 1  # what a 4-byte length can announce
READ_SIZE = 64 * 1024  # a read of the socket when no large frame is pending
LARGEST_READ = 1024 * 1024  # a read while a large frame is pending


class FrameError(TransportError):
    """The peer sent something this side does not accept: a frame over the limit, or bytes that are not
    a valid frame or message. The connection is closed."""


class ConnectionLostError(TransportError):
    """The connection was closed (by either side) or broke. `clean`: the peer closed it between frames."""

    def __init__(self, message: str, *, clean: bool = False) -> None:
        super().__init__(message)
        self.clean = clean


class FramedConnection(abc.ABC):
    """A connection that carries frames (byte strings) in order, in both directions.

    Methods raise `ConnectionLostError` when the connection is closed or broken, and `receive_frame`
    raises `FrameError` for anything that is not an acceptable frame. One task may send while another
    receives; two concurrent sends (or receives) are not supported.
    """

    peer: str
    """The remote end, for logs (for TCP, the socket's peer address)."""

    @abc.abstractmethod
    async def send_frames(self, frames: Sequence[bytes]) -> None:
        """Send `frames` in order, with as few writes as the transport allows (one for TCP)."""

    @abc.abstractmethod
    async def receive_frame(self, limit: int) -> bytes:
        """The next frame. A frame longer than `limit` raises `FrameError` before its body is read."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close at once, without waiting for the peer. Safe to call twice and under cancellation."""


def encode_frames(frames: Sequence[bytes]) -> bytes:
    """`frames` on a byte stream: each one after its 4-byte big-endian length."""
    parts: list[bytes] = []
    for frame in frames:
        parts.append(FRAME_HEADER.pack(len(frame)))
        parts.append(frame)
    return b"".join(parts)


class FrameDecoder:
    """Turns a byte stream back into frames, however the stream was cut into reads (sans-I/O).

    Bytes are appended with `feed` and frames taken with `next_frame`; consumed bytes are dropped at the
    next `feed`, so each read costs one copy of what is left of a partial frame, not of the whole buffer.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # where the next frame's header begins

    def feed(self, data: bytes | bytearray) -> None:
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next_frame(self, limit: int) -> bytes | None:
        """The next whole frame, or None until more bytes are fed. `FrameError` if the next frame's
        announced length exceeds `limit` (its body is never buffered)."""
        available = len(self._buffer) - self._start
        if available < FRAME_HEADER.size:
            return None
        (length,) = FRAME_HEADER.unpack_from(self._buffer, self._start)
        if length > limit:
            raise FrameError(f"frame of {length} bytes is over the limit of {limit}")
        if available < FRAME_HEADER.size + length:
            return None
        begin = self._start + FRAME_HEADER.size
        self._start = begin + length
        return bytes(self._buffer[begin : self._start])

    def read_size(self) -> int:
        """How much to ask the socket for: enough for the pending frame, within reason."""
        available = len(self._buffer) - self._start
        if available < FRAME_HEADER.size:
            return READ_SIZE
        (length,) = FRAME_HEADER.unpack_from(self._buffer, self._start)
        missing: int = FRAME_HEADER.size + length - available
        return min(max(READ_SIZE, missing), LARGEST_READ)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buffer) - self._start


_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class StreamConnection(FramedConnection):
    """Length-prefixed frames over a trio byte stream (a TCP `SocketStream` or an `SSLStream` on one).

    Frames queued together go out in one `send_all`; each read takes up to 64 KiB (more while a large
    frame is pending) and every whole frame in it is returned before the socket is read again.
    """

    def __init__(self, stream: trio.abc.Stream, peer: str) -> None:
        self._stream = stream
        self._decoder = FrameDecoder()
        self.peer = peer

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        try:
            await self._stream.send_all(encode_frames(frames))
        except _STREAM_ERRORS as exc:
            raise ConnectionLostError(describe(exc)) from exc

    async def receive_frame(self, limit: int) -> bytes:
        while True:
            frame = self._decoder.next_frame(limit)
            if frame is not None:
                return frame
            try:
                data = await self._stream.receive_some(self._decoder.read_size())
            except _STREAM_ERRORS as exc:
                raise ConnectionLostError(describe(exc)) from exc
            if not data:
                if self._decoder.buffered:
                    raise ConnectionLostError(f"closed by the peer in a frame ({self._decoder.buffered} bytes)")
                raise ConnectionLostError("closed by the peer", clean=True)
            self._decoder.feed(data)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


def describe(exc: BaseException) -> str:
    """An error for a log line, with the cause trio wraps (an `ssl.SSLError`, an `OSError`) spelled out."""
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text
