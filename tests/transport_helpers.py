"""What the transport conformance tests need: one factory per transport, an inbox, certificates, ports.

A transport joins the conformance suite by adding its factory to `FACTORIES`; every test parametrized
over `ALL_TRANSPORTS` (or, for a network transport, `NETWORK_TRANSPORTS`) then runs against it.
"""

from __future__ import annotations

import abc
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import trio
import trio_websocket
import trustme
from wsproto import ConnectionType, WSConnection

from graft_trio.raft.messages import Heartbeat, Message
from graft_trio.transport import TlsConfig, Transport
from transports._framing import ConnectionLostError, FramedConnection, FrameDecoder, FrameError, encode_frames
from transports._links import LinkTransport
from transports.memory import MemoryNetwork, MemoryTransport
from transports.tcp import TcpTransport, format_address, parse_address
from transports.websocket import WEBSOCKET_PATH, WebsocketConnection, WebsocketTransport

# Fast reconnection and short timeouts, so that the real-network tests finish quickly.
TEST_LINK_OPTIONS: dict[str, Any] = {
    "backoff_initial": 0.01,
    "backoff_max": 0.1,
    "connect_timeout": 2.0,
    "handshake_timeout": 2.0,
}


class TransportFactory(abc.ABC):
    """Builds one kind of transport for a test. One factory per test (a memory factory is one network)."""

    name: ClassVar[str]
    network: ClassVar[bool]  # a real network transport: frames, handshakes, TLS, `LinkTransport`

    @abc.abstractmethod
    def make(self, **options: Any) -> Transport:
        """A transport with these options (the test defaults for the rest)."""

    @abc.abstractmethod
    def address(self) -> str:
        """A fresh address to bind (the endpoint's `address` then tells the bound one)."""

    @abc.abstractmethod
    async def accepts_connections(self, address: str) -> bool:
        """Whether something listens at `address`."""


class NetworkFactory(TransportFactory):
    """A network transport's factory: its transports are `LinkTransport`s (raw `connect`/`serve`)."""

    network = True

    @abc.abstractmethod
    def make(self, **options: Any) -> LinkTransport: ...


class MemoryFactory(TransportFactory):
    name = "memory"
    network = False

    def __init__(self) -> None:
        self.network_ = MemoryNetwork()
        self._count = 0

    def make(self, **options: Any) -> Transport:
        assert not options, "the memory transport takes no options"
        return MemoryTransport(self.network_)

    def address(self) -> str:
        self._count += 1
        return f"memory-{self._count}"

    async def accepts_connections(self, address: str) -> bool:
        return address in self.network_.endpoints


class TcpFactory(NetworkFactory):
    name = "tcp"

    def make(self, **options: Any) -> LinkTransport:
        return TcpTransport(**{**TEST_LINK_OPTIONS, **options})

    def address(self) -> str:
        return "127.0.0.1:0"

    async def accepts_connections(self, address: str) -> bool:
        host, port = parse_address(address)
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError:
            return False
        await stream.aclose()
        return True


class WebsocketFactory(TcpFactory):
    name = "websocket"

    def make(self, **options: Any) -> LinkTransport:
        return WebsocketTransport(**{**TEST_LINK_OPTIONS, **options})


FACTORIES: dict[str, Callable[[], TransportFactory]] = {
    "memory": MemoryFactory,
    "tcp": TcpFactory,
    "websocket": WebsocketFactory,
}
ALL_TRANSPORTS = list(FACTORIES)
NETWORK_TRANSPORTS = [name for name, factory in FACTORIES.items() if factory().network]


class Inbox:
    """A `MessageHandler` that keeps what arrives, and lets a test wait for it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = trio.Event()

    def __call__(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed = trio.Event()
            await self._changed.wait()

    async def wait_for_count(self, count: int) -> None:
        await self.wait_for(lambda: len(self.messages) >= count)

    def sequence_from(self, source: str) -> list[int]:
        """The sequence numbers (see `beat`) of the heartbeats from `source`, in arrival order."""
        return [m.commit for m in self.messages if isinstance(m, Heartbeat) and m.source == source]


def beat(source: str, target: str, sequence: int) -> Heartbeat:
    """A small message that carries a sequence number (in `commit`)."""
    return Heartbeat(source, target, term=1, commit=sequence)


def tls_config(ca: trustme.CA, *, trust: trustme.CA | None = None, client_cert: bool = True) -> TlsConfig:
    """A member's TLS: a certificate for 127.0.0.1 issued by `ca`, trusting `trust` (default: `ca`)."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    trusted = trust if trust is not None else ca
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.verify_mode = ssl.CERT_REQUIRED
    cert.configure_cert(server)
    trusted.configure_trust(server)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if client_cert:
        cert.configure_cert(client)
    trusted.configure_trust(client)
    return TlsConfig(server_context=server, client_context=client)


def free_tcp_addresses(count: int) -> list[str]:
    """`count` loopback addresses whose ports were free a moment ago (for members that must know each
    other's addresses before any of them binds)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of this trio run."""
    found: set[trio.lowlevel.Task] = set()
    pending = [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        found.add(task)
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return found


# --- websocket peers written independently of the transport -------------------------------------------------


class TrioWebsocketPeer(FramedConnection):
    """A member's side of a websocket connection as another implementation writes it: trio-websocket's
    (client or server), with frames after their length in binary messages (docs/TRANSPORTS.md). Open a
    client with `trio_websocket_peer`."""

    def __init__(self, websocket: trio_websocket.WebSocketConnection) -> None:
        self.websocket = websocket
        self.peer = "trio-websocket"
        self.messages_received = 0
        self._decoder = FrameDecoder()

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        try:
            await self.websocket.send_message(encode_frames(frames))
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionLostError(repr(exc)) from exc

    async def receive_frame(self, limit: int) -> bytes:
        while (frame := self._decoder.next_frame(limit)) is None:
            try:
                message = await self.websocket.get_message()
            except trio_websocket.ConnectionClosed as exc:
                raise ConnectionLostError(repr(exc)) from exc
            if isinstance(message, str):
                raise FrameError("a text message")
            self.messages_received += 1
            self._decoder.feed(message)
        return frame

    async def aclose(self) -> None:
        await self.websocket.aclose()


@asynccontextmanager
async def trio_websocket_peer(
    address: str, *, path: str = WEBSOCKET_PATH, tls: TlsConfig | None = None
) -> AsyncIterator[TrioWebsocketPeer]:
    """A trio-websocket client connected to ``ws://address/path`` (``wss://`` with `tls`)."""
    host, port = parse_address(address)
    use_ssl: bool | ssl.SSLContext = tls.client_context if tls is not None else False
    async with trio_websocket.open_websocket(host, port, path, use_ssl=use_ssl, disconnect_timeout=1) as websocket:
        yield TrioWebsocketPeer(websocket)


async def open_raw_websocket(address: str) -> tuple[trio.SocketStream, WSConnection, WebsocketConnection]:
    """A websocket to a member, upgraded and nothing more, with its socket and its wsproto state exposed so
    that a test can write whatever bytes it likes."""
    host, port = parse_address(address)
    stream = await trio.open_tcp_stream(host, port)
    protocol = WSConnection(ConnectionType.CLIENT)
    connection = WebsocketConnection(stream, "test", protocol)
    await connection.request_upgrade(format_address(host, port))
    return stream, protocol, connection
