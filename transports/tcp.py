"""The TCP transport: the shared link layer (`transports/_links.py`) over TCP, with optional mutual TLS.

Addresses are ``host:port`` (``[v6]:port`` for IPv6). A member listens on its address; frames are
length-prefixed (`transports/_framing.py`). Options are those of `LinkOptions`, e.g.
``RaftNode(..., transport="tcp", transport_options={"cluster_secret": "..."})``.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio

from graft_trio.transport import TlsConfig, TransportError
from transports._framing import FramedConnection, StreamConnection
from transports._links import ConnectionHandler, LinkTransport


class AddressError(TransportError, ValueError):
    """An address that is not ``host:port``."""


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` as (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise AddressError(f"not a host:port address: {address!r}")
    port = int(port_text)
    if port > 65535:
        raise AddressError(f"port out of range in {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def socket_peer(stream: trio.SocketStream) -> str:
    """The remote address of a TCP stream, for logs."""
    try:
        name = stream.socket.getpeername()
    except OSError:
        return "unknown peer"
    return format_address(str(name[0]), int(name[1]))


async def dial(host: str, port: int, tls: TlsConfig | None) -> tuple[trio.SocketStream, trio.abc.Stream]:
    """A TCP stream to `host`:`port` with TCP_NODELAY, and the stream to talk over: the same one, or TLS
    over it with the handshake done. On failure nothing is left open; after success the caller owns the
    socket stream (closing it closes both)."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)  # trio's default; we rely on it
        if tls is None:
            return stream, stream
        ssl_stream = trio.SSLStream(stream, tls.client_context, server_hostname=host)
        await ssl_stream.do_handshake()
        return stream, ssl_stream
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


StreamHandler = Callable[[trio.abc.Stream, str], Awaitable[None]]
"""Called with each accepted stream (TLS-wrapped when configured) and the peer's address."""


async def serve_streams(
    address: str,
    tls: TlsConfig | None,
    on_stream: StreamHandler,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `address` and hand every accepted stream to `on_stream` in a task of its own, until
    cancelled; `task_status.started` gets the bound address (the real port when `address` asks for 0)."""
    host, port = parse_address(address)
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        # With port 0 each listener (one per address `host` resolves to) has a port of its own; the
        # member advertises the first. Use a numeric host with port 0.
        bound_port = int(listeners[0].socket.getsockname()[1])
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise

    async def accepted(stream: trio.SocketStream) -> None:
        wrapped: trio.abc.Stream = stream
        if tls is not None:
            # The TLS handshake runs on the first read, inside the handler's handshake timeout.
            wrapped = trio.SSLStream(stream, tls.server_context, server_side=True)
        await on_stream(wrapped, socket_peer(stream))

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, accepted, listeners)
        task_status.started(format_address(host, bound_port))


class TcpTransport(LinkTransport):
    """Members reach each other over TCP: one connection per direction per pair of members."""

    name = "tcp"

    async def connect(self, address: str) -> FramedConnection:
        host, port = parse_address(address)
        stream, wrapped = await dial(host, port, self.options.tls)
        return StreamConnection(wrapped, socket_peer(stream))

    async def serve(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def on_stream(stream: trio.abc.Stream, peer: str) -> None:
            await handler(StreamConnection(stream, peer))

        await serve_streams(address, self.options.tls, on_stream, task_status=task_status)
