"""One simulated run: a Raft cluster, a key-value workload and a fault schedule, all drawn from one seed.

The members are real `RaftNode`s over the memory transport of a `SimNetwork`, each with its own skewed
clock, RNG and crash-prone `MemoryStorage`, inside one `trio.run` on a virtual clock with trio's
scheduler seeded. Everything random is drawn from RNGs derived from the seed, so a seed replays byte for
byte; `digest` is a hash of the whole event trace.

A run has two phases. In the fault phase, faults fire at random (each kind switched on or off by the
seed): latency, loss, duplication, reordering, partitions, one-way partitions, clogged links, crashes
and restarts that lose unsynced writes, and clock jumps. In the heal phase the network heals and every
member restarts; the run then checks liveness: a leader is elected and every client completes an
operation within a bounded virtual time. The safety checkers watch all along, and the clients' history is
checked for linearizability at the end.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from graft_trio.raft import (
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    RaftConfig,
    RaftNode,
)
from graft_trio.raft.core import RaftCore, Ready, Role
from graft_trio.raft.messages import Entry, EntryKind, Message, RequestVoteResponse, Snapshot
from graft_trio.raft.storage import MemoryStorage
from sims import kv
from sims.checkers import RaftCheckers, Violation
from sims.clock import SimClock, VirtualTime
from sims.linearizability import Operation, check_history
from sims.network import Latency, NetworkFaults, SimNetwork
from sims.scheduler import run_simulation
from transports.memory import MemoryEndpoint, MemoryTransport


@attrs.frozen
class SimOptions:
    seed: int
    nodes: int = 5
    fault_time: float = 20.0
    heal_time: float = 15.0
    clients: int = 3
    keys: int = 3
    trace: bool = False


@attrs.frozen
class FaultPlan:
    """Which faults a seed switches on, and how hard each one hits. Drawn from the seed."""

    latency: Latency
    loss: float
    duplication: float
    reorder: float
    partitions: bool
    one_way: bool
    clogging: bool
    crashes: bool
    leader_crashes: float  # probability of crashing a member right after it becomes leader
    voter_crashes: float  # probability of crashing a member right after it grants a vote
    clock_jumps: bool
    disk_latency: float  # mean seconds per fsync
    fault_interval: float  # mean seconds between fault events
    raft: RaftConfig

    @classmethod
    def draw(cls, rng: random.Random) -> FaultPlan:
        def maybe(probability: float) -> bool:
            return rng.random() < probability

        latency = Latency(
            base=rng.choice([0.0002, 0.001, 0.005]),
            tail=rng.choice(["none", "exponential", "lognormal"]),
            tail_scale=rng.choice([0.001, 0.005, 0.02]),
        )
        raft = RaftConfig(
            max_message_bytes=rng.choice([120, 400, 1024 * 1024]),
            max_inflight_messages=rng.choice([2, 8, 64]),
            snapshot_threshold=rng.choice([30, 100, 8192]),
            snapshot_trailing=rng.choice([0, 5, 50]),
            snapshot_chunk_bytes=rng.choice([64, 512, 65536]),
            default_timeout=2.0,
            pre_vote=maybe(0.7),
            check_quorum=maybe(0.7),
        )
        return cls(
            latency=latency,
            loss=rng.choice([0.0, 0.01, 0.05, 0.15]) if maybe(0.6) else 0.0,
            duplication=rng.choice([0.01, 0.05]) if maybe(0.4) else 0.0,
            reorder=rng.choice([0.02, 0.1]) if maybe(0.4) else 0.0,
            partitions=maybe(0.6),
            one_way=maybe(0.4),
            clogging=maybe(0.4),
            crashes=maybe(0.8),
            leader_crashes=rng.choice([0.0, 0.3, 0.6]),
            voter_crashes=rng.choice([0.0, 0.1, 0.3]),
            clock_jumps=maybe(0.4),
            disk_latency=rng.choice([0.0001, 0.001, 0.005]),
            fault_interval=rng.choice([0.2, 0.5, 1.5]),
            raft=raft,
        )


@attrs.frozen
class SimResult:
    seed: int
    violations: tuple[Violation, ...]
    digest: str
    virtual_time: float
    operations: int
    completed_operations: int
    elections: int
    crashes: int
    messages: int
    linearizability: str
    trace: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations


class Trace:
    """The run's event log: hashed as it grows (the digest), and kept only when asked for.

    The digest is the SHA-256 of every line, each ending in a newline, in order. Lines are hashed a few
    thousand at a time (the hash of the concatenation is the same) and each instant's time stamp is
    formatted once: a run adds tens of thousands of lines.
    """

    _BATCH = 4096

    def __init__(self, now: Callable[[], float], keep: bool) -> None:
        self._now = now
        self._hash = hashlib.sha256()
        self.keep = keep
        self.lines: list[str] = []
        self._unhashed: list[str] = []
        self._stamp_time = math.nan
        self._stamp = ""

    def add(self, kind: str, detail: str) -> None:
        now = self._now()
        if now != self._stamp_time:
            self._stamp_time = now
            self._stamp = f"{now:.9f} "
        line = f"{self._stamp}{kind} {detail}"
        self._unhashed.append(line)
        if self.keep:
            self.lines.append(line)
        if len(self._unhashed) >= self._BATCH:
            self._hash_unhashed()

    def _hash_unhashed(self) -> None:
        if self._unhashed:
            self._unhashed.append("")  # the newline after the last line
            self._hash.update("\n".join(self._unhashed).encode())
            self._unhashed = []

    def digest(self) -> str:
        self._hash_unhashed()
        return self._hash.hexdigest()


class _ObservedNetwork(SimNetwork):
    """The simulated network, telling the checkers what each member sent."""

    def __init__(self, sim: Simulation, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.sim = sim

    def deliver(self, source: MemoryEndpoint, target_address: str, message: Message) -> None:
        self.sim.message_sent(message)
        super().deliver(source, target_address, message)


class MemberRun(Protocol):
    """A member's ``run``: `RaftNode.run` or `Manager.run`."""

    def __call__(self, *, task_status: trio.TaskStatus[None] = ...) -> Awaitable[None]: ...


@attrs.define(eq=False)
class SimMember:
    node_id: str
    address: str
    storage: MemoryStorage
    clock: SimClock
    incarnation: int = 0
    node: RaftNode | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    alive: bool = False


class Simulation:
    def __init__(self, options: SimOptions) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        self.plan = FaultPlan.draw(random.Random(self.rng.getrandbits(64)))
        self.fault_rng = random.Random(self.rng.getrandbits(64))
        self.client_rng = random.Random(self.rng.getrandbits(64))
        self.network_seed = self.rng.getrandbits(64)
        self.member_seed = self.rng.getrandbits(64)
        self.history: list[Operation] = []
        self.crashes = 0
        self.elections = 0
        self.members: dict[str, SimMember] = {}
        self.heal_started: float | None = None
        self.successes_after_heal: dict[int, int] = {}
        # Who leads, for the liveness check: since when the cluster has had no leader, and whether it had one
        # at some point of the heal phase.
        self.leading: dict[str, bool] = {}
        self.leaderless_since: float | None = 0.0
        self.leader_after_heal = False
        self._chaos_send, self._chaos_receive = trio.open_memory_channel[tuple[str, str]](1024)

    # --- observer hooks (the checkers, the trace, the targeted faults) --------------------------------

    def persisted(self, node_id: str, core: RaftCore, ready: Ready) -> None:
        self.checkers.persisted(node_id, core, ready)
        soft = ready.soft_state
        if soft is not None:
            self.trace.add("role", f"{node_id} {soft.role.value} term={soft.term} leader={soft.leader_id}")
            self._set_leading(node_id, soft.role is Role.LEADER)
            if soft.role is Role.LEADER:
                self.elections += 1
                if self.in_fault_phase() and self.fault_rng.random() < self.plan.leader_crashes:
                    self._chaos_send.send_nowait(("crash-new-leader", node_id))

    def applied(self, node_id: str, entry: Entry) -> None:
        self.checkers.applied(node_id, entry)

    def restored(self, node_id: str, snapshot: Snapshot) -> None:
        self.trace.add("restore", f"{node_id} index={snapshot.meta.index} term={snapshot.meta.term}")
        self.checkers.restored(node_id, snapshot)

    def message_sent(self, message: Message) -> None:
        self.checkers.message_sent(message)
        if (
            isinstance(message, RequestVoteResponse)
            and message.granted
            and not message.pre_vote
            and self.in_fault_phase()
            and self.fault_rng.random() < self.plan.voter_crashes
        ):
            self._chaos_send.send_nowait(("crash-voter", message.source))

    def _maybe_crash_during_leader_sync(self, node_id: str) -> None:
        """Sometimes crash a new leader while its first entry (the no-op of its term) is being synced.

        It then holds an entry of its term that nobody else has seen, which is what the Figure 8 scenario
        of the Raft paper is made of.
        """
        node = self.members[node_id].node
        core = node.core if node is not None else None
        if core is None or core.role is not Role.LEADER or not self.in_fault_phase():
            return
        last = core.log.last_index
        new_leader_syncing = core.log.stable_index < last and core.log.entry(last).kind == EntryKind.NOOP
        if new_leader_syncing and self.fault_rng.random() < self.plan.leader_crashes:
            self._chaos_send.send_nowait(("crash-during-leader-sync", node_id))

    def in_fault_phase(self) -> bool:
        return self.heal_started is None

    # --- members ----------------------------------------------------------------------------------------

    def _build_members(self) -> None:
        rng = random.Random(self.member_seed)
        ids = [f"n{i + 1}" for i in range(self.options.nodes)]
        for node_id in ids:
            skew = rng.uniform(-30.0, 30.0) if self.plan.clock_jumps else 0.0
            drift = rng.uniform(-0.01, 0.01) if self.plan.clock_jumps else 0.0
            clock = self.virtual_time.clock(node_id, offset=skew, drift=drift)
            disk_rng = random.Random(rng.getrandbits(64))

            async def sync_delay(disk_rng: random.Random = disk_rng, node_id: str = node_id) -> None:
                self._maybe_crash_during_leader_sync(node_id)
                # The disk takes virtual time, not time on the member's skewed and drifting clock.
                delay = disk_rng.expovariate(1.0 / self.plan.disk_latency)
                await self.virtual_time.sleep_until(self.virtual_time.now() + delay)

            self.members[node_id] = SimMember(node_id, f"sim://{node_id}", MemoryStorage(sync_delay), clock)

    async def start_member(self, nursery: trio.Nursery, member: SimMember) -> None:
        member.incarnation += 1
        peers = {m.node_id: m.address for m in self.members.values() if m is not member}
        node = RaftNode(
            member.node_id,
            member.address,
            peers,
            state_machine=kv.KeyValue(),
            storage=member.storage,
            transport=MemoryTransport(self.network),
            config=self.plan.raft,
            clock=member.clock,
            rng=random.Random(f"{self.member_seed}/{member.node_id}/{member.incarnation}"),
            observer=self,
        )
        member.node = node
        self.mark_started(member)
        await self.run_member(nursery, member, node.run)

    def mark_started(self, member: SimMember) -> None:
        """A new incarnation of `member` is about to run: give it a cancel scope (its crash switch)."""
        member.scope = trio.CancelScope()
        member.stopped = trio.Event()
        member.alive = True
        self.trace.add("start", f"{member.node_id} incarnation={member.incarnation}")

    async def run_member(self, nursery: trio.Nursery, member: SimMember, run: MemberRun) -> None:
        """Start `run` (a member's ``run(task_status=...)``) under the member's cancel scope; return once it
        serves. `member.stopped` is set when it ends, however it ends."""

        async def guarded(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            assert member.scope is not None and member.stopped is not None
            try:
                with member.scope:
                    await run(task_status=task_status)
            finally:
                member.stopped.set()

        await nursery.start(guarded)

    async def crash_member(self, member: SimMember) -> None:
        if not member.alive or member.scope is None or member.stopped is None:
            return
        member.alive = False
        self._set_leading(member.node_id, False)
        member.scope.cancel()
        await member.stopped.wait()
        # Unsynced writes are lost, except perhaps a prefix of them (a torn write that made it to disk).
        pending = member.storage.pending_writes
        keep = self.fault_rng.randint(0, pending) if pending else 0
        member.storage.crash(keep_pending=keep)
        self.crashes += 1
        self.trace.add("crash", f"{member.node_id} pending={pending} kept={keep}")
        self.checkers.crashed(member.node_id, await member.storage.load())

    # --- the workload ----------------------------------------------------------------------------------

    async def client(self, client_id: int, stop: trio.Event) -> None:
        """Issue operations through random live members until `stop`, recording each in the history: a get
        (`node.read`), a put or append (`node.propose`), or a batch of two to four puts and appends
        (`node.propose_many`), whose writes go into the history one by one, in the batch's order, sharing
        its call and return time and numbered as one batch."""
        rng = random.Random(self.client_rng.getrandbits(64))
        sequence = 0
        clock = self.virtual_time
        while not stop.is_set():
            alive = [m for m in self.members.values() if m.alive and m.node is not None]
            if not alive:
                await clock.sleep_until(clock.now() + 0.05)
                continue
            member = rng.choice(alive)
            node = member.node
            assert node is not None
            roll = rng.random()
            sequence += 1
            number = sequence
            call = clock.now()
            get_key: str | None = None
            # (kind, key, value) of each write: one for a put or append, two to four for a batch.
            writes: list[tuple[str, str, str]] = []
            if roll < GET_SHARE:
                get_key = self._draw_key(rng)
            else:
                count = rng.randint(2, 4) if roll < GET_SHARE + BATCH_SHARE else 1
                for position in range(count):
                    if position:
                        sequence += 1
                    writes.append(self._draw_write(rng, client_id, sequence))
            label = _describe_operation(get_key, writes)
            output: str | None = None
            ret: float | None = None
            try:
                if get_key is not None:
                    output = (await node.read(kv.get(get_key), timeout=2.0)).decode()
                elif len(writes) == 1:
                    await node.propose(_write_command(writes[0]), timeout=2.0)
                else:
                    await node.propose_many([_write_command(write) for write in writes], timeout=2.0)
                ret = clock.now()
            except (ProposalTimeout, NoQuorumError, NodeStoppedError, NotLeaderError) as exc:
                self.trace.add("client", f"{client_id} {label} failed {type(exc).__name__}")
            finally:
                # A write whose outcome is unknown (failed, or still in flight when the run ends) may or
                # may not have happened: it goes into the history as indeterminate, and so does every
                # write of a batch, which happened all together or not at all.
                if get_key is not None and ret is not None:
                    self.history.append(Operation(client_id, get_key, "get", None, output, call, ret))
                for position, (kind, key, value) in enumerate(writes):
                    batch = (number, position) if len(writes) > 1 else None
                    self.history.append(Operation(client_id, key, kind, value, None, call, ret, batch))
            if ret is not None:
                self.trace.add("client", f"{client_id} {label} -> {output} @{call:.6f}")
                if self.heal_started is not None and call >= self.heal_started:
                    self.successes_after_heal[client_id] = self.successes_after_heal.get(client_id, 0) + 1
            think = rng.expovariate(1 / 0.1)
            await clock.sleep_until(clock.now() + think)

    def _draw_key(self, rng: random.Random) -> str:
        return f"k{rng.randrange(self.options.keys)}"

    def _draw_write(self, rng: random.Random, client_id: int, sequence: int) -> tuple[str, str, str]:
        """A put or an append, equally likely, of a value unique to this client and sequence number."""
        key = self._draw_key(rng)
        if rng.random() < 0.5:
            return "put", key, f"c{client_id}.{sequence}"
        return "append", key, f"[{client_id}.{sequence}]"

    # --- faults ------------------------------------------------------------------------------------------

    async def _sleep(self, seconds: float) -> None:
        await self.virtual_time.sleep_until(self.virtual_time.now() + seconds)

    async def fault_loop(self, nursery: trio.Nursery) -> None:
        plan, rng = self.plan, self.fault_rng
        addresses = [m.address for m in self.members.values()]
        end = self.options.fault_time
        actions: list[str] = []
        if plan.partitions:
            actions += ["partition", "heal-network"]
        if plan.one_way:
            actions += ["one-way", "heal-network"]
        if plan.clogging:
            actions += ["clog", "unclog"]
        if plan.crashes:
            actions += ["crash", "crash-leader", "restart", "restart"]
        if plan.clock_jumps:
            actions += ["clock-jump"]
        while self.virtual_time.now() < end:
            await self._sleep(rng.expovariate(1.0 / plan.fault_interval))
            if not actions:
                continue
            action = rng.choice(actions)
            if action == "partition":
                groups = self.network.random_partition(rng, addresses)
                self.trace.add("fault", f"partition {groups}")
            elif action == "one-way":
                link = self.network.random_one_way(rng, addresses)
                self.trace.add("fault", f"one-way {link}")
            elif action == "heal-network":
                self.network.heal()
                self.trace.add("fault", "heal-network")
            elif action == "clog":
                link = self.network.random_clog(rng, addresses)
                self.trace.add("fault", f"clog {link}")
            elif action == "unclog":
                self.trace.add("fault", f"unclog {self.network.unclog_one(rng)}")
            elif action == "crash":
                alive = [m for m in self.members.values() if m.alive]
                # Keep a majority up most of the time, so that the cluster makes progress between faults.
                if len(alive) > self.options.nodes // 2 + 1 or (alive and rng.random() < 0.1):
                    await self.crash_member(rng.choice(alive))
            elif action == "crash-leader":
                leaders = [m for m in self.members.values() if m.alive and m.node is not None and m.node.is_leader]
                if leaders:
                    self.trace.add("fault", f"crash-leader {leaders[0].node_id}")
                    await self.crash_member(leaders[0])
            elif action == "restart":
                dead = [m for m in self.members.values() if not m.alive]
                if dead:
                    await self.start_member(nursery, rng.choice(dead))
            elif action == "clock-jump":
                member = rng.choice(list(self.members.values()))
                seconds = rng.uniform(0.0, 2.0)
                member.clock.jump(seconds)
                self.trace.add("fault", f"clock-jump {member.node_id} +{seconds:.6f}")

    async def chaos_loop(self, nursery: trio.Nursery) -> None:
        """Targeted crashes: a member right after it became leader, or right after it granted a vote."""
        async for reason, node_id in self._chaos_receive:
            if not self.in_fault_phase():
                continue
            member = self.members[node_id]
            if reason != "crash-during-leader-sync":
                await self._sleep(self.fault_rng.uniform(0.0, 0.01))
            alive = [m for m in self.members.values() if m.alive]
            if member.alive and len(alive) > self.options.nodes // 2:
                self.trace.add("fault", f"{reason} {node_id}")
                await self.crash_member(member)
                # Often back at once, while the election it took part in may still be going on.
                await self._sleep(self.fault_rng.choice([0.002, 0.02, 0.3, 1.0]) * self.fault_rng.random())
                if self.in_fault_phase() and not member.alive:
                    await self.start_member(nursery, member)

    # --- the run ------------------------------------------------------------------------------------------

    async def main(self) -> SimResult:
        self.virtual_time = VirtualTime()
        self.trace = Trace(self.virtual_time.now, self.options.trace)
        self.checkers = RaftCheckers(self.virtual_time.now)
        plan = self.plan
        self.network = _ObservedNetwork(
            self,
            self.virtual_time,
            random.Random(self.network_seed),
            NetworkFaults(
                latency=plan.latency, loss=plan.loss, duplication=plan.duplication, reorder=plan.reorder
            ),
            on_event=self.trace.add,
        )
        self._build_members()
        stop_clients = trio.Event()
        violations: list[Violation] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(self.network.run)
            for member in self.members.values():
                await self.start_member(nursery, member)
            async with trio.open_nursery() as workload:
                for client_id in range(self.options.clients):
                    workload.start_soon(self.client, client_id, stop_clients)
                async with trio.open_nursery() as faults:
                    faults.start_soon(self.chaos_loop, nursery)
                    await self.fault_loop(nursery)
                    faults.cancel_scope.cancel()
                # Heal: the network is whole again and every member is up.
                self.heal_started = self.virtual_time.now()
                self.leader_after_heal = any(self.leading.values())
                self.trace.add("heal", "")
                self.network.heal()  # ends partitions and releases every clogged link
                for member in self.members.values():
                    if not member.alive:
                        await self.start_member(nursery, member)
                await self._sleep(self.options.heal_time)
                stop_clients.set()
                workload.cancel_scope.cancel()
            violations.extend(self._check_liveness())
            nursery.cancel_scope.cancel()
        violations[:0] = self.checkers.violations
        lin = check_history(self.history, max_steps=500_000)
        if lin.status == "violation":
            violations.append(Violation("linearizability", self.virtual_time.now(), lin.explanation))
        self.trace.add("end", f"violations={len(violations)} linearizability={lin.status}")
        return SimResult(
            seed=self.options.seed,
            violations=tuple(violations),
            digest=self.trace.digest(),
            virtual_time=self.virtual_time.now(),
            operations=len(self.history),
            completed_operations=sum(1 for op in self.history if op.ret is not None),
            elections=self.elections,
            crashes=self.crashes,
            messages=self.network.sent,
            linearizability=lin.status,
            trace=tuple(self.trace.lines),
        )

    def _set_leading(self, node_id: str, leading: bool) -> None:
        self.leading[node_id] = leading
        if any(self.leading.values()):
            self.leaderless_since = None
            if self.heal_started is not None:
                self.leader_after_heal = True
        elif self.leaderless_since is None:
            self.leaderless_since = self.virtual_time.now()

    def _check_liveness(self) -> list[Violation]:
        """After the heal phase: a leader was elected in it and the cluster is not leaderless for longer than
        a few election timeouts (the network's latency tail stays on after healing, so a late slow message may
        cause an election that is still running when the phase ends), and every client made progress."""
        found: list[Violation] = []
        now = self.virtual_time.now()
        leaders = [
            m.node_id for m in self.members.values() if m.node is not None and m.alive and m.node.is_leader
        ]
        grace = LIVENESS_GRACE_ELECTION_TIMEOUTS * self.plan.raft.election_timeout
        recently = self.leaderless_since is not None and now - self.leaderless_since <= grace
        if not leaders and not (self.leader_after_heal and recently):
            since = "" if self.leaderless_since is None else f" (none since {self.leaderless_since:.6f})"
            found.append(Violation("liveness", now, f"no leader {self.options.heal_time} s after healing{since}"))
        for client_id in range(self.options.clients):
            if not self.successes_after_heal.get(client_id):
                found.append(
                    Violation(
                        "liveness",
                        now,
                        f"client {client_id} completed no operation in {self.options.heal_time} s after healing",
                    )
                )
        return found


# What the clients do: a share of their operations are gets, a share are batches (`propose_many`) of two to
# four writes, and the rest single puts and appends.
GET_SHARE = 0.35
BATCH_SHARE = 0.15


def _write_command(write: tuple[str, str, str]) -> bytes:
    kind, key, value = write
    return kv.put(key, value) if kind == "put" else kv.append(key, value)


def _describe_operation(get_key: str | None, writes: list[tuple[str, str, str]]) -> str:
    """For the trace: `get k0`, `put k1 c0.5`, or `batch append k1 [0.6], put k1 c0.7`."""
    if get_key is not None:
        return f"get {get_key}"
    described = ", ".join(f"{kind} {key} {value}" for kind, key, value in writes)
    return described if len(writes) == 1 else f"batch {described}"


LIVENESS_GRACE_ELECTION_TIMEOUTS = 4  # how long the cluster may be between leaders when the heal phase ends


def run_seed(options: SimOptions) -> SimResult:
    """Run one seed to completion (in a fresh `trio.run`) and return what it found."""
    simulation = Simulation(options)
    return run_simulation(simulation.main, options.seed)
