"""`RaftNode`: the trio driver around the sans-I/O core.

One task owns the core. Messages from peers, ticks and requests from callers all reach it through one
channel (proposals and reads through a queue it takes whole each turn), so the core is only ever touched
by that task and needs no locks. Each turn of its loop drains what is waiting, then handles the core's
`Ready` in the order Raft needs: persist the hard state and entries (one fsync for the whole batch: group
commit; a change of the commit index alone is not written), then send messages (a leader sends before
writing its own entries, which count towards a quorum only once written), then apply committed entries,
then answer reads whose index is applied. With ``durable=False`` the writes are handed to a background
task instead (`_writer_loop`), so nothing on that path waits for the disk.

Proposals get a `request_id`; the state machine wrapper keeps a table of recently applied ids and their
results (part of every snapshot), so a proposal retried with the same id, by the caller or by this
driver when a forward was lost, is applied once.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import math
import random
import struct
import sys
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, Protocol

import attrs
import trio

from graft_trio._service import start_service
from graft_trio.clock import Clock, TrioClock
from graft_trio.raft.codec import decode_commands, encode_commands
from graft_trio.raft.core import CoreConfig, RaftCore, ReadState, Ready, Role, check_proposal_size
from graft_trio.raft.errors import (
    MembershipChangeError,
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    ProposalTooLarge,
    RaftError,
)
from graft_trio.raft.messages import (
    MESSAGE_TYPES,
    Entry,
    EntryKind,
    HardState,
    Member,
    Membership,
    MembershipOutcome,
    MembershipRequest,
    MembershipResponse,
    Message,
    Snapshot,
)
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
    # The largest entry a proposal may make (`Entry.size`: a command, or a `propose_many` batch, with its
    # request id); larger ones raise ProposalTooLarge. A transport's frame limit must exceed
    # max_message_bytes + max_entry_bytes (the last entry of an AppendEntries may cross max_message_bytes).
    max_entry_bytes: int = 1024 * 1024
    snapshot_chunk_bytes: int = 512 * 1024
    snapshot_threshold: int = 8192  # take a snapshot once this many entries were applied since the last
    snapshot_threshold_bytes: int = 64 * 1024 * 1024  # ... or once entries of this many bytes were
    snapshot_trailing: int = 1024  # entries kept behind a snapshot for followers that lag a little
    snapshot_trailing_bytes: int = 16 * 1024 * 1024  # ... but no more of them than this many bytes
    # False: nothing is fsynced, and entries are written behind the commit path: a crash (a kill -9 too)
    # loses those not written yet, acknowledged ones included. A new term or vote is written before it is sent.
    durable: bool = True
    default_timeout: float = 5.0
    catch_up_margin: int = 16  # a learner within this many entries of the leader is promoted
    dedup_capacity: int = 65536  # request ids remembered for exactly-once application of retries
    max_batch: int = 1024  # events handled per turn of the loop before the core's output is flushed
    max_pending_proposals: int = 1024  # a member's proposals in flight; more wait for room
    # durable=False: entries handed to the background writer and not yet written; beyond this the member's
    # loop waits for the writer (the disk sets the pace again instead of the backlog growing without bound)
    max_unwritten_entries: int = 65536
    # durable=False: the background writer lets writes gather for this long before each save, unless the
    # member waits for it (a new term or vote, a full queue). Fewer, larger saves; and a worker thread
    # that wakes less often competes less with the commit path (serial write p50 on loopback, 3 processes
    # on 2 CPUs: about 0.9 ms without, 0.7 ms with 5 ms). A crash loses the unwritten entries either way.
    write_behind_delay: float = 0.005

    def core_config(self) -> CoreConfig:
        return CoreConfig(
            election_ticks=self.election_ticks,
            heartbeat_ticks=self.heartbeat_ticks,
            pre_vote=self.pre_vote,
            check_quorum=self.check_quorum,
            max_inflight_messages=self.max_inflight_messages,
            max_inflight_bytes=self.max_inflight_bytes,
            max_message_bytes=self.max_message_bytes,
            max_entry_bytes=self.max_entry_bytes,
            durable_log=self.durable,
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


class ClusterListener(Protocol):
    """Told, synchronously on the member's loop, of the cluster changes this member sees: each membership it
    applies (a committed membership entry, or the membership of a snapshot it restores) and each change of
    the leader it knows. The Manager turns these into its `MemberJoined`, `MemberLeft` and `LeaderChanged`
    events. A listener must not block or raise."""

    def membership_applied(self, index: int, membership: Membership) -> None: ...

    def leader_changed(self, term: int, leader_id: str | None) -> None: ...


@attrs.define
class _MembershipCall:
    """A membership change asked for on this member, waiting for the leader's `MembershipResponse`."""

    event: trio.Event = attrs.Factory(trio.Event)
    response: MembershipResponse | None = None


@attrs.define
class _MembershipRequests:
    """What a running member keeps for membership changes asked for on any member (`RaftNode.run` makes it)."""

    nursery: trio.Nursery  # where the leader makes the changes it was asked for
    calls: dict[str, _MembershipCall] = attrs.Factory(dict)  # request id -> a call made on this member
    # On the leader: a change being made (node id, address, voter, remove) -> who asked for it, each as
    # (origin, origin address, request id); all of them are answered when it is done.
    changes: dict[tuple[str, str, bool, bool], list[tuple[str, str, str]]] = attrs.Factory(dict)


_DRIVER_MESSAGES = frozenset({MembershipRequest, MembershipResponse})  # handled by the driver, not the core
logger = logging.getLogger(__name__)


@attrs.define
class _Waiter:
    """A caller waiting for its proposal or read. `event` is set when it is done (`resolve`, `fail`) and
    when its timer expires (`expire`: time to submit again, or to give up); the caller then replaces it."""

    event: trio.Event = attrs.Factory(trio.Event)
    done: bool = False
    result: bytes = b""
    error: Exception | None = None
    expired: bool = False
    due: float = math.inf  # member time at which the timer expires it; earlier heap entries for it are stale
    command: bytes | None = None  # a pending proposal's command, submitted again when the leader changes
    kind: EntryKind = EntryKind.NORMAL  # BATCH: `command` is several (`propose_many`)
    appended_term: int = 0  # the term in which this member, as leader, appended the proposal to its log
    waiting_for_room: bool = False  # a proposal queued for room (`_RoomTicket`): not to be submitted yet

    def submit_proposal(self, core: RaftCore, request_id: str) -> None:
        """Hand the proposal to the core, unless this member leads and already appended it in this term:
        then it is in the log and commits with it, and appending it again would only grow the log. A
        proposal the core refuses as too large fails here; NotLeaderError is the caller's to handle."""
        if self.done or self.command is None or self.waiting_for_room:
            return
        if core.role is Role.LEADER and self.appended_term == core.term:
            return
        try:
            appended = core.propose(self.command, request_id, self.kind) is not None
        except ProposalTooLarge as exc:
            self.fail(exc)
            return
        if appended:
            self.appended_term = core.term

    def resolve(self, result: bytes) -> None:
        if not self.done:
            self.done = True
            self.result = result
            self.event.set()

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.done = True
            self.error = error
            self.event.set()

    def expire(self) -> None:
        if not self.done:
            self.expired = True
            self.event.set()

    def rearm(self) -> None:
        """Wait again: after an expiry, or after a failure the caller retries."""
        self.done = self.expired = False
        self.error = None
        self.event = trio.Event()


@attrs.define
class _RoomTicket:
    """A proposal waiting for room among the `max_pending_proposals` in flight. `_leave_room` submits it
    when a place frees, so its caller sleeps once, until it is done, as if it had found room at once."""

    request_id: str
    waiter: _Waiter
    deadline: float
    waiting: bool = True  # False once it holds a place, or once its caller gave up waiting


@attrs.define
class _Batch:
    """durable=False: a `Storage.save` handed to the background writer; later batches merge into it."""

    hard_state: HardState | None
    entries: list[Entry]

    def merge(self, hard_state: HardState | None, entries: tuple[Entry, ...]) -> bool:
        """Fold a later save into this one, as writing both in turn would leave the storage; False (and
        unchanged) if the later entries do not follow on from or overlap this batch's."""
        if entries and self.entries:
            start = entries[0].index - self.entries[0].index
            if start > len(self.entries):
                return False
            if start <= 0:
                # The later save replaces every stored entry from its first index on: all of these.
                self.entries = list(entries)
            else:
                del self.entries[start:]
                self.entries.extend(entries)
        elif entries:
            self.entries = list(entries)
        if hard_state is not None:
            self.hard_state = hard_state
        return True


@attrs.frozen
class _SnapshotWrite:
    """durable=False: a `Storage.save_snapshot` handed to the background writer."""

    snapshot: Snapshot
    discard_log: bool


_TICK = object()
_REQUESTS = object()  # wakes the main loop to take the queued requests

# What callers queue for the main loop: a proposal (its request id and waiter), or a call to make.
_Request = tuple[str, _Waiter] | Callable[[], None]


# The dedup table in a snapshot: this magic, the count, every request id's length then every result's length
# (big-endian 32-bit), the request ids, the results; then the state machine's bytes. Laid out by column so
# that it is encoded and decoded by a few joins and one array conversion, not a call per entry: the table
# holds `dedup_capacity` ids and is encoded on the member's loop at every snapshot. (The first layout, a
# count and then id and result entry by entry, is still read: its count would have to be over a billion
# to spell this magic.)
_DEDUP_MAGIC = b"GDD2"
_BIG_ENDIAN_LENGTHS = sys.byteorder == "big"
_UINT32 = next(code for code in "IL" if array(code).itemsize == 4)


def _lengths_bytes(lengths: array[int]) -> bytes:
    if not _BIG_ENDIAN_LENGTHS:
        lengths.byteswap()
    return lengths.tobytes()


def encode_applied_state(dedup: dict[str, bytes], state: bytes) -> bytes:
    request_ids = list(dedup)
    ids = "".join(request_ids).encode()
    lengths = array(_UINT32, map(len, request_ids))
    if len(ids) != sum(lengths):  # some id is not ASCII: its length in bytes differs
        encoded = [request_id.encode() for request_id in request_ids]
        ids = b"".join(encoded)
        lengths = array(_UINT32, map(len, encoded))
    results = list(dedup.values())
    lengths.extend(map(len, results))
    return b"".join(
        (_DEDUP_MAGIC, struct.pack(">I", len(request_ids)), _lengths_bytes(lengths), ids, b"".join(results), state)
    )


def decode_applied_state(data: bytes) -> tuple[dict[str, bytes], bytes]:
    if data[:4] != _DEDUP_MAGIC:
        return _decode_applied_state_by_entry(data)
    (count,) = struct.unpack_from(">I", data, 4)
    if count == 0:
        return {}, data[8:]
    lengths = array(_UINT32)
    lengths.frombytes(data[8 : 8 + 8 * count])
    if not _BIG_ENDIAN_LENGTHS:
        lengths.byteswap()
    offset = 8 + 8 * count
    id_ends = list(accumulate(lengths[:count]))
    id_starts = [0, *id_ends[:-1]]
    ids_end = offset + id_ends[-1]
    ids_bytes = data[offset:ids_end]
    ids = ids_bytes.decode()
    if len(ids) == len(ids_bytes):  # all ASCII: offsets in bytes are offsets in characters
        request_ids = [ids[start:end] for start, end in zip(id_starts, id_ends, strict=True)]
    else:
        request_ids = [ids_bytes[start:end].decode() for start, end in zip(id_starts, id_ends, strict=True)]
    result_ends = [ids_end + end for end in accumulate(lengths[count:])]
    result_starts = [ids_end, *result_ends[:-1]]
    results = [data[start:end] for start, end in zip(result_starts, result_ends, strict=True)]
    state_start = result_ends[-1]
    return dict(zip(request_ids, results, strict=True)), data[state_start:]


def _decode_applied_state_by_entry(data: bytes) -> tuple[dict[str, bytes], bytes]:
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

    cluster_listener: ClusterListener | None = None  # set before `run` to hear of membership and leader changes
    _membership: _MembershipRequests | None = None  # while running

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
        self._requests: list[_Request] = []  # proposals and reads queued for the main loop
        self._proposals_in_flight = 0
        # Proposals waiting for `max_pending_proposals` to allow them, first come first served (`_take_room`).
        # Those that gave up stay until they reach the front.
        self._room_queue: deque[_RoomTicket] = deque()
        self._timers: list[tuple[float, int, _Waiter]] = []  # a heap of (due, sequence, waiter)
        self._timer_seq = 0
        self._timer_due = math.inf  # while the timer loop sleeps: the member time it sleeps until
        self._timer_scope: trio.CancelScope | None = None
        self._changed = trio.Event()  # set (and replaced) after every turn of the loop
        self._running = False
        self.applied_index = 0
        self._bytes_since_snapshot = 0  # bytes of commands applied since the last snapshot
        self._last_tick_at = 0.0
        self._tick_due = math.inf  # while the tick loop sleeps: the member time it sleeps until
        self._tick_scope: trio.CancelScope | None = None
        self._known_leader: str | None = None
        # The term and vote last written to storage: a hard state that changes only the commit index is
        # not written on its own (see `_persist`).
        self._stored_term_vote: tuple[int, str | None] = (0, None)
        self._unstored_hard_state: HardState | None = None  # a commit-only change not yet written
        # durable=False: writes handed to the background writer (`_writer_loop`), oldest first.
        self._writing = False  # the writer is in a save
        self._unwritten: list[_Batch | _SnapshotWrite] = []
        self._unwritten_entries = 0
        self._unwritten_added = trio.Event()  # set (and replaced) when `_unwritten` gains a write
        self._written = trio.Event()  # set (and replaced) each time the writer has written what it took
        self._write_now = trio.Event()  # set when the member waits for the writer: no gathering then
        self._writer_failed = False

    # --- lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> RaftNode:
        self._exit_stack, self._outer_scope = await start_service(self.run)
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
        self._stored_term_vote = (hard_state.term, hard_state.vote)
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
                    nursery.start_soon(self._timer_loop)
                    await nursery.start(self._serve_membership_requests)
                    if not self.config.durable:
                        nursery.start_soon(self._writer_loop)
                    if core.membership.voters == (self.node_id,):
                        core.campaign_now()
                    self._running = True
                    task_status.started()
                    await self._main_loop()
        finally:
            self._running = False
            self._endpoint = None
            self._requests.clear()
            error = NodeStoppedError(f"member {self.node_id} stopped")
            self._room_queue.clear()  # their waiters are among `_waiters`, failed below
            for waiter in self._waiters.values():
                waiter.fail(error)
            for waiter, _ in self._read_waiters.values():
                waiter.fail(error)
            self._changed.set()
            if self._unwritten and not self._writer_failed:
                # A clean stop keeps what was handed to the writer: the last writes, in order, unless a
                # write itself failed (the storage then refuses every later one).
                with trio.CancelScope(shield=True):
                    await self._write_unwritten()

    def _on_message(self, message: Message) -> None:
        if not isinstance(message, MESSAGE_TYPES):
            return
        if type(message) in _DRIVER_MESSAGES:
            self._on_membership_message(message)  # type: ignore[arg-type]
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
            if self._requests:
                self._take_requests(core)
            while core.has_ready():
                await self._process_ready(core, core.ready())
                if core.leader_id != self._known_leader:
                    self._known_leader = core.leader_id
                    self._resubmit(core)
                    if self.cluster_listener is not None:
                        self.cluster_listener.leader_changed(core.term, core.leader_id)
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
            if not waiter.done:
                with contextlib.suppress(NotLeaderError):
                    core.read_index(context)

    def _handle(self, core: RaftCore, event: object) -> None:
        if event is _TICK or event is _REQUESTS:
            pass  # the ticks it stands for were caught up on already; queued requests are taken each turn
        elif callable(event):
            event()
        else:
            core.step(event)  # type: ignore[arg-type]

    async def _process_ready(self, core: RaftCore, ready: Ready) -> None:
        if self._may_send_before_persisting(core, ready):
            # The leader writes its own entries in parallel with replicating them (dissertation §10.2.1):
            # nothing it sends depends on that write, and its own match counts towards a quorum only once
            # `advance` has marked the entries stable.
            self._send_messages(ready)
            await self._persist(ready)
        else:
            await self._persist(ready)
            self._send_messages(ready)
        self._apply(ready)
        core.advance(ready)
        await self._maybe_snapshot(core)

    def _may_send_before_persisting(self, core: RaftCore, ready: Ready) -> bool:
        """Whether `ready`'s messages may leave before its write: on a leader whose term and vote are
        already durable. Such a leader has been leader throughout the turn (becoming one changes the term
        or, from candidate, followed a durable vote), so its messages are AppendEntries, heartbeats and
        answers that depend on no entry of this batch; a follower's acknowledgement never goes early."""
        if core.role is not Role.LEADER or ready.snapshot is not None or not ready.messages:
            return False
        hard_state = ready.hard_state
        return hard_state is None or (hard_state.term, hard_state.vote) == self._stored_term_vote

    async def _persist(self, ready: Ready) -> None:
        """Write what `ready` asks to keep: a received snapshot, then entries and hard state in one save.

        A hard state that changes only the commit index is not written on its own, and so never delays
        applying (etcd's MustSync): the commit index is volatile state in Raft, and a restarted member
        learns it again from the leader. It still reaches the disk with the next write of entries.

        With ``durable=False`` nothing here waits for the disk: the writes go to the background writer
        (`_writer_loop`), and the member acknowledges and commits as if they were written.
        """
        if ready.snapshot is not None:
            await self._save_snapshot(ready.snapshot, discard_log=ready.discard_log)
            self._restore(ready.snapshot)
        hard_state = ready.hard_state or self._unstored_hard_state
        term_vote = self._stored_term_vote if hard_state is None else (hard_state.term, hard_state.vote)
        if ready.entries or term_vote != self._stored_term_vote:
            if self.config.durable:
                await self.storage.save(hard_state, ready.entries, sync=True)
            else:
                await self._hand_to_writer(hard_state, ready.entries)
                if term_vote != self._stored_term_vote:
                    # A new term or vote is written (not fsynced) before the messages that carry it go
                    # out: a member killed (kill -9) just after voting must not come back and vote again
                    # in the same term, which could elect two leaders. Terms and votes change once per
                    # election, so this costs nothing under load.
                    await self._wait_for_writer()
            self._stored_term_vote, self._unstored_hard_state = term_vote, None
        else:
            self._unstored_hard_state = hard_state
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
        kind = entry.kind
        if kind is EntryKind.NORMAL or kind is EntryKind.BATCH:
            cached = self._dedup.get(entry.request_id) if entry.request_id else None
            if cached is not None:
                result = cached
            else:
                if kind is EntryKind.NORMAL:
                    result = self.state_machine.apply(entry.index, entry.data)
                else:
                    apply, index = self.state_machine.apply, entry.index
                    result = encode_commands([apply(index, command) for command in decode_commands(entry.data)])
                if entry.request_id:
                    self._remember(entry.request_id, result)
            self._bytes_since_snapshot += len(entry.data)
        elif entry.membership is not None and self.cluster_listener is not None:
            self.cluster_listener.membership_applied(entry.index, entry.membership)
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
        self._bytes_since_snapshot = 0
        if self.cluster_listener is not None:
            self.cluster_listener.membership_applied(snapshot.meta.index, snapshot.meta.membership)
        if self.observer is not None:
            self.observer.restored(self.node_id, snapshot)

    async def _maybe_snapshot(self, core: RaftCore) -> None:
        applied = core.log.applied
        last_snapshot = core.snapshot.meta.index if core.snapshot is not None else 0
        config = self.config
        few_entries = applied - last_snapshot < config.snapshot_threshold
        if few_entries and self._bytes_since_snapshot < config.snapshot_threshold_bytes:
            return
        data = encode_applied_state(self._dedup, self.state_machine.snapshot())
        snapshot = Snapshot(core.snapshot_meta(applied), data)
        self._bytes_since_snapshot = 0
        await self._save_snapshot(snapshot, discard_log=False)
        core.compact(snapshot, self._compaction_point(core, applied))

    def _compaction_point(self, core: RaftCore, applied: int) -> int:
        """The index up to which the log is discarded after a snapshot at `applied`: `snapshot_trailing`
        entries stay behind it, fewer if they would hold more than `snapshot_trailing_bytes`."""
        kept_bytes, index = 0, applied
        lowest = max(applied - self.config.snapshot_trailing, core.log.offset)
        while index > lowest:
            kept_bytes += core.log.entry(index).size()
            if kept_bytes > self.config.snapshot_trailing_bytes:
                break
            index -= 1
        return index

    # --- durable=False: the background writer --------------------------------------------------------------

    async def _save_snapshot(self, snapshot: Snapshot, *, discard_log: bool) -> None:
        if self.config.durable:
            await self.storage.save_snapshot(snapshot, discard_log=discard_log)
        else:
            self._unwritten.append(_SnapshotWrite(snapshot, discard_log))
            self._unwritten_added.set()

    async def _hand_to_writer(self, hard_state: HardState | None, entries: tuple[Entry, ...]) -> None:
        """Queue a save for `_writer_loop`, merged into the last queued one when it can be; waits (the
        only wait) while more than `max_unwritten_entries` entries are queued."""
        unwritten = self._unwritten
        last = unwritten[-1] if unwritten else None
        if not isinstance(last, _Batch) or not last.merge(hard_state, entries):
            unwritten.append(_Batch(hard_state, list(entries)))
        self._unwritten_entries += len(entries)
        self._unwritten_added.set()
        while self._unwritten_entries > self.config.max_unwritten_entries:
            self._write_now.set()
            await self._written.wait()

    async def _writer_loop(self) -> None:
        """durable=False: write what `_persist` and `_maybe_snapshot` handed over, in order, without fsync,
        each save in one hop to the storage (a `FileStorage` writes in a worker thread). Saves queued
        within `write_behind_delay` of the first, or while the previous ones were written, go as one.
        What is still queued when the member stops is written then (`run`); a crash loses it, as it may
        lose any write that was not fsynced."""
        while True:
            if not self._unwritten:
                await self._unwritten_added.wait()
                self._unwritten_added = trio.Event()
            delay = self.config.write_behind_delay
            if delay > 0 and not self._write_now.is_set():
                with trio.move_on_at(self.clock.trio_deadline(self.clock.now() + delay)):
                    await self._write_now.wait()  # gather (`write_behind_delay`), unless asked to hurry
            self._write_now = trio.Event()
            await self._write_unwritten()

    async def _wait_for_writer(self) -> None:
        """Return once everything handed to the writer so far is written."""
        while self._unwritten or self._writing:
            self._write_now.set()
            await self._written.wait()

    async def _write_unwritten(self) -> None:
        self._writing = True
        try:
            await self._write_queued()
        finally:
            self._writing = False

    async def _write_queued(self) -> None:
        while self._unwritten:
            writes, self._unwritten = self._unwritten, []
            self._unwritten_entries = 0
            for position, write in enumerate(writes):
                try:
                    if isinstance(write, _Batch):
                        await self.storage.save(write.hard_state, write.entries, sync=False)
                    else:
                        await self.storage.save_snapshot(write.snapshot, discard_log=write.discard_log)
                except trio.Cancelled:
                    # Whether this write got through is not known: it goes back to the front with those
                    # after it, for `run` to write at the stop (writing a save or a snapshot twice leaves
                    # the storage as writing it once).
                    self._unwritten[:0] = writes[position:]
                    raise
                except BaseException:
                    self._writer_failed = True
                    raise
            self._written.set()
            self._written = trio.Event()

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

    def _enqueue(self, request: _Request) -> None:
        """Hand `request` to the main loop without waiting: the loop takes every queued request at each
        turn, so proposals arriving together cost one wake-up, not one channel event each."""
        self._requests.append(request)
        if len(self._requests) == 1:
            # The first request since the loop last took them: wake the loop if it is waiting. If the
            # channel is full the loop is busy and takes the queue at its next turn anyway.
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._send_events.send_nowait(_REQUESTS)

    def _take_requests(self, core: RaftCore) -> None:
        requests, self._requests = self._requests, []
        for request in requests:
            if isinstance(request, tuple):
                request_id, waiter = request
                try:
                    waiter.submit_proposal(core, request_id)
                except NotLeaderError as exc:
                    waiter.fail(exc)
            else:
                request()

    async def _await_with_retries(
        self,
        waiter: _Waiter,
        request: _Request,
        deadline: float,
        what: str,
        now: float | None = None,
        ticket: _RoomTicket | None = None,
    ) -> bytes:
        """Queue `request`, wait, and queue it again each election timeout until done or `deadline` (on
        the member's clock) passes. The waits are timed by `_timer_loop`, not by a cancel scope each: a
        scope per proposal cost more than the rest of proposing. `now`, if given, is the member's time
        (the caller just read it: reading the clock is a noticeable part of a proposal's cost). While
        `ticket` waits for room, `_leave_room` queues the request (and times the retry) instead."""
        clock = self.clock
        if now is None:
            now = clock.now()
        timeout = deadline - now
        saw_leader = False
        while now < deadline:
            if ticket is not None and ticket.waiting:
                self._set_timer(waiter, deadline)
            else:
                self._enqueue(request)
                self._set_timer(waiter, min(deadline, now + self.config.election_timeout))
            await waiter.event.wait()
            if waiter.done:
                if waiter.error is not None:
                    if isinstance(waiter.error, NotLeaderError) and waiter.error.leader_id is None:
                        # No leader right now: wait for one, then try again.
                        waiter.rearm()
                        with trio.move_on_at(clock.trio_deadline(deadline)):
                            await self._wait_until(lambda: self._core().leader_id is not None)
                            saw_leader = True
                        now = clock.now()
                        continue
                    raise waiter.error
                return waiter.result
            waiter.rearm()
            saw_leader = saw_leader or self._core().leader_id is not None
            now = clock.now()
        if saw_leader or self._core().leader_id is not None:
            raise ProposalTimeout(f"{what} did not complete within {timeout:g} s")
        raise NoQuorumError(f"no leader for {timeout:g} s; {what} not done")

    def _set_timer(self, waiter: _Waiter, due: float) -> None:
        waiter.due = due
        self._timer_seq += 1
        heapq.heappush(self._timers, (due, self._timer_seq, waiter))
        if due < self._timer_due and self._timer_scope is not None:
            self._timer_scope.cancel()

    async def _timer_loop(self) -> None:
        """Expire the waiters whose time has come (`_Waiter.due`), sleeping until the earliest one."""
        timers = self._timers
        while True:
            now = self.clock.now()
            while timers and timers[0][0] <= now:
                due, _, waiter = heapq.heappop(timers)
                if waiter.due == due:
                    waiter.expire()
            due = timers[0][0] if timers else math.inf
            with trio.CancelScope() as scope:
                self._timer_scope, self._timer_due = scope, due
                if due == math.inf:
                    await trio.sleep_forever()
                else:
                    await self.clock.sleep_until(due)
            self._timer_scope, self._timer_due = None, math.inf

    def _take_room(self, request_id: str, waiter: _Waiter, deadline: float) -> _RoomTicket | None:
        """Take a place among the `max_pending_proposals` proposals of this member in flight (None), or
        queue for one (backpressure: a backlog beyond that only lengthens every proposal's wait until they
        all time out together, and each retry costs a wake-up).

        Places go first come, first served: a proposal that finds others waiting queues behind them, and
        one that finishes hands its place to the first still waiting (`_leave_room`). When a finishing
        proposal's caller could take the place back at once, a writer that always proposes again kept it,
        and at windows of 10,000 and more about 20,000 proposals per benchmark run waited until their
        timeout. A queued proposal's caller is not woken to be given its place; it is submitted for it.
        """
        queue = self._room_queue
        while queue and not queue[0].waiting:
            queue.popleft()  # its caller gave up waiting
        if self._proposals_in_flight < self.config.max_pending_proposals and not queue:
            self._proposals_in_flight += 1
            return None
        ticket = _RoomTicket(request_id, waiter, deadline)
        queue.append(ticket)
        if not waiter.appended_term:  # not the same request as a proposal already submitted
            waiter.waiting_for_room = True  # not even when a new leader is known (`_resubmit`)
        return ticket

    def _leave_room(self) -> None:
        """A proposal is done: its place goes to the first proposal still waiting for one, submitted now."""
        queue = self._room_queue
        while queue:
            ticket = queue.popleft()
            if ticket.waiting:
                ticket.waiting = ticket.waiter.waiting_for_room = False
                self._enqueue((ticket.request_id, ticket.waiter))
                retry_at = self.clock.now() + self.config.election_timeout
                self._set_timer(ticket.waiter, min(ticket.deadline, retry_at))
                return
        self._proposals_in_flight -= 1

    async def propose(self, command: bytes, *, timeout: float | None = None, request_id: str | None = None) -> bytes:
        """Replicate `command` and return what the state machine's `apply` returned for it.

        Made on any member: a follower forwards it to the leader. A proposal retried with the same
        `request_id` (by this call, or by the caller after a timeout) is applied once. While
        `max_pending_proposals` proposals of this member are in flight, waits for one of them to finish.
        Raises ProposalTimeout or NoQuorumError after `timeout` seconds; the command may still be applied.
        Raises ProposalTooLarge at once if its entry would exceed `RaftConfig.max_entry_bytes`.
        """
        return await self._propose(command, EntryKind.NORMAL, timeout, request_id)

    async def propose_many(
        self, commands: Sequence[bytes], *, timeout: float | None = None, request_id: str | None = None
    ) -> list[bytes]:
        """Replicate `commands` together and return what `apply` returned for each, in order.

        The commands travel and are stored as one log entry, so they cost about what one proposal costs
        plus their bytes, and they are applied all or none: every member applies them one after another,
        in order, with nothing between them, each by `StateMachine.apply` with that entry's index (the
        same index for all of them). Otherwise as `propose`: one `request_id` for the batch, retried
        batches are applied once, and the batch counts as one of the `max_pending_proposals`. Raises
        ProposalTooLarge at once if the entry (the commands, 4 bytes each for their lengths, and 4 more)
        would exceed `RaftConfig.max_entry_bytes`.
        """
        if not commands:
            return []
        results = await self._propose(encode_commands(commands), EntryKind.BATCH, timeout, request_id)
        return decode_commands(results)

    async def _propose(self, data: bytes, kind: EntryKind, timeout: float | None, request_id: str | None) -> bytes:
        request_id = request_id or self.new_request_id()
        cached = self._dedup.get(request_id)
        if cached is not None:
            return cached
        check_proposal_size(data, request_id, self.config.max_entry_bytes)
        self._check_running()
        now = self.clock.now()
        deadline = now + (self.config.default_timeout if timeout is None else timeout)
        waiter = self._waiters.setdefault(request_id, _Waiter(command=data, kind=kind))
        ticket = self._take_room(request_id, waiter, deadline)
        try:
            return await self._await_with_retries(waiter, (request_id, waiter), deadline, "proposal", now, ticket)
        finally:
            if ticket is not None and ticket.waiting:
                # It never got a place: the next to leave skips it.
                ticket.waiting = ticket.waiter.waiting_for_room = False
            else:
                self._leave_room()
            if self._waiters.get(request_id) is waiter:
                del self._waiters[request_id]

    async def read(self, query: bytes, *, timeout: float | None = None) -> bytes:
        """A linearizable read (ReadIndex), served on this member once it has applied the read point."""
        self._check_running()
        core = self._core()
        self._read_context += 1
        context = self._read_context
        waiter = _Waiter()
        self._read_waiters[context] = (waiter, query)

        def submit() -> None:
            if waiter.done:
                return
            try:
                core.read_index(context)
            except NotLeaderError as exc:
                waiter.fail(exc)

        deadline = self.clock.now() + (self.config.default_timeout if timeout is None else timeout)
        try:
            return await self._await_with_retries(waiter, submit, deadline, "read")
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

    # --- membership changes asked for on any member, and joining -------------------------------------------
    #
    # A change asked for on any member travels as a `MembershipRequest`: to the leader the member knows (to
    # the known peers in turn if it knows none, as a joining member does), forwarded once by a follower to
    # its leader. The leader makes it with `add_member` / `remove_member`, in one task per distinct change
    # however many times it is asked for, and answers every asker with a `MembershipResponse`. The asker
    # asks again each election timeout until answered: both changes are idempotent, so asking twice, or a
    # leader that changed, costs only time.

    async def request_add_member(
        self, node_id: str, address: str, *, voter: bool = True, timeout: float | None = None
    ) -> None:
        """`add_member` made on any member: the request goes to the leader, which adds `node_id` as a learner
        and, if `voter`, promotes it once caught up. Returns once the leader has done so; raises
        `MembershipChangeError` if the leader refuses (`node_id` is a member at another address), and
        `ProposalTimeout` (or `NoQuorumError` if no leader was known) after `timeout` seconds."""
        timeout = self.config.default_timeout * 4 if timeout is None else timeout
        await self._ask_for_membership_change(node_id, address, voter, False, timeout)

    async def request_remove_member(self, node_id: str, *, timeout: float | None = None) -> None:
        """`remove_member` made on any member (the leader too can be removed); errors as `request_add_member`."""
        timeout = self.config.default_timeout if timeout is None else timeout
        await self._ask_for_membership_change(node_id, "", True, True, timeout)

    async def join_cluster(self, *, voter: bool = True) -> None:
        """Ask the cluster to add this member (created with ``join=True``), until it is a member (a voter, if
        `voter`) of the committed membership. Asks the leader it knows, or else its `peers` in turn, again
        and again with exponential backoff and jitter (this member's clock and rng). Returns at once if this
        member's storage shows it joined already: a restarted member does not ask again."""
        self._check_running()
        core = self._core()
        known = core.membership.get(self.node_id)
        if known is not None and (known.voter or not voter):
            return

        def joined() -> bool:
            member = core.log.membership_at(core.log.committed).get(self.node_id)
            return member is not None and (member.voter or not voter)

        base = self.config.election_timeout
        attempt = 0
        while not joined():
            try:
                await self._ask_for_membership_change(
                    self.node_id, self.address, voter, False, self.config.default_timeout * 4
                )
            except MembershipChangeError as exc:
                logger.warning("member %s: the cluster refused to add it: %s", self.node_id, exc)
            except (ProposalTimeout, NoQuorumError) as exc:
                logger.info("member %s: not added yet: %s", self.node_id, exc)
            delay = min(base * 2**attempt, base * 32) * (0.5 + 0.5 * self.rng.random())
            attempt += 1
            with self.clock.move_on_after(delay):
                await self._wait_until(joined)

    async def _ask_for_membership_change(
        self, node_id: str, address: str, voter: bool, remove: bool, timeout: float
    ) -> None:
        self._check_running()
        requests = self._membership
        if requests is None:
            raise NodeStoppedError(f"member {self.node_id} is not running")
        clock = self.clock
        deadline = clock.now() + timeout
        request_id = self.new_request_id()
        call = requests.calls[request_id] = _MembershipCall()
        hint: str | None = None
        saw_leader = False
        what = f"{'removing' if remove else 'adding'} {node_id}"
        try:
            attempt = 0
            while (now := clock.now()) < deadline:
                core = self._core()
                saw_leader = saw_leader or core.leader_id is not None
                target = self._membership_target(core, hint, attempt)
                attempt += 1
                hint = None
                if target is not None:
                    request = MembershipRequest(
                        self.node_id, target, core.term, request_id, self.node_id, self.address, node_id, address,
                        voter, remove,
                    )
                    if target == self.node_id:
                        self._on_membership_request(requests, request)
                    else:
                        self._send_membership_message(request)
                with trio.move_on_at(clock.trio_deadline(min(deadline, now + self.config.election_timeout))):
                    await call.event.wait()
                response, call.response, call.event = call.response, None, trio.Event()
                if response is None:
                    continue
                if response.outcome is MembershipOutcome.DONE:
                    return
                if response.outcome is MembershipOutcome.REFUSED:
                    raise MembershipChangeError(f"{what} refused by {response.source}: {response.reason}")
                saw_leader = saw_leader or bool(response.leader_id) or response.outcome is MembershipOutcome.TIMEOUT
                hint = response.leader_id or None
                # Not the leader, or not done in time: ask again after a heartbeat interval (the answer came
                # at once, and asking at once again would spin).
                pause = self.config.tick_interval * self.config.heartbeat_ticks
                await clock.sleep_until(min(deadline, clock.now() + pause))
        finally:
            requests.calls.pop(request_id, None)
        if saw_leader:
            raise ProposalTimeout(f"{what} did not complete within {timeout:g} s")
        raise NoQuorumError(f"no leader for {timeout:g} s; {what} not done")

    def _membership_target(self, core: RaftCore, hint: str | None, attempt: int) -> str | None:
        """Whom to ask: this member if it leads, else the leader named in the last answer or the one it
        knows, else (a joining member, or one that knows no leader) its peers and members in turn."""
        if core.role is Role.LEADER:
            return self.node_id
        for known in (hint, core.leader_id):
            if known is not None and known != self.node_id and self._address_of(known) is not None:
                return known
        candidates = sorted((set(core.membership.ids) | set(self.peers)) - {self.node_id})
        return candidates[attempt % len(candidates)] if candidates else None

    def _send_membership_message(self, message: MembershipRequest | MembershipResponse) -> None:
        address = self._address_of(message.target)
        if address is not None and self._endpoint is not None:
            self._endpoint.send(message.target, address, message)

    async def _serve_membership_requests(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hold the nursery in which the leader makes the membership changes it is asked for."""
        try:
            async with trio.open_nursery() as nursery:
                self._membership = _MembershipRequests(nursery)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._membership = None

    def _on_membership_message(self, message: MembershipRequest | MembershipResponse) -> None:
        requests = self._membership
        if requests is None or message.target != self.node_id:
            return  # not running yet, or meant for another member (a stale or wrong address): ignored
        if isinstance(message, MembershipResponse):
            call = requests.calls.get(message.request_id)
            if call is not None and call.response is None:
                call.response = message
                call.event.set()
        else:
            self._on_membership_request(requests, message)

    def _on_membership_request(self, requests: _MembershipRequests, request: MembershipRequest) -> None:
        core = self.core
        if core is None:
            return
        if core.role is Role.LEADER:
            key = (request.node_id, request.address, request.voter, request.remove)
            asker = (request.origin, request.origin_address, request.request_id)
            askers = requests.changes.get(key)
            if askers is None:
                requests.changes[key] = [asker]
                requests.nursery.start_soon(self._make_requested_change, requests, key)
            elif asker not in askers:
                askers.append(asker)
            return
        leader = core.leader_id
        forwarded = request.source != request.origin
        if leader is not None and leader != self.node_id and not forwarded and self._address_of(leader) is not None:
            self._send_membership_message(attrs.evolve(request, source=self.node_id, target=leader, term=core.term))
            return
        self._answer_membership_request(
            request.origin, request.origin_address, request.request_id, MembershipOutcome.NOT_LEADER, leader or ""
        )

    def _answer_membership_request(
        self, origin: str, origin_address: str, request_id: str, outcome: MembershipOutcome, leader_id: str = "",
        reason: str = "",
    ) -> None:
        core = self.core
        response = MembershipResponse(
            self.node_id, origin, core.term if core is not None else 0, request_id, outcome, leader_id, reason
        )
        if origin == self.node_id:
            self._on_membership_message(response)
        elif self._endpoint is not None:
            self._endpoint.send(origin, origin_address, response)  # the asker may not be a member yet

    async def _make_requested_change(self, requests: _MembershipRequests, key: tuple[str, str, bool, bool]) -> None:
        """On the leader: make a change it was asked for, then answer everyone who asked for it."""
        node_id, address, voter, remove = key
        outcome, leader_id, reason = MembershipOutcome.DONE, "", ""
        try:
            if remove:
                await self.remove_member(node_id)
            else:
                current = self._core().membership.get(node_id)
                if current is not None and current.address != address:
                    raise MembershipChangeError(f"{node_id!r} is a member already, at {current.address!r}")
                if current is None or (voter and not current.voter):
                    await self.add_member(node_id, address, voter=voter)
        except NotLeaderError as exc:
            outcome, leader_id = MembershipOutcome.NOT_LEADER, exc.leader_id or ""
        except MembershipChangeError as exc:
            outcome = MembershipOutcome.TIMEOUT if exc.retryable else MembershipOutcome.REFUSED
            reason = str(exc)
        except (ProposalTimeout, NoQuorumError) as exc:
            outcome, reason = MembershipOutcome.TIMEOUT, str(exc)
        except NodeStoppedError:
            return
        finally:
            askers = requests.changes.pop(key, [])
        for origin, origin_address, request_id in askers:
            self._answer_membership_request(origin, origin_address, request_id, outcome, leader_id, reason)

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


__all__ = ["ClusterListener", "Message", "RaftConfig", "RaftNode", "RaftObserver", "RaftStatus"]
