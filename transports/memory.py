"""The in-process transport: members of one trio run reach each other by address, any string.

A `MemoryNetwork` maps addresses to endpoints. The process has one default network, so that members built
with ``transport="memory"`` find each other with no setup; tests and the simulator pass their own. The
simulator subclasses `MemoryNetwork` and overrides `deliver` to add latency, loss and partitions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from graft_trio.raft.messages import Message
from graft_trio.transport import Endpoint, MessageHandler, Transport


class AddressInUseError(OSError):
    pass


class MemoryEndpoint(Endpoint):
    def __init__(self, network: MemoryNetwork, node_id: str, address: str, on_message: MessageHandler) -> None:
        self.network = network
        self.node_id = node_id
        self.address = address
        self._on_message = on_message
        self.closed = False

    def send(self, target_id: str, target_address: str, message: Message) -> None:
        if not self.closed:
            self.network.deliver(self, target_address, message)

    def put(self, message: Message) -> bool:
        """Hand a message to the member. False if the endpoint is closed."""
        if self.closed:
            return False
        self._on_message(message)
        return True

    def peer_address(self, node_id: str) -> str | None:
        return self.network.address_of(node_id)

    def close(self) -> None:
        self.closed = True


class MemoryNetwork:
    """Addresses to endpoints. `deliver` is the single place a message crosses from one member to another."""

    def __init__(self) -> None:
        self.endpoints: dict[str, MemoryEndpoint] = {}
        self.dropped = 0

    def attach(self, endpoint: MemoryEndpoint) -> None:
        if endpoint.address in self.endpoints:
            raise AddressInUseError(f"memory address {endpoint.address!r} is already bound")
        self.endpoints[endpoint.address] = endpoint

    def detach(self, endpoint: MemoryEndpoint) -> None:
        if self.endpoints.get(endpoint.address) is endpoint:
            del self.endpoints[endpoint.address]

    def address_of(self, node_id: str) -> str | None:
        for address, endpoint in self.endpoints.items():
            if endpoint.node_id == node_id:
                return address
        return None

    def deliver(self, source: MemoryEndpoint, target_address: str, message: Message) -> None:
        target = self.endpoints.get(target_address)
        if target is None:
            self.dropped += 1
            return
        target.put(message)


DEFAULT_NETWORK = MemoryNetwork()


class MemoryTransport(Transport):
    name = "memory"

    def __init__(self, network: MemoryNetwork | None = None) -> None:
        self.network = network if network is not None else DEFAULT_NETWORK

    @asynccontextmanager
    async def open_endpoint(
        self, node_id: str, address: str, on_message: MessageHandler
    ) -> AsyncIterator[MemoryEndpoint]:
        endpoint = MemoryEndpoint(self.network, node_id, address, on_message)
        self.network.attach(endpoint)
        try:
            yield endpoint
        finally:
            endpoint.close()
            self.network.detach(endpoint)
