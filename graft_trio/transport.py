"""The one interface every transport implements, and how a transport is found by name.

A transport carries Raft messages between members, best effort: a message may be lost, duplicated or
delayed past later ones (the real transports keep each link in order, the simulator need not). Raft
needs nothing stronger. Transports are looked up
through the entry-point group ``graft_trio.transports``, so the core never imports one directly and a
third party can ship its own.

The network transports (``tcp``, ``websocket``) share their options, framing, handshake and queues; see
docs/TRANSPORTS.md. This module holds what a user configures them with: `TlsConfig`, and the base
`TransportError`.
"""

from __future__ import annotations

import abc
import os
import ssl
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:  # graft_trio.raft imports this module; importing it back at run time would be a cycle
    from graft_trio.raft.messages import Message

ENTRY_POINT_GROUP = "graft_trio.transports"

MessageHandler = Callable[["Message"], None]
"""Called by the transport with each message that arrives for the member. It must not block: the
member queues the message (or drops it when its queue is full, which Raft tolerates)."""


class Endpoint(abc.ABC):
    """One member's attachment to a transport: it sends to peers, and hands what arrives to the member's
    `MessageHandler`."""

    node_id: str
    address: str

    @abc.abstractmethod
    def send(self, target_id: str, target_address: str, message: Message) -> None:
        """Queue `message` for the peer; never blocks. A full per-peer queue drops the message."""

    def peer_address(self, node_id: str) -> str | None:
        """The address the transport learned for `node_id` (from a connection it accepted), if any.

        A member that joins an existing cluster knows no addresses until the leader contacts it; it
        replies to the leader through the address its transport learned.
        """
        return None


class Transport(abc.ABC):
    """A factory of endpoints. `open_endpoint` runs whatever background tasks the endpoint needs."""

    name: str = ""

    @abc.abstractmethod
    def open_endpoint(
        self, node_id: str, address: str, on_message: MessageHandler
    ) -> AbstractAsyncContextManager[Endpoint]:
        """Bind `address` and yield the endpoint; leaving the context closes it and its tasks."""


class UnknownTransportError(LookupError):
    pass


class TransportError(Exception):
    """A transport could not carry something: a connection broke, a peer sent bad bytes or failed to
    authenticate. Transports handle these themselves (Raft tolerates loss); they surface only in logs."""


StrPath = str | os.PathLike[str]


@attrs.frozen(eq=False)
class TlsConfig:
    """Mutual TLS for the network transports: every member is both a server and a client.

    `server_context` accepts connections and must require a client certificate; `client_context` dials
    peers and must verify the server's certificate (and, unless its ``check_hostname`` is turned off, that
    the certificate names the host of the peer's address, an IP address or a DNS name). Both usually
    present the member's own certificate and trust the cluster's CA.
    """

    server_context: ssl.SSLContext
    client_context: ssl.SSLContext

    def __attrs_post_init__(self) -> None:
        if self.server_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("TlsConfig.server_context must require client certificates (ssl.CERT_REQUIRED)")
        if self.client_context.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("TlsConfig.client_context must verify the server's certificate (ssl.CERT_REQUIRED)")

    @classmethod
    def from_files(cls, *, ca: StrPath, cert: StrPath, key: StrPath | None = None) -> TlsConfig:
        """Contexts that present `cert` (with `key`, or the key inside `cert`) and trust only `ca`."""
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_cert_chain(cert, key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        client.load_cert_chain(cert, key)
        return cls(server_context=server, client_context=client)


def available_transports() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_transport(transport: str | Transport, **options: Any) -> Transport:
    """A transport instance: `transport` itself, or the one registered under that name."""
    if isinstance(transport, Transport):
        return transport
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == transport:
            factory = ep.load()
            instance = factory(**options)
            if not isinstance(instance, Transport):
                raise TypeError(f"entry point {transport!r} did not build a Transport: {instance!r}")
            return instance
    raise UnknownTransportError(
        f"no transport named {transport!r}; installed: {', '.join(available_transports()) or 'none'}"
    )
