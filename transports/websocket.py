"""The websocket transport: the shared link layer (`transports/_links.py`) over websockets, for members
reached through HTTP infrastructure, with optional mutual TLS (wss).

Addresses are ``host:port`` (``[v6]:port`` for IPv6), as on TCP. A member serves the websocket at
``ws://host:port/graft-raft``, or ``wss://host:port/graft-raft`` when the transport has `tls` (the same
`TlsConfig` as TCP, mutual authentication included): whether a peer is ws or wss follows the transport's
own configuration, and every member of a cluster is configured alike. Options are those of `LinkOptions`,
e.g. ``RaftNode(..., transport="websocket", transport_options={"cluster_secret": "..."})``.

Each websocket binary message carries one or more whole frames, each after its 4-byte big-endian length,
exactly as TCP writes them (`transports/_framing.py`): a writer sends everything queued for a peer as one
message (up to `MESSAGE_BYTES`, more messages beyond) and in one write. The receiver applies the frame
limit to each frame's length header, before its body is read, so a peer cannot make a member buffer more
than one frame under the limit, however large the websocket message it announces. A message that ends
inside a frame, a text message, and bytes that are not a valid websocket stream are malformed: they close
that connection like any other bad frame.

The websocket protocol itself (the HTTP upgrade, websocket frames, masking, pings) is wsproto's, the
sans-I/O library trio-websocket is built on, driven here over a trio stream the way `StreamConnection`
drives its `FrameDecoder`: no task of its own per connection, the frame limit set by each read, and a
close that does not wait for the peer, which the link layer needs (see docs/TRANSPORTS.md).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Sequence

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from transports._framing import (
    FRAME_HEADER,
    ConnectionLostError,
    FramedConnection,
    FrameDecoder,
    FrameError,
    describe,
    encode_frames,
)
from transports._handshake import HandshakeError
from transports._links import ConnectionHandler, LinkTransport
from transports.tcp import dial, format_address, parse_address, serve_streams, socket_peer

WEBSOCKET_PATH = "/graft-raft"
"""The one resource a member serves; a request for any other path is answered 404 and refused."""

MESSAGE_BYTES = 1024 * 1024
"""A writer packs queued frames into messages of at most this many bytes (a larger frame goes in a message
of its own); the receiver does not depend on it."""

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class WebsocketConnection(FramedConnection):
    """Frames in websocket binary messages over a trio stream (a TCP `SocketStream`, or an `SSLStream`).

    A client connection is opened by `WebsocketTransport.connect`, upgrade included. A server connection
    answers the client's upgrade request on its first `receive_frame`, so that the upgrade runs inside the
    caller's handshake timeout (a server connection receives before it sends: the listener's handshake
    does).
    """

    def __init__(self, stream: trio.abc.Stream, peer: str, protocol: WSConnection) -> None:
        self.peer = peer
        self._stream = stream
        self._protocol = protocol
        self._events: deque[Event] = deque()
        self._decoder = FrameDecoder()
        self._message_ended = True  # the bytes given to the decoder end where a websocket message ends
        self._received_anything = False
        self._send_lock = trio.Lock()  # a pong from the receiving task must not interleave with a write

    # --- opening ------------------------------------------------------------------------------------

    async def request_upgrade(self, host: str) -> None:
        """The client's side of the HTTP upgrade; `HandshakeError` if the server refuses it."""
        await self._send_bytes(self._protocol.send(Request(host=host, target=WEBSOCKET_PATH)))
        event = await self._next_event()
        if isinstance(event, RejectConnection):
            raise HandshakeError(f"the server refused the websocket upgrade to {WEBSOCKET_PATH}: "
                                 f"HTTP {event.status_code}")
        if not isinstance(event, AcceptConnection):
            raise HandshakeError(f"unexpected {type(event).__name__} in answer to the websocket upgrade")

    async def _accept_upgrade(self) -> None:
        """The server's side of the HTTP upgrade: accept a request for `WEBSOCKET_PATH`, refuse others."""
        event = await self._next_event()
        if not isinstance(event, Request):
            raise HandshakeError(f"unexpected {type(event).__name__} instead of a websocket upgrade request")
        if event.target != WEBSOCKET_PATH:
            with contextlib.suppress(ConnectionLostError):
                await self._send_bytes(self._protocol.send(RejectConnection(status_code=404)))
            raise HandshakeError(f"websocket request for {event.target!r}, not {WEBSOCKET_PATH!r}")
        await self._send_bytes(self._protocol.send(AcceptConnection()))

    # --- frames -------------------------------------------------------------------------------------

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        data: list[bytes] = []
        batch: list[bytes] = []
        batch_bytes = 0
        try:
            for frame in frames:
                if batch and batch_bytes + FRAME_HEADER.size + len(frame) > MESSAGE_BYTES:
                    data.append(self._protocol.send(BytesMessage(data=encode_frames(batch))))
                    batch, batch_bytes = [], 0
                batch.append(frame)
                batch_bytes += FRAME_HEADER.size + len(frame)
            if batch:
                data.append(self._protocol.send(BytesMessage(data=encode_frames(batch))))
        except LocalProtocolError as exc:  # the websocket is closing, or not open
            raise ConnectionLostError(f"websocket not open ({self._protocol.state.name})") from exc
        await self._send_bytes(b"".join(data))

    async def receive_frame(self, limit: int) -> bytes:
        if self._protocol.state is ConnectionState.CONNECTING and not self._protocol.client:
            await self._accept_upgrade()
        while True:
            frame = self._decoder.next_frame(limit)
            if frame is not None:
                return frame
            if self._message_ended and self._decoder.buffered:
                raise FrameError(f"a websocket message ended inside a frame ({self._decoder.buffered} bytes of it)")
            event = await self._next_event()
            if isinstance(event, BytesMessage):
                self._decoder.feed(event.data)
                self._message_ended = event.message_finished
            elif isinstance(event, Ping):
                await self._send_bytes(self._protocol.send(event.response()))
            elif isinstance(event, CloseConnection):
                if self._protocol.state is ConnectionState.OPEN:  # wsproto's own verdict on the peer's bytes
                    raise FrameError(f"invalid websocket data: {event.reason} (close code {event.code})")
                clean = self._message_ended and not self._decoder.buffered
                raise ConnectionLostError(f"closed by the peer (websocket close code {event.code})", clean=clean)
            elif isinstance(event, TextMessage):
                raise FrameError("a websocket text message (frames travel in binary messages)")
            elif not isinstance(event, Pong):
                raise FrameError(f"unexpected websocket event {type(event).__name__}")

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)

    # --- bytes --------------------------------------------------------------------------------------

    async def _next_event(self) -> Event:
        """The next websocket event, reading the stream as needed."""
        while not self._events:
            try:
                data = await self._stream.receive_some(self._decoder.read_size())
            except _STREAM_ERRORS as exc:
                raise ConnectionLostError(describe(exc)) from exc
            if not data:
                if self._protocol.state is ConnectionState.CONNECTING:  # a server's port probe is clean
                    raise ConnectionLostError("closed by the peer before the websocket upgrade",
                                              clean=not (self._protocol.client or self._received_anything))
                if self._decoder.buffered or not self._message_ended:
                    raise ConnectionLostError("closed by the peer in a websocket message")
                raise ConnectionLostError("closed by the peer", clean=True)
            self._received_anything = True
            try:
                self._protocol.receive_data(bytes(data))  # no copy when it is bytes already
            except RemoteProtocolError as exc:  # only while upgrading
                if self._protocol.client:
                    raise HandshakeError(f"not a websocket upgrade answer: {exc}") from exc
                if exc.event_hint is not None:  # the HTTP error to answer with
                    with contextlib.suppress(ConnectionLostError, LocalProtocolError):
                        await self._send_bytes(self._protocol.send(exc.event_hint))
                raise HandshakeError(f"not a websocket upgrade: {exc}") from exc
            self._events.extend(self._protocol.events())
        return self._events.popleft()

    async def _send_bytes(self, data: bytes) -> None:
        try:
            self._send_lock.acquire_nowait()  # the usual case, without a trip through the scheduler
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self._stream.send_all(data)
        except _STREAM_ERRORS as exc:
            raise ConnectionLostError(describe(exc)) from exc
        finally:
            self._send_lock.release()


class WebsocketTransport(LinkTransport):
    """Members reach each other over websockets: one connection per direction per pair of members, each
    a ``ws://`` (or, with `tls`, ``wss://``) connection to ``host:port/graft-raft``."""

    name = "websocket"

    async def connect(self, address: str) -> FramedConnection:
        host, port = parse_address(address)
        stream, wrapped = await dial(host, port, self.options.tls)
        try:
            connection = WebsocketConnection(wrapped, socket_peer(stream), WSConnection(ConnectionType.CLIENT))
            await connection.request_upgrade(format_address(host, port))
            return connection
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise

    async def serve(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def on_stream(stream: trio.abc.Stream, peer: str) -> None:
            await handler(WebsocketConnection(stream, peer, WSConnection(ConnectionType.SERVER)))

        await serve_streams(address, self.options.tls, on_stream, task_status=task_status)

