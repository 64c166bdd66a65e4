"""`Manager`: one member of a graft-trio cluster, and the public workflow API (SPEC sections 2 and 4).

The Manager only wires things together: a `RaftNode` replicating a `WorkflowStateMachine`, the member's
`Engine` (graft_trio/workflow/engine.py) and its `EventHub` (graft_trio/events.py). The state machine's
apply hands its events to both, on every member, in log order. Time, randomness, storage and the
transport are the ones the Manager was given, so the simulator can run it unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from graft_trio._service import start_service
from graft_trio.clock import Clock, WallClock
from graft_trio.events import DEFAULT_CAPACITY, EventHub, Subscription, run_handler
from graft_trio.http_api import serve_http
from graft_trio.raft.errors import NodeStoppedError, RaftError
from graft_trio.raft.messages import Membership
from graft_trio.raft.node import RaftConfig, RaftNode
from graft_trio.raft.storage import Storage, open_storage
from graft_trio.state import commands as c
from graft_trio.state.commands import DEFAULT_RETENTION
from graft_trio.state.events import CommandBroadcast, Event, LeaderChanged, MemberJoined, MemberLeft
from graft_trio.state.machine import WorkflowStateMachine
from graft_trio.state.model import NodeSpec
from graft_trio.state.model import StepStatus as InternalStepStatus
from graft_trio.state.model import WorkflowStatus as InternalWorkflowStatus
from graft_trio.transport import TlsConfig, Transport
from graft_trio.workflow.engine import Engine, EngineStats, Proposer
from graft_trio.workflow.payloads import NodeRegistry, RegisteredNode, trigger_json
from graft_trio.workflow.types import (
    Node,
    StepInfo,
    StepStatus,
    WorkflowExistsError,
    WorkflowNotFoundError,
    WorkflowState,
    WorkflowStatus,
    WorkflowTrigger,
)

logger = logging.getLogger(__name__)

MAX_CLAIM_LEASE = 10.0  # issue 4: a dead member's steps are taken over within 10 s
# Broadcasts are rare and each must reach its handler once: their queue is bounded only in name.
BROADCAST_BACKLOG = 1 << 30


class InvalidTransitionError(Exception):
    """The workflow's status does not allow the operation (e.g. resuming a workflow that is not paused;
    terminal statuses are never left, except FAILED by `retry_workflow`)."""

    def __init__(self, workflow_id: str, status: WorkflowStatus, operation: str) -> None:
        super().__init__(f"cannot {operation} workflow {workflow_id!r}: it is {status.value}")
        self.workflow_id = workflow_id
        self.status = status
        self.operation = operation


@attrs.frozen
class WorkflowSummary:
    """One line of `list_workflows`."""

    workflow_id: str
    status: WorkflowStatus
    started_at: float
    completed_at: float | None
    last_error: str | None


@attrs.frozen
class MemberInfo:
    member_id: str
    address: str
    voter: bool


@attrs.frozen
class ClusterInfo:
    member_id: str  # this member
    role: str
    leader_id: str | None
    term: int
    commit_index: int
    applied_index: int
    members: tuple[MemberInfo, ...]
    engine: EngineStats


@attrs.frozen
class Health:
    serving: bool  # the member runs and its Raft node is up
    has_leader: bool
    applied_lag: int  # committed entries this member has not applied yet

    @property
    def healthy(self) -> bool:
        return self.serving and self.has_leader


CommandHandler = Callable[[Any, str], Awaitable[None] | None]  # (params, origin member id)


class _StateMachine(WorkflowStateMachine):
    """The workflow state machine, telling the Manager when a snapshot replaced the whole state."""

    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        super().__init__(listener=manager._on_applied)

    def restore(self, snapshot: bytes) -> None:
        super().restore(snapshot)
        self._manager._on_restored()


class _ClusterEvents:
    """The Raft member's `ClusterListener`: turns the memberships it applies into `MemberJoined` (a new
    member, or one whose address or vote changed) and `MemberLeft`, and the leaders it learns of into
    `LeaderChanged`, at the index they were applied at. Called on the Raft member's loop, like the apply."""

    def __init__(self, manager: Manager) -> None:
        self._manager = manager
        self._members: dict[str, tuple[str, bool]] = {}
        self._leader: str | None = None

    def membership_applied(self, index: int, membership: Membership) -> None:
        current = {m.node_id: (m.address, m.voter) for m in membership.members}
        events: list[Event] = [
            MemberJoined(index, member_id, address, voter)
            for member_id, (address, voter) in current.items()
            if self._members.get(member_id) != (address, voter)
        ]
        events.extend(MemberLeft(index, member_id) for member_id in self._members if member_id not in current)
        self._members = current
        if events:
            self._publish(events)

    def leader_changed(self, term: int, leader_id: str | None) -> None:
        previous, self._leader = self._leader, leader_id
        self._manager.engine.leadership_changed()
        self._publish([LeaderChanged(self._manager.raft.applied_index, term, leader_id, previous)])

    def _publish(self, events: list[Event]) -> None:
        try:
            self._manager.hub.publish(events)
        except Exception:  # Raft's loop must go on; a bug here is logged, not raised into Raft
            logger.exception("member %s: event dispatch failed", self._manager.node_id)


class Manager:
    """One member of a cluster: runs Raft, the workflow engine and event dispatch.

    `data_dir=None` keeps the log in memory; `peers` (id -> address) are the other founding members, none
    for a one-member cluster. With `join=True`, `peers` are members of a running cluster instead: this
    member holds no election and asks them (through whichever leads) to add it, as a learner and then a
    voter once caught up; it stops asking once it is a voter, and a restart on the same storage does not
    ask again. `transport` is a name (``"tcp"``, ``"websocket"``, ``"memory"``) or a
    `Transport`; `cluster_secret` and `tls` go to a network transport named here (a `Transport` instance
    is used as given, and the in-process memory transport needs neither). `max_concurrent_steps` caps the
    attempts this member runs at once; `claim_lease` (at most 10 s) is how long a claim outlives a member
    that stopped renewing it; `retention` is how long terminal workflows are kept. `clock`, `rng`,
    `storage` and `transport` are what the simulator injects. `request_timeout` bounds the public calls.

    Nodes may be registered before or after the Manager starts: the member claims a node's steps from the
    moment it is registered.
    """

    def __init__(
        self,
        node_id: str,
        bind: str,
        data_dir: str | None = None,
        *,
        transport: str | Transport = "tcp",
        peers: dict[str, str] | None = None,
        join: bool = False,
        cluster_secret: str | bytes | None = None,
        tls: TlsConfig | None = None,
        max_concurrent_steps: int = 16,
        retention: float = DEFAULT_RETENTION,
        claim_lease: float = MAX_CLAIM_LEASE,
        claim_batch: int = 16,
        request_timeout: float = 30.0,
        http_port: int | None = None,
        http_host: str = "127.0.0.1",
        raft_config: RaftConfig | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        storage: Storage | None = None,
        transport_options: dict[str, Any] | None = None,
    ) -> None:
        if max_concurrent_steps < 1:
            raise ValueError(f"max_concurrent_steps must be at least 1, got {max_concurrent_steps}")
        if not 0 < claim_lease <= MAX_CLAIM_LEASE:
            raise ValueError(f"claim_lease must be in (0, {MAX_CLAIM_LEASE}] seconds, got {claim_lease}")
        if claim_batch < 1:
            raise ValueError(f"claim_batch must be at least 1, got {claim_batch}")
        if not retention >= 0:
            raise ValueError(f"retention must be >= 0 seconds, got {retention}")
        self.node_id = node_id
        self.bind = bind
        self.retention = float(retention)
        self.request_timeout = request_timeout
        self.http_port = http_port  # None: no HTTP API; 0: any free port (`http_bound_port` tells which)
        self.http_host = http_host
        self.http_bound_port: int | None = None
        self.join = join
        self.clock = clock or WallClock()
        self.rng = rng if rng is not None else random.Random()
        options = dict(transport_options or {})
        if isinstance(transport, str) and transport != "memory":
            if cluster_secret is not None:
                options.setdefault("cluster_secret", cluster_secret)
            if tls is not None:
                options.setdefault("tls", tls)
        self.registry = NodeRegistry()
        self.hub = EventHub()
        self.state_machine = _StateMachine(self)
        self.raft = RaftNode(
            node_id,
            bind,
            peers or {},
            state_machine=self.state_machine,
            storage=storage if storage is not None else open_storage(data_dir),
            transport=transport,
            config=raft_config,
            join=join,
            clock=self.clock,
            rng=random.Random(self.rng.getrandbits(64)),
            transport_options=options,
        )
        self.raft.cluster_listener = _ClusterEvents(self)
        engine_rng = random.Random(self.rng.getrandbits(64))
        self.proposer = Proposer(self.raft, self.clock, engine_rng)
        self.engine = Engine(
            member_id=node_id,
            raft=self.raft,
            state_machine=self.state_machine,
            registry=self.registry,
            proposer=self.proposer,
            clock=self.clock,
            rng=engine_rng,
            max_concurrent_steps=max_concurrent_steps,
            claim_lease=claim_lease,
            claim_batch=claim_batch,
        )
        self._command_handlers: dict[str, CommandHandler] = {}
        self._nursery: trio.Nursery | None = None
        self._pending_handlers: list[tuple[Subscription, Callable[[Any], Any], str]] = []
        self._serving = False
        self._exit_stack: contextlib.AsyncExitStack | None = None

    # --- lifecycle ------------------------------------------------------------------------------------

    async def __aenter__(self) -> Manager:
        self._exit_stack, self._outer_scope = await start_service(self.run)
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._exit_stack is not None
        with trio.CancelScope(shield=True):
            await self.engine.drain(timeout=1.0)
            await self._hand_over_leadership(timeout=2.0)
        self._outer_scope.cancel()
        error = exc_info[1] if len(exc_info) > 1 else None
        try:
            return await self._exit_stack.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            # The body's own exception, wrapped by our nursery: raise it as it was raised.
            if error is not None and group.exceptions == (error,):
                raise error from None
            raise

    async def _hand_over_leadership(self, timeout: float) -> None:
        """A leader that stops gracefully hands leadership to an up-to-date voter first (TimeoutNow), so
        the cluster does not wait an election timeout to notice it is gone."""
        status = self.raft.status()
        if status.role != "leader" or not any(m.voter and m.node_id != self.node_id for m in status.members):
            return
        try:
            await self.raft.transfer_leadership(timeout=timeout)
        except RaftError as error:
            logger.info("member %s: leadership not handed over before stopping: %s", self.node_id, error)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the member until cancelled; `nursery.start(mgr.run)` returns once it serves. Cancelling it
        is a crash as far as the cluster knows (claims are taken over after their lease); leaving
        ``async with mgr`` hands this member's claims back first."""
        broadcasts = self.hub.subscribe((CommandBroadcast,), capacity=BROADCAST_BACKLOG)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.raft.run)
                self._serving = True
                await nursery.start(self.engine.run)
                if self.http_port is not None:
                    self.http_bound_port = await nursery.start(serve_http, self, self.http_host, self.http_port)
                nursery.start_soon(self._dispatch_broadcasts, broadcasts)
                if self.join:
                    nursery.start_soon(self._join_cluster)
                for subscription, handler, description in self._pending_handlers:
                    nursery.start_soon(self._run_handler, subscription, handler, description)
                self._pending_handlers.clear()
                task_status.started()
        finally:
            self._serving = False
            self._nursery = None
            self.hub.close()

    def register_node(self, node: Node[Any, Any]) -> RegisteredNode:
        """Add a node this member can run (see `NodeRegistry.register` for what is checked); allowed
        before and after start."""
        registered = self.registry.register(node)
        self.engine.work_may_be_ready()
        return registered

    # --- the apply's events (synchronous, inside Raft's apply loop) --------------------------------------

    def _on_applied(self, events: Sequence[Event]) -> None:
        try:
            self.engine.on_events(events)
            self.hub.publish(events)
        except Exception:  # the apply loop must go on; a bug here is logged, not raised into Raft
            logger.exception("member %s: event dispatch failed", self.node_id)

    def _on_restored(self) -> None:
        self.engine.work_may_be_ready()
        self.hub.everything_changed()

    # --- workflows ------------------------------------------------------------------------------------

    async def start_workflow(self, trigger: WorkflowTrigger) -> str:
        """Start a workflow; returns its id. Raises `WorkflowExistsError` if the id is taken (by a
        terminal workflow still retained too) and `PayloadError` if the trigger holds what is not JSON."""
        document = trigger_json(trigger)
        nodes = tuple(NodeSpec(**node) for node in document["initial_nodes"])
        reply = await self._propose(
            lambda now: c.StartWorkflow(
                now, trigger.workflow_id, document["initial_state"], nodes, document["metadata"], self.retention
            )
        )
        if isinstance(reply, c.WorkflowExists):
            raise WorkflowExistsError(trigger.workflow_id)
        self._check(reply, trigger.workflow_id, "start")
        return trigger.workflow_id

    async def get_workflow(self, workflow_id: str) -> WorkflowState:
        """The workflow as of now (a linearizable read); `WorkflowNotFoundError` if there is none."""
        answer = await self.proposer.read(c.GetWorkflow(workflow_id), timeout=self.request_timeout)
        if isinstance(answer, c.NotFound):
            raise WorkflowNotFoundError(workflow_id)
        return workflow_state(answer)

    def _local_workflow(self, workflow_id: str) -> WorkflowState | None:
        """The workflow as this member has applied it (no round trip), None if it has none."""
        answer = self.state_machine.answer(c.GetWorkflow(workflow_id))
        return workflow_state(answer) if isinstance(answer, c.WorkflowView) else None

    async def list_workflows(
        self, status: WorkflowStatus | None = None, *, limit: int = 1000, offset: int = 0
    ) -> list[WorkflowSummary]:
        """Workflows in the order they were started, optionally only those of one status (linearizable)."""
        internal = None if status is None else InternalWorkflowStatus(status.value)
        answer = await self.proposer.read(c.ListWorkflows(internal, limit, offset), timeout=self.request_timeout)
        assert isinstance(answer, c.WorkflowList), answer
        return [
            WorkflowSummary(s.workflow_id, WorkflowStatus(s.status.value), s.started_at, s.completed_at, s.last_error)
            for s in answer.workflows
        ]

    async def wait_for_workflow(self, workflow_id: str, timeout: float | None = None) -> WorkflowState:
        """Wait until the workflow is terminal and return it. Wakes on the applies that change it (no
        polling). Raises `WorkflowNotFoundError`, or `TimeoutError` after `timeout` seconds."""
        with self.clock.move_on_after(timeout if timeout is not None else float("inf")):
            state = await self.get_workflow(workflow_id)
            while not state.status.is_terminal:
                changed = self.hub.workflow_changed(workflow_id)
                local = self._local_workflow(workflow_id)
                if local is None:
                    raise WorkflowNotFoundError(workflow_id)
                state = local
                if state.status.is_terminal:
                    break
                await changed.wait()
                self._check_serving()
            return state
        raise TimeoutError(f"workflow {workflow_id!r} did not finish within {timeout} s")

    async def watch_workflow(self, workflow_id: str) -> AsyncIterator[WorkflowState]:
        """Snapshots of the workflow: now, then after each applied change, until it is terminal."""
        state = await self.get_workflow(workflow_id)
        yield state
        while not state.status.is_terminal:
            changed = self.hub.workflow_changed(workflow_id)
            local = self._local_workflow(workflow_id)
            if local is None:
                return  # removed by retention
            if local != state:
                state = local
                yield state
                continue
            await changed.wait()
            self._check_serving()

    async def pause_workflow(self, workflow_id: str) -> WorkflowStatus:
        """RUNNING -> PAUSED: no new steps are claimed; queued steps stay queued, running ones commit."""
        return await self._transition(workflow_id, "pause", lambda now: c.PauseWorkflow(now, workflow_id))

    async def resume_workflow(self, workflow_id: str) -> WorkflowStatus:
        """PAUSED -> RUNNING."""
        return await self._transition(workflow_id, "resume", lambda now: c.ResumeWorkflow(now, workflow_id))

    async def cancel_workflow(self, workflow_id: str, reason: str | None = None) -> WorkflowStatus:
        """RUNNING or PAUSED -> CANCELLED: queued steps are dropped, running attempts are cancelled on the
        members that run them, and their outcomes are refused."""
        return await self._transition(workflow_id, "cancel", lambda now: c.CancelWorkflow(now, workflow_id, reason))

    async def retry_workflow(self, workflow_id: str) -> WorkflowStatus:
        """FAILED -> RUNNING: dead letters are queued again with fresh attempts."""
        return await self._transition(workflow_id, "retry", lambda now: c.RetryWorkflow(now, workflow_id))

    async def _transition(self, workflow_id: str, operation: str, build: Callable[[float], Any]) -> WorkflowStatus:
        reply = await self._propose(build)
        self._check(reply, workflow_id, operation)
        assert isinstance(reply, c.StatusChanged), reply
        return WorkflowStatus(reply.status.value)

    @staticmethod
    def _check(reply: Any, workflow_id: str, operation: str) -> None:
        if isinstance(reply, c.NotFound):
            raise WorkflowNotFoundError(workflow_id)
        if isinstance(reply, c.InvalidTransition):
            raise InvalidTransitionError(workflow_id, WorkflowStatus(reply.status.value), operation)
        if isinstance(reply, c.Invalid):
            raise ValueError(f"cannot {operation} workflow {workflow_id!r}: {reply.reason}")

    async def _propose(self, build: Callable[[float], Any]) -> Any:
        self._check_serving()
        return await self.proposer.propose(build, timeout=self.request_timeout)

    def _check_serving(self) -> None:
        if not self._serving:
            raise NodeStoppedError(f"manager {self.node_id} is not running")

    # --- events ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def subscribe(self, *event_types: type[Any], capacity: int = DEFAULT_CAPACITY) -> AsyncIterator[Subscription]:
        """Events of these types (all user-facing events if none are named), in log order, as an async
        iterator. Bounded by `capacity`: a subscriber that falls behind gets one `EventsDropped` in place
        of the events it missed, and never holds up the log."""
        subscription = self.hub.subscribe(event_types, capacity)
        try:
            yield subscription
        finally:
            self.hub.unsubscribe(subscription)

    def on(
        self, event_type: type[Any], handler: Callable[[Any], Any], *, capacity: int = DEFAULT_CAPACITY
    ) -> Callable[[], None]:
        """Call `handler(event)` (sync or async) for each event of `event_type`, one at a time, in a task
        of this member; returns a function that removes it. A handler that raises is logged; one that
        falls behind by `capacity` events misses them (logged)."""
        subscription = self.hub.subscribe((event_type,), capacity)
        description = f"handler {getattr(handler, '__qualname__', handler)!r} for {event_type.__name__}"
        if self._nursery is not None:
            self._nursery.start_soon(self._run_handler, subscription, handler, description)
        else:
            self._pending_handlers.append((subscription, handler, description))
        return lambda: self.hub.unsubscribe(subscription)

    @staticmethod
    async def _run_handler(subscription: Subscription, handler: Callable[[Any], Any], description: str) -> None:
        await run_handler(subscription, handler, description=description)

    # --- broadcast commands ---------------------------------------------------------------------------

    def register_command_handler(self, name: str, handler: CommandHandler) -> None:
        """`handler(params, origin_member_id)` (sync or async) runs on this member once for each
        `broadcast(name, ...)` applied after it was registered."""
        if not name:
            raise ValueError("a command needs a name")
        if name in self._command_handlers:
            raise ValueError(f"a handler for command {name!r} is already registered")
        self._command_handlers[name] = handler

    async def broadcast(self, name: str, params: Any = None) -> int:
        """Run the handlers registered for `name` once on every member; returns the command's log index.
        Returns once the command is applied on this member (its handler here is queued by then)."""
        reply = await self._propose(lambda now: c.Broadcast(now, name, params, self.node_id))
        if isinstance(reply, c.Invalid):
            raise ValueError(reply.reason)
        assert isinstance(reply, c.Broadcasted), reply
        return reply.index

    async def _dispatch_broadcasts(self, subscription: Subscription) -> None:
        async for event in subscription:
            if not isinstance(event, CommandBroadcast):
                continue
            handler = self._command_handlers.get(event.name)
            if handler is None:
                logger.warning("member %s: no handler for broadcast command %r", self.node_id, event.name)
                continue
            try:
                result = handler(event.params, event.origin)
                if result is not None:
                    await result
            except Exception:
                logger.exception("member %s: handler of broadcast command %r raised", self.node_id, event.name)

    # --- the cluster ----------------------------------------------------------------------------------

    def cluster_info(self) -> ClusterInfo:
        status = self.raft.status()
        return ClusterInfo(
            member_id=self.node_id,
            role=status.role,
            leader_id=status.leader_id,
            term=status.term,
            commit_index=status.commit_index,
            applied_index=status.applied_index,
            members=tuple(MemberInfo(m.node_id, m.address, m.voter) for m in status.members),
            engine=self.engine.stats(),
        )

    async def read_barrier(self, timeout: float | None = None) -> None:
        """Return once this member has applied everything the leader had committed when it was called
        (a ReadIndex round); raises the Raft errors, or `TimeoutError` past `timeout`."""
        await self.proposer.read(c.NextDeadline(), timeout=self.request_timeout if timeout is None else timeout)

    def health(self) -> Health:
        if not self._serving:
            return Health(serving=False, has_leader=False, applied_lag=0)
        status = self.raft.status()
        return Health(
            serving=True,
            has_leader=status.leader_id is not None,
            applied_lag=max(status.commit_index - status.applied_index, 0),
        )

    async def add_member(
        self, node_id: str, address: str, *, voter: bool = True, timeout: float | None = None
    ) -> None:
        """Add a member to the cluster: called on any member, made by the leader (a follower forwards the
        request). The new member is a learner until it has caught up, then a voter (if `voter`); returns
        once that change is committed. Start the new member with ``join=True`` (it then asks by itself; this
        call is for adding a member by hand). Raises `graft_trio.raft.MembershipChangeError` if refused
        (`node_id` is a member at another address), `ProposalTimeout` (or `NoQuorumError` if no leader was
        known) after `timeout` seconds (default `request_timeout`); never hangs past it."""
        self._check_serving()
        timeout = self.request_timeout if timeout is None else timeout
        await self.raft.request_add_member(node_id, address, voter=voter, timeout=timeout)

    async def remove_member(self, node_id: str, *, timeout: float | None = None) -> None:
        """Remove a member (the leader too: it hands over by stepping down once its removal commits), on
        any member; errors as `add_member`. The removed member's claims are taken over after their lease."""
        self._check_serving()
        timeout = self.request_timeout if timeout is None else timeout
        await self.raft.request_remove_member(node_id, timeout=timeout)

    async def _join_cluster(self) -> None:
        with contextlib.suppress(NodeStoppedError):
            await self.raft.join_cluster()
            logger.info("member %s: a voter of the cluster", self.node_id)


# --- views ------------------------------------------------------------------------------------------------

_PENDING_STATUS = {
    InternalStepStatus.READY: StepStatus.QUEUED,
    InternalStepStatus.DELAYED: StepStatus.WAITING,
    InternalStepStatus.PARKED: StepStatus.PARKED,
    InternalStepStatus.CLAIMED: StepStatus.RUNNING,
    InternalStepStatus.DEAD: StepStatus.FAILED,
}


def workflow_state(view: c.WorkflowView) -> WorkflowState:
    """The public snapshot of a workflow from the state machine's view of it.

    `executed_steps` lists every finished attempt in commit order: COMPLETED, or FAILED with its error (a
    failed attempt that is retried, or one whose lease expired, is listed too).
    """
    executed = tuple(
        StepInfo(
            execution_id=record.execution_id,
            node_name=record.node_name,
            status=StepStatus.COMPLETED if record.outcome == "completed" else StepStatus.FAILED,
            attempt=record.attempt,
            member_id=record.member_id,
            started_at=record.started_at,
            finished_at=record.finished_at,
            error=record.error,
        )
        for record in view.executed
    )
    executing = tuple(
        StepInfo(
            execution_id=step.execution_id,
            node_name=step.node_name,
            status=StepStatus.RUNNING,
            config=step.config,
            attempt=step.attempt,
            member_id=step.member_id,
            started_at=step.started_at,
        )
        for step in view.executing
    )

    def waiting(step: c.StepView) -> StepInfo:
        return StepInfo(
            execution_id=f"{view.workflow_id}/{step.node_name}/{step.step_id}",
            node_name=step.node_name,
            status=_PENDING_STATUS[step.status],
            config=step.config,
            attempt=step.attempts,
            priority=step.priority,
            enqueued_at=step.enqueued_at,
            run_after=step.due,
            error=step.last_error,
        )

    current = view.current_state if isinstance(view.current_state, dict) else {}
    return WorkflowState(
        workflow_id=view.workflow_id,
        status=WorkflowStatus(view.status.value),
        current_state=current,
        started_at=view.started_at,
        completed_at=view.completed_at,
        executed_steps=executed,
        executing_steps=executing,
        pending_steps=tuple(waiting(step) for step in view.pending),
        dead_letters=tuple(waiting(step) for step in view.dead_letters),
        last_error=view.last_error,
        metadata=dict(view.metadata),
    )
