"""Cluster harnesses for the Raft tests: `CoreCluster` drives `RaftCore`s by hand, `NodeCluster` runs `RaftNode`s.

`CoreCluster` is the deterministic one: no trio, no clock. Each core has its own seeded RNG and an in-test
disk; a Ready is handled in the driver's order (persist, queue messages, apply, advance), and messages
wait in one FIFO queue (so each link keeps its order) until `deliver` hands them over. Links can be cut,
members crashed and restarted from their disk, and single messages dropped by a filter. Two checkers run
on every step: at most one leader per term, and no two members ever apply different entries at one index.

`NodeCluster` runs real `RaftNode`s on a private `MemoryNetwork` inside a nursery, each in a cancel scope
of its own, so a test can kill a member (cancel its scope) and restart it from its `MemoryStorage`.
"""

from __future__ import annotations

import json
import random
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from graft_trio.clock import TrioClock
from graft_trio.raft import (
    CoreConfig,
    Entry,
    EntryKind,
    HardState,
    Member,
    Membership,
    MemoryStorage,
    RaftConfig,
    RaftCore,
    RaftNode,
    ReadState,
    Ready,
    Role,
    Snapshot,
    StateMachine,
)
from graft_trio.raft.messages import Message
from tests.kv import KeyValue
from transports.memory import MemoryEndpoint, MemoryNetwork, MemoryTransport


class SafetyViolation(AssertionError):
    """A Raft safety property was broken (two leaders in a term, or two entries applied at one index)."""


# --- the deterministic core cluster ------------------------------------------------------------------


@attrs.define
class Disk:
    """What a core persisted: the hard state, the latest snapshot and the log after it."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: list[Entry]

    def save(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            meta = ready.snapshot.meta
            self.snapshot = ready.snapshot
            self.entries = [] if ready.discard_log else [e for e in self.entries if e.index > meta.index]
        if ready.hard_state is not None:
            self.hard_state = ready.hard_state
        if ready.entries:
            first = ready.entries[0].index
            self.entries = [e for e in self.entries if e.index < first]
            self.entries.extend(ready.entries)
            expected = (self.snapshot.meta.index if self.snapshot else 0) + 1
            for entry in self.entries:
                assert entry.index == expected, "the persisted log has a gap"
                expected += 1

    def compact(self, snapshot: Snapshot) -> None:
        """Like the driver's storage: the snapshot replaces every entry it covers (the core keeps a
        trailing part of the log in memory only)."""
        self.snapshot = snapshot
        self.entries = [e for e in self.entries if e.index > snapshot.meta.index]


def encode_applied(data: Sequence[bytes]) -> bytes:
    """The core cluster's state machine is the list of applied commands; its snapshot is that list."""
    return json.dumps([d.decode() for d in data]).encode()


def decode_applied(snapshot: bytes) -> list[bytes]:
    return [d.encode() for d in json.loads(snapshot)] if snapshot else []


def membership_of(voters: Iterable[str], learners: Iterable[str] = ()) -> Membership:
    members = [Member(i, f"addr-{i}") for i in voters] + [Member(i, f"addr-{i}", voter=False) for i in learners]
    return Membership.of(members)


class CoreCluster:
    """RaftCores wired by an in-test network that the test steps by hand."""

    def __init__(
        self,
        ids: Sequence[str],
        *,
        config: CoreConfig | None = None,
        seed: int = 0,
        learners: Sequence[str] = (),
        logs: dict[str, tuple[HardState, list[Entry]]] | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        """`ids` (and `learners`) found the cluster with the bootstrap entry; `logs` overrides a member's
        starting hard state and log; `extra` members start empty (they join later)."""
        self.config = config or CoreConfig()
        self.seed = seed
        self.membership = membership_of(ids, learners)
        bootstrap_state, bootstrap_log = RaftCore.bootstrap_entries(self.membership)
        self.disks: dict[str, Disk] = {}
        for node_id in [*ids, *learners]:
            hard_state, entries = (logs or {}).get(node_id, (bootstrap_state, bootstrap_log))
            self.disks[node_id] = Disk(hard_state, None, list(entries))
        for node_id in extra:
            self.disks[node_id] = Disk(HardState(), None, [])
        self.cores: dict[str, RaftCore] = {}
        self.restarts: Counter[str] = Counter()
        self.queue: deque[Message] = deque()
        self.cut: set[tuple[str, str]] = set()  # (source, target) links that lose every message
        self.drop: Callable[[Message], bool] | None = None  # a filter that loses the messages it accepts
        self.held: set[tuple[str, str]] = set()  # (source, target) links whose messages wait, in order
        self.sent: Counter[type] = Counter()
        self.delivered: list[Message] = []
        self.dropped: list[Message] = []
        self.applied: dict[str, list[bytes]] = {}  # each member's state machine: the commands it applied
        self.applied_entries: dict[str, list[Entry]] = {}
        self.read_states: dict[str, list[ReadState]] = {}
        self.snapshots_received: dict[str, list[Snapshot]] = {}
        self.leaders_by_term: dict[int, str] = {}
        self.entry_applied_at: dict[int, tuple[int, bytes, EntryKind]] = {}
        for node_id in self.disks:
            self.start(node_id)

    # --- members -------------------------------------------------------------------------------------

    def start(self, node_id: str) -> RaftCore:
        disk = self.disks[node_id]
        rng = random.Random(f"{self.seed}/{node_id}/{self.restarts[node_id]}")
        core = RaftCore(node_id, self.config, rng, disk.hard_state, disk.snapshot, list(disk.entries))
        self.cores[node_id] = core
        self.applied[node_id] = decode_applied(disk.snapshot.data) if disk.snapshot else []
        self.applied_entries[node_id] = []
        self.read_states.setdefault(node_id, [])
        self.snapshots_received.setdefault(node_id, [])
        return core

    def crash(self, node_id: str) -> None:
        """Stop a member: it loses everything it did not persist, and messages to and from it."""
        del self.cores[node_id]
        self.queue = deque(m for m in self.queue if node_id not in (m.source, m.target))

    def restart(self, node_id: str) -> RaftCore:
        self.restarts[node_id] += 1
        return self.start(node_id)

    def __getitem__(self, node_id: str) -> RaftCore:
        return self.cores[node_id]

    # --- the network -----------------------------------------------------------------------------------

    def isolate(self, node_id: str) -> None:
        for other in self.disks:
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def partition(self, *groups: Sequence[str]) -> None:
        """Cut every link between members of different groups."""
        for group in groups:
            for other_group in groups:
                if group is not other_group:
                    for a in group:
                        for b in other_group:
                            self.cut.add((a, b))

    def drop_first(self, predicate: Callable[[Message], bool], count: int = 1) -> None:
        """Lose the next `count` messages that `predicate` accepts (and only those)."""
        remaining = [count]

        def drop(message: Message) -> bool:
            if remaining[0] > 0 and predicate(message):
                remaining[0] -= 1
                return True
            return False

        self.drop = drop

    def heal(self) -> None:
        self.cut.clear()
        self.held.clear()
        self.drop = None

    def _lost(self, message: Message) -> bool:
        if (message.source, message.target) in self.cut or message.target not in self.cores:
            return True
        return self.drop is not None and self.drop(message)

    # --- driving -----------------------------------------------------------------------------------------

    def flush(self, node_id: str) -> None:
        """Handle every Ready of one member, in the driver's order."""
        core = self.cores[node_id]
        while core.has_ready():
            ready = core.ready()
            self.disks[node_id].save(ready)
            for message in ready.messages:
                self.sent[type(message)] += 1
                self.queue.append(message)
            if ready.snapshot is not None:
                self.snapshots_received[node_id].append(ready.snapshot)
                self.applied[node_id] = decode_applied(ready.snapshot.data)
            for entry in ready.committed_entries:
                self._apply(node_id, entry)
            self.read_states[node_id].extend(ready.read_states)
            core.advance(ready)
            self._check_leaders()

    def _apply(self, node_id: str, entry: Entry) -> None:
        seen = self.entry_applied_at.setdefault(entry.index, (entry.term, entry.data, entry.kind))
        if seen != (entry.term, entry.data, entry.kind):
            raise SafetyViolation(f"{node_id} applied {entry} at {entry.index}, another member applied {seen}")
        self.applied_entries[node_id].append(entry)
        if entry.kind is EntryKind.NORMAL:
            self.applied[node_id].append(entry.data)

    def _check_leaders(self) -> None:
        for node_id, core in self.cores.items():
            if core.role is Role.LEADER:
                leader = self.leaders_by_term.setdefault(core.term, node_id)
                if leader != node_id:
                    raise SafetyViolation(f"two leaders in term {core.term}: {leader} and {node_id}")

    def flush_all(self) -> None:
        for node_id in list(self.cores):
            self.flush(node_id)

    def deliver(self, max_messages: int = 100_000) -> int:
        """Deliver messages (and the messages they cause) until the network is quiet. Returns how many."""
        count = 0
        parked: list[Message] = []
        self.flush_all()
        while self.queue:
            message = self.queue.popleft()
            if (message.source, message.target) in self.held:
                parked.append(message)
                continue
            if self._lost(message):
                self.dropped.append(message)
                continue
            count += 1
            assert count <= max_messages, "the network never went quiet"
            self.delivered.append(message)
            self.cores[message.target].step(message)
            self.flush(message.target)
        self.queue.extend(parked)
        return count

    def deliver_one(self) -> Message | None:
        """Deliver the next message that is not lost (dropping lost ones on the way)."""
        self.flush_all()
        while self.queue:
            message = self.queue.popleft()
            assert (message.source, message.target) not in self.held, "deliver_one does not skip held links"
            if self._lost(message):
                self.dropped.append(message)
                continue
            self.delivered.append(message)
            self.cores[message.target].step(message)
            self.flush(message.target)
            return message
        return None

    def deliver_matching(self, predicate: Callable[[Message], bool]) -> Message:
        """Deliver the first queued message that `predicate` accepts, leaving the others queued."""
        self.flush_all()
        for position, message in enumerate(self.queue):
            if predicate(message):
                del self.queue[position]
                self.delivered.append(message)
                self.cores[message.target].step(message)
                self.flush(message.target)
                return message
        raise AssertionError("no queued message matches")

    def tick(self, node_ids: Iterable[str] | None = None, times: int = 1) -> None:
        """Tick the given members (every live one by default) `times` times, delivering after each round."""
        for _ in range(times):
            for node_id in list(node_ids if node_ids is not None else self.cores):
                if node_id in self.cores:
                    self.cores[node_id].tick()
            self.deliver()

    def tick_until(self, predicate: Callable[[], bool], max_ticks: int = 1000) -> int:
        for ticks in range(max_ticks):
            if predicate():
                return ticks
            self.tick()
        raise AssertionError(f"condition not reached in {max_ticks} ticks")

    # --- conveniences -----------------------------------------------------------------------------------

    def elect(self, node_id: str) -> RaftCore:
        """Make `node_id` campaign at once and deliver until the election is over; it must win."""
        self.cores[node_id].campaign_now()
        self.deliver()
        assert self.cores[node_id].role is Role.LEADER, f"{node_id} did not win: {self.cores[node_id].role}"
        return self.cores[node_id]

    def leaders(self) -> list[str]:
        return [n for n, c in self.cores.items() if c.role is Role.LEADER]

    def leader(self) -> RaftCore:
        """The live leader of the highest term."""
        leaders = sorted(self.leaders(), key=lambda n: self.cores[n].term)
        assert leaders, "no leader"
        return self.cores[leaders[-1]]

    def propose(self, node_id: str, data: bytes, request_id: str = "") -> int | None:
        index = self.cores[node_id].propose(data, request_id)
        self.deliver()
        return index

    def compact(self, node_id: str, trailing: int = 0) -> Snapshot:
        """Snapshot a member's applied state and compact its log, as the driver does."""
        core = self.cores[node_id]
        applied = core.log.applied
        snapshot = Snapshot(core.snapshot_meta(applied), encode_applied(self.applied[node_id]))
        core.compact(snapshot, applied - trailing)
        self.disks[node_id].compact(snapshot)
        return snapshot

    def terms(self, node_id: str) -> list[int]:
        """The terms of a member's log, from its first index."""
        return [e.term for e in self.cores[node_id].log.entries]

    def log_ids(self, node_id: str) -> list[tuple[int, int]]:
        return [(e.index, e.term) for e in self.cores[node_id].log.entries]

    def messages_of(self, kind: type, source: str | None = None, target: str | None = None) -> list[Message]:
        """Delivered messages of a type, optionally from `source` and/or to `target`."""
        return _matching(self.delivered, kind, source, target)

    def queued(self, kind: type, source: str | None = None, target: str | None = None) -> list[Message]:
        """Messages waiting in the network (after flushing every member's Ready)."""
        self.flush_all()
        return _matching(self.queue, kind, source, target)


def _matching(messages: Iterable[Message], kind: type, source: str | None, target: str | None) -> list[Message]:
    return [
        m
        for m in messages
        if isinstance(m, kind) and (source is None or m.source == source) and (target is None or m.target == target)
    ]


def role(core: RaftCore) -> Role:
    """A core's role, read through a call (so that a type checker does not narrow it across steps)."""
    return core.role


def entries_with_terms(terms: Sequence[int], membership: Membership) -> list[Entry]:
    """A log whose first entry is the bootstrap membership (term 1), followed by entries of `terms`."""
    _, log = RaftCore.bootstrap_entries(membership)
    for index, term in enumerate(terms, start=2):
        log.append(Entry(term, index, EntryKind.NORMAL, f"{index}@{term}".encode()))
    return log


# --- the trio node cluster ------------------------------------------------------------------------------


def node_config(**changes: Any) -> RaftConfig:
    """A RaftConfig for driver tests: short proposal timeouts so failures show quickly."""
    base = RaftConfig(default_timeout=3.0)
    return attrs.evolve(base, **changes)


class ControlledNetwork(MemoryNetwork):
    """A MemoryNetwork whose links can be cut (by member id) and whose chosen messages can be held back."""

    def __init__(self) -> None:
        super().__init__()
        self.cut: set[tuple[str, str]] = set()
        self.hold: Callable[[Message], bool] | None = None
        self.held: list[tuple[str, Message]] = []

    def isolate(self, node_id: str, others: Iterable[str]) -> None:
        for other in others:
            if other != node_id:
                self.cut.update({(node_id, other), (other, node_id)})

    def deliver(self, source: MemoryEndpoint, target_address: str, message: Message) -> None:
        if (message.source, message.target) in self.cut:
            self.dropped += 1
            return
        if self.hold is not None and self.hold(message):
            self.held.append((target_address, message))
            return
        super().deliver(source, target_address, message)

    def release(self, predicate: Callable[[Message], bool]) -> int:
        """Deliver the held messages that `predicate` accepts, in the order they were sent."""
        released = [(a, m) for a, m in self.held if predicate(m)]
        self.held = [(a, m) for a, m in self.held if not predicate(m)]
        for address, message in released:
            endpoint = self.endpoints.get(address)
            if endpoint is not None:
                endpoint.put(message)
        return len(released)


class NodeCluster:
    """RaftNodes with KeyValue state machines and MemoryStorage on a private MemoryNetwork."""

    def __init__(self, nursery: trio.Nursery, *, seed: int = 0, config: RaftConfig | None = None) -> None:
        self.nursery = nursery
        self.seed = seed
        self.config = config or node_config()
        self.network = ControlledNetwork()
        self.nodes: dict[str, RaftNode] = {}
        self.storages: dict[str, MemoryStorage] = {}
        self.machines: dict[str, KeyValue] = {}
        self.scopes: dict[str, trio.CancelScope] = {}
        self.stopped: dict[str, trio.Event] = {}
        self.incarnations: Counter[str] = Counter()

    @staticmethod
    def address(node_id: str) -> str:
        return f"mem://{node_id}"

    async def start(
        self,
        node_id: str,
        peers: Sequence[str] = (),
        *,
        join: bool = False,
        config: RaftConfig | None = None,
    ) -> RaftNode:
        """Start (or restart, from its storage) a member; returns once it is serving."""
        storage = self.storages.setdefault(node_id, MemoryStorage())
        machine = KeyValue()
        self.machines[node_id] = machine
        self.incarnations[node_id] += 1
        node = RaftNode(
            node_id,
            self.address(node_id),
            {p: self.address(p) for p in peers if p != node_id},
            state_machine=machine,
            storage=storage,
            transport=MemoryTransport(self.network),
            config=config or self.config,
            join=join,
            rng=random.Random(f"{self.seed}/{node_id}/{self.incarnations[node_id]}"),
        )
        self.nodes[node_id] = node
        await self.nursery.start(self._serve, node)
        return node

    async def _serve(self, node: RaftNode, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stopped = trio.Event()
        self.stopped[node.node_id] = stopped
        try:
            with trio.CancelScope() as scope:
                self.scopes[node.node_id] = scope
                await node.run(task_status=task_status)
        finally:
            stopped.set()

    async def start_all(self, ids: Sequence[str]) -> list[RaftNode]:
        return [await self.start(node_id, ids) for node_id in ids]

    async def stop(self, node_id: str) -> None:
        """Kill a member (cancel its run scope) and wait until it has stopped."""
        self.scopes[node_id].cancel()
        await self.stopped[node_id].wait()

    async def crash(self, node_id: str) -> None:
        """Kill a member and lose its unsynced writes."""
        await self.stop(node_id)
        self.storages[node_id].crash()

    def running(self) -> list[RaftNode]:
        return [n for n in self.nodes.values() if not self.stopped[n.node_id].is_set()]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll `predicate` on the virtual clock until it holds; fail after `timeout` virtual seconds."""
        with trio.move_on_after(timeout):
            while not predicate():
                await trio.sleep(0.01)
            return
        raise AssertionError("condition not reached in time")

    async def leader(self, among: Iterable[str] | None = None, timeout: float = 10.0) -> RaftNode:
        """Wait until exactly one running member (of `among`) leads and the others in it follow it."""
        names = list(among) if among is not None else [n.node_id for n in self.running()]

        def settled() -> bool:
            leaders = [n for n in names if self.nodes[n].is_leader]
            return len(leaders) == 1 and all(self.nodes[n].status().leader_id == leaders[0] for n in names)

        await self.wait_for(settled, timeout)
        return next(self.nodes[n] for n in names if self.nodes[n].is_leader)

    async def applied_everywhere(self, index: int, among: Iterable[str] | None = None) -> None:
        nodes = [self.nodes[n] for n in among] if among is not None else self.running()
        await self.wait_for(lambda: all(n.status().applied_index >= index for n in nodes))

    async def converged(self, among: Iterable[str] | None = None) -> None:
        """Wait until the members have applied everything the leader has committed."""
        leader = await self.leader(among)
        await self.applied_everywhere(leader.status().commit_index, among)


@asynccontextmanager
async def open_node_cluster(
    ids: Sequence[str], *, seed: int = 0, config: RaftConfig | None = None
) -> AsyncIterator[NodeCluster]:
    """A running cluster of `ids` founding members; everything is stopped when the block exits."""
    async with trio.open_nursery() as nursery:
        cluster = NodeCluster(nursery, seed=seed, config=config)
        await cluster.start_all(ids)
        yield cluster
        nursery.cancel_scope.cancel()


class OffsetClock(TrioClock):
    """trio's clock shifted by `offset` (which a test may change): a member whose clock disagrees with the
    others'."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        return trio.current_time() + self.offset

    def trio_deadline(self, deadline: float) -> float:
        return deadline - self.offset


class TimeLog(StateMachine):
    """Applies commands of the form b"<time>|<text>" and remembers the times; stamps the leader's time in."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def stamp(self, command: bytes, leader_time: float) -> bytes:
        return b"%r|%s" % (leader_time, command.partition(b"|")[2])

    def apply(self, index: int, command: bytes) -> bytes:
        self.times.append(float(command.partition(b"|")[0]))
        return command

    def query(self, query: bytes) -> bytes:
        return b""

    def snapshot(self) -> bytes:
        return json.dumps(self.times).encode()

    def restore(self, snapshot: bytes) -> None:
        self.times = json.loads(snapshot)
