"""The one interface every transport implements, and how a transport is found by name.

A transport carries Raft messages between members, best effort: a message may be lost, duplicated or
delayed past later ones (the real transports keep each link in order, the simulator need not). Raft
needs nothing stronger. Transports are looked up
through the entry-point group ``graft_trio.transports``, so the core never imports one directly and a
third party can ship its own.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from importlib.metadata import entry_points
from typing import Any

from graft_trio.raft.messages import Message

ENTRY_POINT_GROUP = "graft_trio.transports"

MessageHandler = Callable[[Message], None]
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
