"""`RaftNode`: the trio driver around the sans-I/O core.

One task owns the core. Messages from peers, ticks and requests from callers all reach it through one
channel, so the core is only ever touched by that task and needs no locks. Each turn of its loop drains
what is waiting, then handles the core's `Ready` in the order Raft needs: persist the hard state and
entries (one fsync for the whole batch: group commit), then send messages, then apply committed entries,
then answer reads whose index is applied.

Proposals get a `request_id`; the state machine wrapper keeps a table of recently applied ids and their
results (part of every snapshot), so a proposal retried with the same id, by the caller or by this
driver when a forward was lost, is applied once.
"""

from __future__ import annotations

import contextlib
import math
import random
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import trio

from graft_trio.clock import Clock, TrioClock
from graft_trio.raft.core import CoreConfig, RaftCore, ReadState, Ready, Role
from graft_trio.raft.errors import (
    MembershipChangeError,
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    RaftError,
)
from graft_trio.raft.messages import MESSAGE_TYPES, Entry, EntryKind, Member, Membership, Message, Snapshot
from graft_trio.raft.progress import ProgressState
from graft_trio.raft.statemachine import StateMachine
from graft_trio.raft.storage import MemoryStorage, Storage
from graft_trio.transport import Endpoint, Transport, load_transport


@attrs.frozen
class RaftConfig:
    """Timing and limits of a member. Times are seconds on the member's clock."""

    tick_interval: float = 0.05
    election_ticks: int = 10  # election timeout: random in [0.5 s, 1 s) with the defaults
    heartbeat_ticks: int = 2
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight_messages: int = 64
    max_inflight_bytes: int = 8 * 1024 * 1024
    max_message_bytes: int = 1024 * 1024
    snapshot_chunk_bytes: int = 512 * 1024
    snapshot_threshold: int = 8192  # take a snapshot once this many entries were applied since the last
    snapshot_trailing: int = 1024  # entries kept behind a snapshot for followers that lag a little
    durable: bool = True  # False: writes are not fsynced (a non-durable mode, faster, loses data on crash)
    default_timeout: float = 5.0
    catch_up_margin: int = 16  # a learner within this many entries of the leader is promoted
    dedup_capacity: int = 65536  # request ids remembered for exactly-once application of retries
    max_batch: int = 1024  # events handled per turn of the loop before the core's output is flushed

    def core_config(self) -> CoreConfig:
        return CoreConfig(
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            pre_vote=self.pre_vote,
            check_quorum=self.check_quorum,
            max_inflight_messages=self.max_inflight_messages,
            max_inflight_bytes=self.max_inflight_bytes,
            max_message_bytes=self.max_message_bytes,
            snapshot_chunk_bytes=self.snapshot_chunk_bytes,
        )

    @property
    def election_timeout(self) -> float:
        return self.tick_interval * self.election_ticks


@attrs.frozen
class RaftStatus:
    node_id: str
    role: str
    term: int
    leader_id: str | None
    commit_index: int
    applied_index: int
    last_index: int
    snapshot_index: int
    members: tuple[Member, ...]


class RaftObserver(Protocol):
    """Hooks the simulator's checkers use to watch a member; production code passes none."""

    def persisted(self, node_id: str, core: RaftCore, ready: Ready) -> None: ...

    def applied(self, node_id: str, entry: Entry) -> None: ...

    def restored(self, node_id: str, snapshot: Snapshot) -> None: ...


@attrs.define
class _Waiter:
    event: trio.Event = attrs.Factory(trio.Event)
    result: bytes = b""
    error: Exception | None = None
    command: bytes | None = None  # a pending proposal's command, submitted again when the leader changes
    appended_term: int = 0  # the term in which this member, as leader, appended the proposal to its log

    def submit_proposal(self, core: RaftCore, request_id: str) -> None:
        """Hand the proposal to the core, unless this member leads and already appended it in this term:
        then it is in the log and commits with it, and appending it again would only grow the log."""
        if self.event.is_set() or self.command is None:
            return
        if core.role is Role.LEADER and self.appended_term == core.term:
            return
        if core.propose(self.command, request_id) is not None:
            self.appended_term = core.term

    def resolve(self, result: bytes) -> None:
        if not self.event.is_set():
            self.result = result
            self.event.set()

    def fail(self, error: Exception) -> None:
        if not self.event.is_set():
            self.error = error
            self.event.set()


_TICK = object()


def encode_applied_state(dedup: dict[str, bytes], state: bytes) -> bytes:
    parts = [struct.pack(">I", len(dedup))]
    for request_id, result in dedup.items():
        rid = request_id.encode()
        parts.append(struct.pack(">II", len(rid), len(result)))
        parts.append(rid)
        parts.append(result)
    parts.append(state)
    return b"".join(parts)


def decode_applied_state(data: bytes) -> tuple[dict[str, bytes], bytes]:
    (count,) = struct.unpack_from(">I", data, 0)
    offset = 4
    dedup: dict[str, bytes] = {}
    for _ in range(count):
        rid_len, result_len = struct.unpack_from(">II", data, offset)
        offset += 8
        rid = data[offset : offset + rid_len].decode()
        offset += rid_len
        dedup[rid] = data[offset : offset + result_len]
        offset += result_len
    return dedup, data[offset:]


class RaftNode:
    """A Raft member: replicates `state_machine` with its peers over `transport`.

    `peers` maps the other founding members' ids to addresses. With ``peers={}`` the member forms a
    one-member cluster, unless `join` is set: then it holds no election and waits until a member of an
    existing cluster adds it with `add_member`.

    `rng` (default: seeded by the OS) draws election timeouts and this incarnation's request-id prefix and
    read contexts. A member restarted on the same storage must get an rng in a different state (a test or
    simulator that seeds it must reseed on restart): with the same seed it would reuse its previous life's
    request ids, and the dedup table would answer its new proposals with old results.
    """

    def __init__(
        self,
        node_id: str,
        address: str,
        peers: dict[str, str] | None = None,
        *,
        state_machine: StateMachine,
        storage: Storage | None = None,
        transport: str | Transport = "memory",
        config: RaftConfig | None = None,
        join: bool = False,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        observer: RaftObserver | None = None,
        transport_options: dict[str, Any] | None = None,
    ) -> None:
        self.node_id = node_id
        self.address = address
        self.peers = dict(peers or {})
        if node_id in self.peers:
            del self.peers[node_id]
        self.state_machine = state_machine
        self.storage = storage if storage is not None else MemoryStorage()
        self.transport = load_transport(transport, **(transport_options or {}))
        self.config = config or RaftConfig()
        self.join = join
        self.clock = clock or TrioClock()
        self.rng = rng if rng is not None else random.Random()
        self.observer = observer
        self.core: RaftCore | None = None
        self._endpoint: Endpoint | None = None
        # request id -> result, oldest first. An OrderedDict: evicting from the front of a plain dict leaves
        # holes that every later `next(iter(...))` walks past, which made eviction O(n).
        self._dedup: OrderedDict[str, bytes] = OrderedDict()
        self._waiters: dict[str, _Waiter] = {}
        self._read_waiters: dict[int, tuple[_Waiter, bytes]] = {}
        self._reads_to_serve: list[tuple[int, int]] = []  # (index, context) confirmed, waiting for apply
        # Read contexts start at a random base per incarnation, so that an answer meant for a previous
        # incarnation of this member is never taken for one of this incarnation's reads.
        self._read_context = self.rng.getrandbits(40) << 20
        self._request_seq = 0
        self._incarnation = f"{self.rng.getrandbits(48):012x}"
        self._send_events, self._receive_events = trio.open_memory_channel[object](65536)
        self._changed = trio.Event()  # set (and replaced) after every turn of the loop
        self._running = False
        self.applied_index = 0
        self._last_tick_at = 0.0
        self._tick_due = math.inf  # while the tick loop sleeps: the member time it sleeps until
        self._tick_scope: trio.CancelScope | None = None
        self._known_leader: str | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> RaftNode:
        self._exit_stack = contextlib.AsyncExitStack()
        nursery = await self._exit_stack.enter_async_context(trio.open_nursery())
        await nursery.start(self.run)
        self._outer_scope = nursery.cancel_scope
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        self._outer_scope.cancel()
        return await self._exit_stack.__aexit__(*exc_info)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the member until cancelled. `nursery.start(node.run)` returns once it is serving."""
        persistent = await self.storage.load()
        hard_state, snapshot, entries = persistent.hard_state, persistent.snapshot, list(persistent.entries)
        if snapshot is None and not entries and hard_state.term == 0 and not self.join:
            members = [Member(self.node_id, self.address), *(Member(i, a) for i, a in self.peers.items())]
            hard_state, entries = RaftCore.bootstrap_entries(Membership.of(members))
            await self.storage.save(hard_state, entries, sync=self.config.durable)
        stamp: Callable[[bytes], bytes] | None = None
        if type(self.state_machine).stamp is not StateMachine.stamp:
            machine, clock = self.state_machine, self.clock

            def stamp(command: bytes) -> bytes:
                return machine.stamp(command, clock.now())

        core = RaftCore(
            self.node_id, self.config.core_config(), self.rng, hard_state, snapshot, entries, stamp=stamp
        )
        if snapshot is not None:
            self._restore(snapshot)
        self.core = core
        self._last_tick_at = self.clock.now()
        try:
            async with self.transport.open_endpoint(self.node_id, self.address, self._on_message) as endpoint:
                self._endpoint = endpoint
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._tick_loop)
                    if core.membership.voters == (self.node_id,):
                        core.campaign_now()
                    self._running = True
                    task_status.started()
                    await self._main_loop()
        finally:
            self._running = False
            self._endpoint = None
            error = NodeStoppedError(f"member {self.node_id} stopped")
            for waiter in self._waiters.values():
                waiter.fail(error)
            for waiter, _ in self._read_waiters.values():
                waiter.fail(error)
            self._changed.set()

    def _on_message(self, message: Message) -> None:
        if not isinstance(message, MESSAGE_TYPES):
            return
        try:
            self._send_events.send_nowait(message)
        except trio.WouldBlock:
            pass  # overloaded: drop it, as a network would; the sender retries
        except trio.ClosedResourceError:
            pass

    async def _tick_loop(self) -> None:
        """Wake the main loop when the core has something to do on a tick.

        Ticks are not delivered one by one: the main loop catches up on the ticks that elapsed before it
        handles anything else (so they interleave with messages exactly as if they had been delivered on
        time), and this task sleeps until the tick at which the core would act, an election timeout or a
        heartbeat. When that moves later (a follower heard from its leader) the sleep goes on, and this
        task finds out when it wakes, so a follower that hears from its leader wakes about once per
        election timeout, and then only this task; when it moves earlier, the main loop cuts the sleep
        short (`_cut_tick_sleep`).
        """
        while True:
            core = self._core()
            due = self._next_tick_action(core)
            if due > self.clock.now():
                with trio.CancelScope() as scope:
                    self._tick_scope, self._tick_due = scope, due
                    await self.clock.sleep_until(due)
                self._tick_scope = None
                continue
            turn_done = self._changed
            await self._submit(_TICK)
            # Sleep again only once the main loop has caught up on the ticks, or the action would still be due.
            await turn_done.wait()

    def _cut_tick_sleep(self) -> None:
        """Wake the tick loop if the core's next tick action is now earlier than the one it sleeps for."""
        scope, core = self._tick_scope, self.core
        if scope is not None and core is not None and self._next_tick_action(core) < self._tick_due:
            scope.cancel()

    def _next_tick_action(self, core: RaftCore) -> float:
        return self._last_tick_at + core.ticks_until_action() * self.config.tick_interval

    def _catch_up_ticks(self, core: RaftCore) -> None:
        interval = self.config.tick_interval
        now = self.clock.now()
        while self._last_tick_at + interval <= now:
            self._last_tick_at += interval
            core.tick()

    async def _main_loop(self) -> None:
        core = self._core()
        while True:
            # What arrived during the last turn's writes is handled at once: `receive` would first yield
            # to the scheduler, costing a pass of the run loop. The loop still blocks (and so can be
            # cancelled) whenever nothing is waiting, and nothing but other tasks and the transport fill
            # the channel.
            try:
                event = self._receive_events.receive_nowait()
            except trio.WouldBlock:
                event = await self._receive_events.receive()
            self._catch_up_ticks(core)
            self._handle(core, event)
            for _ in range(self.config.max_batch):
                try:
                    event = self._receive_events.receive_nowait()
                except trio.WouldBlock:
                    break
                self._handle(core, event)
            while core.has_ready():
                await self._process_ready(core, core.ready())
                if core.leader_id != self._known_leader:
                    self._known_leader = core.leader_id
                    self._resubmit(core)
            self._cut_tick_sleep()
            changed, self._changed = self._changed, trio.Event()
            changed.set()

    def _resubmit(self, core: RaftCore) -> None:
        """A new leader is known: send it the pending proposals and reads now, not at the next retry.

        A proposal forwarded to a leader that died is lost with it; retried under its request id, it is
        still applied once.
        """
        if core.leader_id is None:
            return
        for request_id, waiter in self._waiters.items():
            with contextlib.suppress(NotLeaderError):
                waiter.submit_proposal(core, request_id)
        for context, (waiter, _) in self._read_waiters.items():
            if not waiter.event.is_set():
                with contextlib.suppress(NotLeaderError):
                    core.read_index(context)

    def _handle(self, core: RaftCore, event: object) -> None:
        if event is _TICK:
            pass  # the ticks it stands for were caught up on already
        elif callable(event):
            event()
        else:
            core.step(event)  # type: ignore[arg-type]

    async def _process_ready(self, core: RaftCore, ready: Ready) -> None:
        await self._persist(ready)
        self._send_messages(ready)
        self._apply(ready)
        core.advance(ready)
        await self._maybe_snapshot(core)

    async def _persist(self, ready: Ready) -> None:
        if ready.snapshot is not None:
            await self.storage.save_snapshot(ready.snapshot, discard_log=ready.discard_log)
            self._restore(ready.snapshot)
        if ready.hard_state is not None or ready.entries:
            await self.storage.save(ready.hard_state, ready.entries, sync=self.config.durable)
        if self.observer is not None:
            self.observer.persisted(self.node_id, self._core(), ready)

    def _send_messages(self, ready: Ready) -> None:
        endpoint = self._endpoint
        if endpoint is None:
            return
        for message in ready.messages:
            address = self._address_of(message.target)
            if address is not None:
                endpoint.send(message.target, address, message)

    def _address_of(self, node_id: str) -> str | None:
        member = self._core().membership.get(node_id)
        if member is not None:
            return member.address
        if node_id in self.peers:
            return self.peers[node_id]
        return self._endpoint.peer_address(node_id) if self._endpoint is not None else None

    def _apply(self, ready: Ready) -> None:
        for entry in ready.committed_entries:
            self._apply_entry(entry)
        for read_state in ready.read_states:
            self._confirm_read(read_state)
        self._serve_reads()

    def _apply_entry(self, entry: Entry) -> None:
        result = b""
        if entry.kind == EntryKind.NORMAL:
            cached = self._dedup.get(entry.request_id) if entry.request_id else None
            if cached is not None:
                result = cached
            else:
                result = self.state_machine.apply(entry.index, entry.data)
                if entry.request_id:
                    self._remember(entry.request_id, result)
        self.applied_index = entry.index
        if self.observer is not None:
            self.observer.applied(self.node_id, entry)
        waiter = self._waiters.get(entry.request_id) if entry.request_id else None
        if waiter is not None:
            waiter.resolve(result)

    def _remember(self, request_id: str, result: bytes) -> None:
        self._dedup[request_id] = result
        while len(self._dedup) > self.config.dedup_capacity:
            self._dedup.popitem(last=False)

    def _restore(self, snapshot: Snapshot) -> None:
        dedup, state = decode_applied_state(snapshot.data)
        self._dedup = OrderedDict(dedup)
        self.state_machine.restore(state)
        self.applied_index = snapshot.meta.index
        if self.observer is not None:
            self.observer.restored(self.node_id, snapshot)

    async def _maybe_snapshot(self, core: RaftCore) -> None:
        applied = core.log.applied
        last_snapshot = core.snapshot.meta.index if core.snapshot is not None else 0
        if applied - last_snapshot < self.config.snapshot_threshold:
            return
        data = encode_applied_state(self._dedup, self.state_machine.snapshot())
        snapshot = Snapshot(core.snapshot_meta(applied), data)
        await self.storage.save_snapshot(snapshot, discard_log=False)
        core.compact(snapshot, applied - self.config.snapshot_trailing)

    # --- reads ---------------------------------------------------------------------------------------

    def _confirm_read(self, read_state: ReadState) -> None:
        if read_state.context in self._read_waiters:
            self._reads_to_serve.append((read_state.index, read_state.context))

    def _serve_reads(self) -> None:
        if not self._reads_to_serve:
            return
        waiting: list[tuple[int, int]] = []
        for index, context in self._reads_to_serve:
            if index > self.applied_index:
                waiting.append((index, context))
                continue
            entry = self._read_waiters.pop(context, None)
            if entry is not None:
                waiter, query = entry
                try:
                    waiter.resolve(self.state_machine.query(query))
                except Exception as exc:  # the user's query raised: that caller gets it
                    waiter.fail(exc)
        self._reads_to_serve = waiting

    # --- the public API ------------------------------------------------------------------------------

    def _core(self) -> RaftCore:
        if self.core is None:
            raise NodeStoppedError(f"member {self.node_id} is not running")
        return self.core

    def _check_running(self) -> None:
        if not self._running:
            raise NodeStoppedError(f"member {self.node_id} is not running")

    def new_request_id(self) -> str:
        self._request_seq += 1
        return f"{self.node_id}/{self._incarnation}/{self._request_seq}"

    async def _submit(self, event: object) -> None:
        """Queue `event` for the main loop; waits only while the queue is full. Not a checkpoint by
        itself: every caller goes on to wait for the event's outcome, which is."""
        try:
            self._send_events.send_nowait(event)
        except trio.WouldBlock:
            await self._send_events.send(event)

    async def _await_with_retries(
        self, waiter: _Waiter, submit: Callable[[], None], timeout: float | None, what: str
    ) -> bytes:
        """Submit, wait, and submit again each election timeout until done or `timeout` passes."""
        self._check_running()
        timeout = self.config.default_timeout if timeout is None else timeout
        saw_leader = False
        with self.clock.move_on_after(timeout):
            while True:
                await self._submit(submit)
                with self.clock.move_on_after(self.config.election_timeout):
                    await waiter.event.wait()
                if waiter.event.is_set():
                    if waiter.error is not None:
                        if isinstance(waiter.error, NotLeaderError) and waiter.error.leader_id is None:
                            # No leader right now: wait for one, then try again.
                            waiter.error = None
                            waiter.event = trio.Event()
                            await self._wait_until(lambda: self._core().leader_id is not None)
                            saw_leader = True
                            continue
                        raise waiter.error
                    return waiter.result
                saw_leader = saw_leader or self._core().leader_id is not None
        if saw_leader or self._core().leader_id is not None:
            raise ProposalTimeout(f"{what} did not complete within {timeout} s")
        raise NoQuorumError(f"no leader for {timeout} s; {what} not done")

    async def propose(self, command: bytes, *, timeout: float | None = None, request_id: str | None = None) -> bytes:
        """Replicate `command` and return what the state machine's `apply` returned for it.

        Made on any member: a follower forwards it to the leader. A proposal retried with the same
        `request_id` (by this call, or by the caller after a timeout) is applied once.
        Raises ProposalTimeout or NoQuorumError after `timeout` seconds; the command may still be applied.
        """
        request_id = request_id or self.new_request_id()
        cached = self._dedup.get(request_id)
        if cached is not None:
            return cached
        waiter = self._waiters.setdefault(request_id, _Waiter(command=command))
        core = self._core()

        def submit() -> None:
            try:
                waiter.submit_proposal(core, request_id)
            except NotLeaderError as exc:
                waiter.fail(exc)

        try:
            return await self._await_with_retries(waiter, submit, timeout, "proposal")
        finally:
            if self._waiters.get(request_id) is waiter:
                del self._waiters[request_id]

    async def read(self, query: bytes, *, timeout: float | None = None) -> bytes:
        """A linearizable read (ReadIndex), served on this member once it has applied the read point."""
        self._read_context += 1
        context = self._read_context
        waiter = _Waiter()
        self._read_waiters[context] = (waiter, query)
        core = self._core()

        def submit() -> None:
            if waiter.event.is_set():
                return
            try:
                core.read_index(context)
            except NotLeaderError as exc:
                waiter.fail(exc)

        try:
            return await self._await_with_retries(waiter, submit, timeout, "read")
        finally:
            self._read_waiters.pop(context, None)

    async def wait_for_leader(self, timeout: float | None = None) -> str:
        """The id of the leader, once one is known."""
        self._check_running()
        with self.clock.move_on_after(self.config.default_timeout if timeout is None else timeout):
            while True:
                leader = self._core().leader_id
                if leader is not None:
                    return leader
                await self._changed.wait()
                self._check_running()
        raise NoQuorumError(f"no leader known to {self.node_id}")

    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()
            self._check_running()

    async def _change_membership(self, build: Callable[[Membership], Membership | None]) -> None:
        """Propose a single-server change, retrying while the leader is not yet able to take it."""
        core = self._core()
        while True:
            if core.role is not Role.LEADER:
                raise NotLeaderError("membership changes are made on the leader", core.leader_id)
            new = build(core.membership)
            if new is None:
                return
            request_id = self.new_request_id()
            waiter = self._waiters.setdefault(request_id, _Waiter())

            def submit(new: Membership = new, request_id: str = request_id, waiter: _Waiter = waiter) -> None:
                try:
                    core.propose_membership(new, request_id)
                except RaftError as exc:
                    waiter.fail(exc)

            try:
                await self._submit(submit)
                await waiter.event.wait()
            finally:
                self._waiters.pop(request_id, None)
            if waiter.error is None:
                return
            if isinstance(waiter.error, MembershipChangeError) and waiter.error.retryable:
                await self._changed.wait()  # the pending change, or the leader's first commit, will land
                continue
            raise waiter.error

    async def add_member(self, node_id: str, address: str, *, voter: bool = True, timeout: float | None = None) -> None:
        """Add a member: as a learner first, promoted to voter once it has caught up (if `voter`).

        Called on the leader; raises NotLeaderError elsewhere.
        """
        self._check_running()
        timeout = self.config.default_timeout * 4 if timeout is None else timeout
        core = self._core()
        with self.clock.move_on_after(timeout):

            def as_learner(current: Membership) -> Membership | None:
                if current.get(node_id) is not None:
                    return None
                return current.with_member(Member(node_id, address, voter=False))

            await self._change_membership(as_learner)
            if voter:

                def caught_up() -> bool:
                    progress = core.progress_of(node_id)
                    if core.role is not Role.LEADER:
                        raise NotLeaderError("lost leadership while adding a member", core.leader_id)
                    # REPLICATE means the learner has answered and its log matches: a learner that never
                    # answered must not become a voter, whatever the length of the log.
                    return (
                        progress is not None
                        and progress.state is ProgressState.REPLICATE
                        and progress.match_index + self.config.catch_up_margin >= core.log.last_index
                    )

                await self._wait_until(caught_up)

                def as_voter(current: Membership) -> Membership | None:
                    member = current.get(node_id)
                    if member is not None and member.voter:
                        return None
                    return current.with_member(Member(node_id, address, voter=True))

                await self._change_membership(as_voter)
            return
        raise ProposalTimeout(f"adding {node_id} did not complete within {timeout} s")

    async def remove_member(self, node_id: str, *, timeout: float | None = None) -> None:
        """Remove a member (the leader too: it steps down once its removal is committed)."""
        self._check_running()
        timeout = self.config.default_timeout if timeout is None else timeout
        with self.clock.move_on_after(timeout):

            def without(current: Membership) -> Membership | None:
                return current.without(node_id) if current.get(node_id) is not None else None

            await self._change_membership(without)
            return
        raise ProposalTimeout(f"removing {node_id} did not complete within {timeout} s")

    async def transfer_leadership(self, target: str | None = None, *, timeout: float | None = None) -> str:
        """Hand leadership to `target` (by default the most up-to-date voter); returns the new leader."""
        self._check_running()
        core = self._core()
        if core.role is not Role.LEADER:
            raise NotLeaderError("only the leader can transfer leadership", core.leader_id)
        if target is None:
            candidates = [
                (progress.match_index, node_id)
                for node_id, progress in core.progress.items()
                if node_id != self.node_id and core.membership.is_voter(node_id)
            ]
            if not candidates:
                raise MembershipChangeError("no other voter to transfer leadership to")
            target = max(candidates, key=lambda item: (item[0], item[1]))[1]
        chosen = target
        errors: list[Exception] = []

        def submit() -> None:
            try:
                core.transfer_leadership(chosen)
            except RaftError as exc:
                errors.append(exc)

        timeout = self.config.default_timeout if timeout is None else timeout
        with self.clock.move_on_after(timeout):
            await self._submit(submit)
            while True:
                await self._changed.wait()
                self._check_running()
                if errors:
                    raise errors[0]
                if core.leader_id is not None and core.leader_id != self.node_id:
                    return core.leader_id
        raise ProposalTimeout(f"leadership transfer to {chosen} did not complete within {timeout} s")

    def status(self) -> RaftStatus:
        core = self._core()
        return RaftStatus(
            node_id=self.node_id,
            role=core.role.value,
            term=core.term,
            leader_id=core.leader_id,
            commit_index=core.log.committed,
            applied_index=self.applied_index,
            last_index=core.log.last_index,
            snapshot_index=core.snapshot.meta.index if core.snapshot is not None else 0,
            members=core.membership.members,
        )

    @property
    def is_leader(self) -> bool:
        return self.core is not None and self.core.role is Role.LEADER


__all__ = ["Message", "RaftConfig", "RaftNode", "RaftObserver", "RaftStatus"]
