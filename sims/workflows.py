"""The workflow workload: real `graft_trio.Manager`s running random workflows under the simulator's faults.

Each member is a `Manager` (the production code, unchanged) with the member's skewed, drifting `SimClock`,
a seeded rng (a fresh seed, drawn from the run's rng, at every restart), the member's crash-prone
`MemoryStorage` and a memory transport on the simulated network. Its Raft node reports to the same
observer hooks as in the key-value workload, so Raft's safety checkers keep running. A crash cancels the
member and crashes its storage; a restart builds a new Manager on the same storage.

**The model.** From the seed, `draw_plans` draws a few workflows (`WorkflowPlan`), each a tree of steps:
sequences, fan-outs, fan-outs closed by a join (nested up to three deep: the join of a scope nested in
another must have another node name, see docs/STATE.md, so joins are `join0`, `join1`, `join2` by depth),
next-node delays, node work that takes virtual time, transient failures that the retry policy absorbs
(`flaky` steps fail their first attempts) and, in some workflows, one step that raises
`NonRetryableError` (that workflow must end FAILED). A step's config carries its whole subtree, so the
nodes need no shared memory: `SimStep.execute` returns the next nodes and the join the config names.

**Effects.** Every step's patch is ``{"runs": {step_id: {attempt: member}}}``: a second application of a
step by another attempt adds a second key, so "applied once" is visible in the final state. A join also
records ``{"saw": {join_id: [the steps it waits for whose runs its state held]}}``. The nodes record which
execution id ran which step (`executions`), so the log's `NodeCompleted` events can be mapped back to the
model's steps. Checkers: `sims/workflow_checkers.py`.

**A run.** Fault phase (20 virtual s), during which each workflow is started at its planned time through a
random live member (retried until the start is confirmed: a retry answered `WorkflowExistsError` confirms
it too); then healing, after which every workflow must reach a terminal status within `settle_time`
virtual s plus the slowest workflow's `critical_path`. Then the members catch up, their final views are
read, the members are stopped (so their event subscriptions drain) and the checkers run.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
import trio

import graft_trio as graft
from graft_trio.manager import Manager
from graft_trio.raft import NodeStoppedError, NoQuorumError, NotLeaderError, ProposalTimeout
from graft_trio.raft.messages import Entry, Message, Snapshot
from graft_trio.state import commands as c
from graft_trio.state.events import NodeFailed
from sims import workflow_checkers as wc
from sims.checkers import RaftCheckers, Violation
from sims.clock import VirtualTime
from sims.cluster import SimMember, SimOptions, Simulation, Trace, _ObservedNetwork
from sims.network import NetworkFaults
from sims.scheduler import run_simulation
from sims.workflow_checkers import FinalView, Incarnation, StepPlan, WorkflowPlan
from transports.memory import MemoryTransport

RETRY = graft.RetryPolicy(max_attempts=4, initial_interval=0.2, backoff=2.0, max_interval=1.0, jitter=0.1)
MAX_TRANSIENT_FAILURES = 2  # < RETRY.max_attempts: the retries absorb them
JOIN_DEPTHS = 3
NODE_NAMES = ("task", "flaky", *(f"join{depth}" for depth in range(JOIN_DEPTHS)))
MESSAGE_BUDGET = 500_000  # a run sends 5,000 to 50,000 messages; far more is a message storm: stop there
# Floors under the key-value workload's Raft limits, which were drawn for its 20-byte commands. Workflow
# commands are a few hundred bytes and the state a few hundred KB: at 120-byte messages (one entry each)
# and 64-byte snapshot chunks a follower that fell behind took longer to catch up than the run lasts (one
# entry or chunk per round trip, while five members renew their claims twice a second). The limits still
# bite: a message holds a handful of entries and a snapshot still travels in many chunks.
MIN_MESSAGE_BYTES = 4096
MIN_SNAPSHOT_CHUNK_BYTES = 4096
START_ERRORS = (NodeStoppedError, NoQuorumError, NotLeaderError, ProposalTimeout, TimeoutError)


@attrs.frozen
class WorkflowOptions:
    seed: int
    nodes: int = 5
    workflows: int = 8
    fault_time: float = 20.0
    heal_time: float = 15.0  # the minimum time after healing (as in the key-value workload)
    settle_time: float = 60.0  # every workflow must be terminal this long after healing
    trace: bool = False


@attrs.frozen
class WorkflowResult:
    seed: int
    violations: tuple[Violation, ...]
    digest: str
    virtual_time: float
    workflows: int
    completed: int
    failed: int
    crash_looped: int  # failed by the engine's lease-loss guard
    elections: int
    crashes: int
    messages: int
    trace: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        return (
            f"seed {self.seed}: {self.workflows} workflows ({self.completed} completed, {self.failed} failed, "
            f"{self.crash_looped} of them by lease losses), {self.elections} elections, {self.crashes} crashes, "
            f"{self.messages} messages, {self.virtual_time:.1f} virtual s"
        )


# --- the model ------------------------------------------------------------------------------------------


class _PlanBuilder:
    def __init__(self, rng: random.Random, workflow_id: str) -> None:
        self.rng = rng
        self.workflow_id = workflow_id
        self.steps: dict[str, StepPlan] = {}
        self.count = 0

    def step(self, parent: str | None, depth: int, scope_depth: int, node: str | None = None) -> dict[str, Any]:
        """A step's config: its own behaviour and the subtree it enqueues."""
        rng = self.rng
        self.count += 1
        step_id = f"s{self.count}"
        fail = rng.randint(1, MAX_TRANSIENT_FAILURES) if rng.random() < 0.25 else 0
        config: dict[str, Any] = {
            "id": step_id,
            "node": node or ("flaky" if fail else "task"),
            "fail": fail,
            "fatal": False,
            # 4 s outlives a lease (renewals, sometimes a lost claim); flaky steps are quick
            "work": rng.choice([0.0, 0.05, 0.3]) if fail else rng.choice([0.0, 0.0, 0.05, 0.3, 1.5, 4.0]),
            "delay": rng.choice([0.0, 0.0, 0.0, 0.5, 2.0]),
            "next": [],
            "join": None,
            "awaits": [],
        }
        self.steps[step_id] = StepPlan(step_id, config["node"], parent, False, ())
        roll = rng.random()
        room = depth < 4 and self.count < 24
        if room and scope_depth < JOIN_DEPTHS and roll < 0.35:
            children = [self.step(step_id, depth + 1, scope_depth + 1) for _ in range(rng.randint(2, 3))]
            planned = list(self.steps)
            awaits = planned[planned.index(step_id) + 1 :]  # depth first: the children's subtrees
            join = self.step(step_id, depth + 1, scope_depth, node=f"join{scope_depth}")
            join["awaits"] = awaits
            self.steps[join["id"]] = attrs.evolve(self.steps[join["id"]], awaits=tuple(awaits))
            config["next"], config["join"] = children, join
        elif room and roll < 0.65:
            config["next"] = [self.step(step_id, depth + 1, scope_depth) for _ in range(rng.randint(1, 2))]
        return config


def _mark_fatal(config: dict[str, Any], step_id: str) -> None:
    if config["id"] == step_id:
        config["fatal"] = True
    for child in config["next"]:
        _mark_fatal(child, step_id)
    if config["join"] is not None:
        _mark_fatal(config["join"], step_id)


def critical_path(config: dict[str, Any]) -> float:
    """The least virtual time the subtree of `config` needs with no fault at all: its delay, its attempts
    (work and the longest retry backoff) and then the slowest of its children and its join."""
    retries = sum(RETRY.max_interval * (1 + RETRY.jitter) for _ in range(config["fail"]))
    own = config["delay"] + (config["fail"] + 1) * config["work"] + retries
    children = max((critical_path(child) for child in config["next"]), default=0.0)
    join = critical_path(config["join"]) if config["join"] is not None else 0.0
    return float(own + children + join)


def draw_plans(rng: random.Random, count: int, fault_time: float) -> list[WorkflowPlan]:
    """`count` random workflows, each with a start time in the fault phase."""
    plans: list[WorkflowPlan] = []
    for number in range(count):
        workflow_id = f"wf{number}"
        builder = _PlanBuilder(rng, workflow_id)
        initial = tuple(builder.step(None, 0, 0) for _ in range(rng.randint(1, 2)))
        fatal: str | None = None
        if rng.random() < 0.25:
            fatal = rng.choice(list(builder.steps))
            for config in initial:
                _mark_fatal(config, fatal)
            builder.steps[fatal] = attrs.evolve(builder.steps[fatal], fatal=True)
        start_at = rng.uniform(0.5, fault_time * 0.8)
        plans.append(WorkflowPlan(workflow_id, start_at, initial, dict(builder.steps), fatal))
    return plans


# --- the nodes ------------------------------------------------------------------------------------------


class SimStep(graft.Node[dict[str, Any], dict[str, Any]]):
    """Every node of the workload: does what its config says (see the module docstring)."""

    retry = RETRY

    def __init__(self, name: str, virtual_time: VirtualTime, executions: dict[str, str]) -> None:
        self.name = name
        self.virtual_time = virtual_time
        self.executions = executions

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        step_id = config["id"]
        self.executions[ctx.execution_id] = step_id
        if config["work"]:
            await self.virtual_time.sleep_until(self.virtual_time.now() + config["work"])
        if config["fatal"]:
            raise graft.NonRetryableError(f"fatal {step_id}")
        if ctx.attempt <= config["fail"]:
            raise RuntimeError(f"transient failure of {step_id} at attempt {ctx.attempt}")
        data: dict[str, Any] = {"runs": {step_id: {str(ctx.attempt): ctx.member_id}}}
        if config["awaits"]:
            runs = state.get("runs") or {}
            data["saw"] = {step_id: [s for s in config["awaits"] if s in runs]}
        next_nodes = [graft.NextNode(child["node"], config=child, delay=child["delay"]) for child in config["next"]]
        join = config["join"]
        return graft.NodeResult(
            data=data,
            next_nodes=next_nodes,
            join=graft.NextNode(join["node"], config=join) if join is not None else None,
        )


# --- the simulation -------------------------------------------------------------------------------------


class WorkflowSimulation(Simulation):
    """A `Simulation` whose members are Managers and whose workload is the planned workflows."""

    def __init__(self, options: WorkflowOptions) -> None:
        super().__init__(
            SimOptions(
                seed=options.seed,
                nodes=options.nodes,
                fault_time=options.fault_time,
                heal_time=options.heal_time,
                trace=options.trace,
            )
        )
        self.workflow_options = options
        self.restart_rng = random.Random(self.rng.getrandbits(64))
        self.workload_rng = random.Random(self.rng.getrandbits(64))
        self.plans = draw_plans(random.Random(self.rng.getrandbits(64)), options.workflows, options.fault_time)
        self.raft_config = attrs.evolve(
            self.plan.raft,
            max_message_bytes=max(self.plan.raft.max_message_bytes, MIN_MESSAGE_BYTES),
            snapshot_chunk_bytes=max(self.plan.raft.snapshot_chunk_bytes, MIN_SNAPSHOT_CHUNK_BYTES),
        )
        self.managers: dict[str, Manager] = {}
        self.executions: dict[str, str] = {}
        self.incarnations: list[tuple[str, list[int], list[Any]]] = []  # (name, applied, events)
        self._current: dict[str, tuple[list[int], list[Any]]] = {}
        self.started: dict[str, bool] = {}
        self.terminal: dict[str, str] = {}  # workflow -> first terminal status any member saw
        self._run_scope = trio.CancelScope()
        self.storm: Violation | None = None

    # --- observer hooks ------------------------------------------------------------------------------

    def applied(self, node_id: str, entry: Entry) -> None:
        super().applied(node_id, entry)
        self._current[node_id][0].append(entry.index)

    def restored(self, node_id: str, snapshot: Snapshot) -> None:
        super().restored(node_id, snapshot)
        self._current[node_id][0].append(0)

    def message_sent(self, message: Message) -> None:
        super().message_sent(message)
        if self.network.sent > MESSAGE_BUDGET and not self._run_scope.cancel_called:
            self.storm = Violation(
                "message-storm", self.virtual_time.now(), f"{self.network.sent} messages sent: the run is stopped"
            )
            self._run_scope.cancel()

    # --- members -------------------------------------------------------------------------------------

    async def start_member(self, nursery: trio.Nursery, member: SimMember) -> None:
        member.incarnation += 1
        peers = {m.node_id: m.address for m in self.members.values() if m is not member}
        manager = Manager(
            member.node_id,
            member.address,
            transport=MemoryTransport(self.network),
            peers=peers,
            storage=member.storage,
            clock=member.clock,
            rng=random.Random(self.restart_rng.getrandbits(64)),
            raft_config=self.raft_config,
            claim_lease=1.5,
            max_concurrent_steps=4,
            request_timeout=3.0,
        )
        manager.raft.observer = self
        for name in NODE_NAMES:
            manager.register_node(SimStep(name, self.virtual_time, self.executions))
        applied: list[int] = []
        events: list[Any] = []
        self._current[member.node_id] = (applied, events)
        self.incarnations.append((f"{member.node_id}#{member.incarnation}", applied, events))
        self.managers[member.node_id] = manager
        member.node = manager.raft
        self.mark_started(member)
        subscribed: trio.Event = trio.Event()

        async def consume() -> None:
            async with manager.subscribe(capacity=1 << 30) as subscription:
                subscribed.set()
                async for event in subscription:
                    events.append(event)
                    self._saw(member.node_id, event)

        nursery.start_soon(consume)
        await subscribed.wait()

        await self.run_member(nursery, member, manager.run)

    def _saw(self, node_id: str, event: Any) -> None:
        workflow_id = getattr(event, "workflow_id", None)
        if workflow_id is None:
            return
        kind = type(event).__name__
        if isinstance(event, wc.TERMINAL_EVENTS):
            self.terminal.setdefault(workflow_id, kind)
        detail = f"{node_id} {event.index} {kind} {workflow_id} {getattr(event, 'step_id', '')}"
        if isinstance(event, NodeFailed):
            detail += f" {event.error!r}"
        self.trace.add("event", detail)

    # --- the workload --------------------------------------------------------------------------------

    async def starter(self, plan: WorkflowPlan) -> None:
        rng = random.Random(self.workload_rng.getrandbits(64))
        await self._sleep(plan.start_at)
        trigger = graft.WorkflowTrigger(
            workflow_id=plan.workflow_id,
            initial_state={"runs": {}},
            initial_nodes=[graft.NodeConfig(config["node"], config=config) for config in plan.initial],
        )
        while True:
            alive = [m for m in self.members.values() if m.alive]
            if alive:
                member = rng.choice(alive)
                manager = self.managers[member.node_id]
                try:
                    with trio.move_on_at(self.virtual_time.unique_deadline(self.virtual_time.now() + 5.0)):
                        await manager.start_workflow(trigger)
                        self._confirm(plan, member.node_id, "started")
                        return
                except graft.WorkflowExistsError:
                    self._confirm(plan, member.node_id, "exists")
                    return
                except START_ERRORS as exc:
                    self.trace.add("start-workflow", f"{plan.workflow_id} via {member.node_id}: {type(exc).__name__}")
            await self._sleep(rng.uniform(0.1, 0.5))

    def _confirm(self, plan: WorkflowPlan, node_id: str, how: str) -> None:
        self.started[plan.workflow_id] = True
        self.trace.add("start-workflow", f"{plan.workflow_id} via {node_id}: {how}")

    # --- the run -------------------------------------------------------------------------------------

    async def main(self) -> WorkflowResult:  # type: ignore[override]
        options = self.workflow_options
        self.virtual_time = VirtualTime()
        self.trace = Trace(self.virtual_time.now, options.trace)
        self.checkers = RaftCheckers(self.virtual_time.now)
        plan = self.plan
        self.network = _ObservedNetwork(
            self,
            self.virtual_time,
            random.Random(self.network_seed),
            NetworkFaults(latency=plan.latency, loss=plan.loss, duplication=plan.duplication, reorder=plan.reorder),
            on_event=self.trace.add,
        )
        self._build_members()
        violations: list[Violation] = []
        finals: dict[str, FinalView] = {}
        views: dict[str, dict[str, FinalView | None]] = {}
        with self._run_scope:
            await self._run(violations, finals, views)
        now = self.virtual_time.now()
        if self.storm is not None:
            violations[:0] = [*self.checkers.violations, self.storm]
            return self._result(violations, {}, now)
        incarnations = [Incarnation(name, tuple(applied), tuple(events)) for name, applied, events in self.incarnations]
        canonical, _ = wc.canonical_events(incarnations, now)
        violations[:0] = self.checkers.violations
        violations.extend(wc.check_model(self.plans, finals, now))
        violations.extend(wc.check_effects_once(self.plans, canonical, self.executions, now))
        violations.extend(wc.check_terminal_stable(incarnations, finals, now))
        violations.extend(wc.check_events(incarnations, now))
        violations.extend(wc.check_replicas_agree(views, now))
        return self._result(violations, finals, now)

    async def _run(
        self,
        violations: list[Violation],
        finals: dict[str, FinalView],
        views: dict[str, dict[str, FinalView | None]],
    ) -> None:
        options = self.workflow_options
        async with trio.open_nursery() as nursery:
            await nursery.start(self.network.run)
            for member in self.members.values():
                await self.start_member(nursery, member)
            async with trio.open_nursery() as workload:
                for workflow in self.plans:
                    workload.start_soon(self.starter, workflow)
                async with trio.open_nursery() as faults:
                    faults.start_soon(self.chaos_loop, nursery)
                    await self.fault_loop(nursery)
                    faults.cancel_scope.cancel()
                self.heal_started = self.virtual_time.now()
                self.trace.add("heal", "")
                self.network.heal()
                for member in self.members.values():
                    if not member.alive:
                        await self.start_member(nursery, member)
                await self._sleep(options.heal_time)
                # Bounded: `settle_time` after healing, plus what the slowest workflow needs without faults.
                slowest = max((critical_path(c) for p in self.plans for c in p.initial), default=0.0)
                deadline = self.heal_started + options.settle_time + slowest
                while self.virtual_time.now() < deadline and not self._all_terminal():
                    await self._sleep(0.5)
                workload.cancel_scope.cancel()
            now = self.virtual_time.now()
            violations.extend(wc.check_completion(self.plans, self.started, self.terminal, now))
            for node_id in await self._catch_up(now + 10.0):
                violations.append(Violation("catch-up", now, f"{node_id} did not apply what the leader committed"))
            for node_id, manager in self.managers.items():
                views[node_id] = {p.workflow_id: _view(manager, p.workflow_id) for p in self.plans}
            leader = self._leader()
            if leader is not None:
                finals.update((k, v) for k, v in views[leader].items() if v is not None)
            else:
                violations.append(Violation("liveness", now, "no leader at the end of the run"))
            # Stop every member, so that each subscription delivers what it holds and ends.
            for member in self.members.values():
                if member.alive and member.scope is not None and member.stopped is not None:
                    member.alive = False
                    member.scope.cancel()
                    await member.stopped.wait()
            await self._sleep(0.1)
            nursery.cancel_scope.cancel()

    def _result(self, violations: list[Violation], finals: dict[str, FinalView], now: float) -> WorkflowResult:
        statuses = [f.status for f in finals.values()]
        crash_looped = sum(
            1 for f in finals.values() if f.status == "FAILED" and wc.LEASE_LOSS_MARK in (f.last_error or "")
        )
        self.trace.add("end", f"violations={len(violations)} statuses={statuses}")
        return WorkflowResult(
            seed=self.workflow_options.seed,
            violations=tuple(violations),
            digest=self.trace.digest(),
            virtual_time=now,
            workflows=len(self.plans),
            completed=statuses.count("COMPLETED"),
            failed=statuses.count("FAILED"),
            crash_looped=crash_looped,
            elections=self.elections,
            crashes=self.crashes,
            messages=self.network.sent,
            trace=tuple(self.trace.lines),
        )

    def _all_terminal(self) -> bool:
        return all(self.started.get(p.workflow_id) and p.workflow_id in self.terminal for p in self.plans)

    def _leader(self) -> str | None:
        for member in self.members.values():
            if member.alive and member.node is not None and member.node.is_leader:
                return member.node_id
        return None

    async def _catch_up(self, deadline: float) -> list[str]:
        """Wait (until `deadline`) for a leader and for every member to have applied what the leader
        committed; returns the members that did not."""
        behind: list[str] = list(self.managers)
        while True:
            leader = self._leader()
            if leader is not None:
                target = self.managers[leader].raft.status().commit_index
                behind = [m for m, mgr in self.managers.items() if mgr.raft.status().applied_index < target]
                if not behind:
                    return []
            if self.virtual_time.now() >= deadline:
                break
            await self._sleep(0.2)
        for node_id, manager in self.managers.items():
            status = manager.raft.status()
            self.trace.add(
                "catch-up",
                f"{node_id} role={status.role} term={status.term} leader={status.leader_id} "
                f"commit={status.commit_index} applied={status.applied_index}",
            )
        return behind


def _view(manager: Manager, workflow_id: str) -> FinalView | None:
    answer = manager.state_machine.answer(c.GetWorkflow(workflow_id))
    if not isinstance(answer, c.WorkflowView):
        return None
    return FinalView(answer.status.name, answer.current_state, answer.last_error)


def run_workflow_seed(options: WorkflowOptions) -> WorkflowResult:
    """Run one workflow seed to completion (in a fresh `trio.run`)."""
    simulation = WorkflowSimulation(options)
    return run_simulation(simulation.main, options.seed)


__all__ = ["SimStep", "WorkflowOptions", "WorkflowResult", "WorkflowSimulation", "draw_plans", "run_workflow_seed"]
