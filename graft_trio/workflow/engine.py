"""The workflow engine of one member: it claims steps, runs their attempts and commits their outcomes.

Every member runs one `Engine`. Data flows one way: the engine proposes commands through Raft, the state
machine applies them on every member, and the events of the apply (`on_events`) tell the engine what to
do next:

- **Claiming.** `StepsReady` names node classes that have claimable steps. A member with free capacity
  (`max_concurrent_steps`, and each node's `concurrency`) proposes one `Claim` for the registered names
  that may have work, at most `claim_batch` steps at a time, so that members whose claims arrive at the
  leader a little later still get a share. A claim that came back full is followed by another as soon as
  there is room; one that came back short tells which names ran dry.
- **Attempts.** Each grant runs in a task of its own, in a cancel scope: `can_start` (if the node has
  one; false proposes `ParkStep`), then `execute` under the node's timeout, then one `CompleteStep`
  carrying the patch, the next nodes and the join, or one `FailStep` with the error as a string.
- **Leases.** While attempts run, their claims are renewed every `claim_lease / 3`. A claim reported
  lost (by the renewal, by a lease-expired `NodeFailed`, or revoked by `WorkflowCancelled`) cancels its
  attempt; a commit refused with `ClaimLost` is dropped: another member owns the step now.
- **Timers.** The leader proposes `Tick` when `NextDeadline` has passed in replicated time (timers,
  leases, retention; `WorkflowStateMachine.leader_time`); it sleeps until then, woken early by every
  apply. Followers leave it to the leader.

Every command gets its time from `Proposer.now`, the member's clock, in one place; proposals that fail
because there is no leader or no quorum are retried with the same request id (applied once) and backoff.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from graft_trio.clock import Clock
from graft_trio.raft.errors import (
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    ProposalTooLarge,
)
from graft_trio.raft.node import RaftNode
from graft_trio.state import commands as c
from graft_trio.state.events import Event, NodeFailed, StepsReady, WorkflowCancelled
from graft_trio.state.machine import WorkflowStateMachine
from graft_trio.state.model import NodeSpec
from graft_trio.workflow.payloads import NodeRegistry, RegisteredNode, prepare_call, result_patch
from graft_trio.workflow.types import NodeContext, NonRetryableError

logger = logging.getLogger(__name__)

RETRYABLE_ERRORS = (NotLeaderError, ProposalTimeout, NoQuorumError)
# How long a leader waits before claiming new work, so that followers (which apply each entry a round trip
# later) get a share of a light load. A few LAN round trips, and a small part of any step worth
# distributing.
LEADER_CLAIM_DELAY = 0.02
CommandBuilder = Callable[[float], Any]  # the member's `now` -> a command


class Proposer:
    """Proposes commands and reads queries through the member's Raft node, retrying what may succeed later.

    `now` is the single source of the time commands carry. A proposal retried after NotLeaderError,
    ProposalTimeout or NoQuorumError keeps its request id, so it is applied at most once, and waits a
    backoff (exponential, jittered from the member's rng) between tries.
    """

    def __init__(
        self,
        raft: RaftNode,
        clock: Clock,
        rng: random.Random,
        *,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
    ) -> None:
        self.raft = raft
        self.clock = clock
        self.rng = rng
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max

    def now(self) -> float:
        """The time stamped on every command this member proposes."""
        return self.clock.now()

    async def propose(self, build: CommandBuilder, *, timeout: float | None = None) -> Any:
        """Apply the command `build(now)` and return its decoded reply; retry until `timeout` (None: for
        ever) and then raise the last Raft error. Each try is stamped with the time it is made."""
        request_id = self.raft.new_request_id()
        deadline = math.inf if timeout is None else self.clock.now() + timeout
        delay = self.backoff_initial
        while True:
            command = c.encode(build(self.now()))
            attempt_timeout = min(self.raft.config.default_timeout, max(deadline - self.clock.now(), 0.001))
            try:
                reply = await self.raft.propose(command, timeout=attempt_timeout, request_id=request_id)
            except RETRYABLE_ERRORS:
                if self.clock.now() >= deadline:
                    raise
                delay = await self._back_off(delay, deadline)
                continue
            return c.decode(reply)

    async def read(self, query: Any, *, timeout: float | None = None) -> Any:
        """A linearizable read of `query`, retried like `propose`; returns the decoded answer."""
        deadline = math.inf if timeout is None else self.clock.now() + timeout
        delay = self.backoff_initial
        data = c.encode(query)
        while True:
            attempt_timeout = min(self.raft.config.default_timeout, max(deadline - self.clock.now(), 0.001))
            try:
                answer = await self.raft.read(data, timeout=attempt_timeout)
            except RETRYABLE_ERRORS:
                if self.clock.now() >= deadline:
                    raise
                delay = await self._back_off(delay, deadline)
                continue
            return c.decode(answer)

    async def _back_off(self, delay: float, deadline: float) -> float:
        pause = min(delay * (0.5 + 0.5 * self.rng.random()), max(deadline - self.clock.now(), 0.0))
        await self.clock.sleep(pause)
        return min(delay * 2, self.backoff_max)


@attrs.define(eq=False)
class _Attempt:
    grant: c.ClaimGrant
    registered: RegisteredNode
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    lost: str | None = None  # why the claim was taken away, once it was
    executing: bool = True  # its user code has not returned yet (it holds a slot of the member's capacity)


@attrs.frozen
class EngineStats:
    running: int
    started: int  # attempts begun by this member since it started
    committed: int  # outcomes accepted by the log
    dropped: int  # outcomes dropped: the claim was lost, revoked or the attempt cancelled


class Engine:
    """The workers of one member; see the module docstring. `run` under a nursery, feed `on_events`."""

    def __init__(
        self,
        *,
        member_id: str,
        raft: RaftNode,
        state_machine: WorkflowStateMachine,
        registry: NodeRegistry,
        proposer: Proposer,
        clock: Clock,
        rng: random.Random,
        max_concurrent_steps: int,
        claim_lease: float,
        claim_batch: int,
    ) -> None:
        self.member_id = member_id
        self.raft = raft
        self.state_machine = state_machine
        self.registry = registry
        self.proposer = proposer
        self.clock = clock
        self.rng = rng
        self.max_concurrent_steps = max_concurrent_steps
        self.claim_lease = claim_lease
        self.claim_batch = claim_batch
        self.running: dict[int, _Attempt] = {}  # claims held: attempts executing or committing their outcome
        # Attempts whose user code is running; only these take the member's and the node's capacity, so a
        # slot is free again as soon as the code returns, while its outcome is still being committed.
        self._executing = 0
        self._running_by_node: dict[str, int] = {}
        # Node names that may have claimable steps, each with the number of the signal that said so (a
        # claim that comes back short clears a name only if no newer signal arrived while it was in flight).
        self._maybe_ready: dict[str, int] = {}
        self._signals = 0
        self._claiming = False  # off until the orphans of a previous life are released, and while draining
        # How long a leader lets the followers claim new work first (see `_claim_loop`), unless it has a
        # backlog: its last claim came back full.
        self.leader_claim_delay = LEADER_CLAIM_DELAY
        self._backlog = False
        self._claim_wakeup = trio.Event()
        self._renew_wakeup = trio.Event()
        self._tick_wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._started = 0
        self._committed = 0
        self._dropped = 0

    # --- lifecycle ----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the workers until cancelled; `nursery.start(engine.run)` returns once they are running."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._tick_loop)
            nursery.start_soon(self._renew_loop)
            task_status.started()
            await self._release_orphans()
            self._claiming = True
            self.work_may_be_ready()
            await self._claim_loop()

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), self._started, self._committed, self._dropped)

    async def drain(self, timeout: float) -> None:
        """Stop claiming, cancel the running attempts and hand their claims back (a drain costs no
        attempt), so that other members take them at once instead of after the lease."""
        self._claiming = False
        claim_ids = tuple(sorted(self.running))
        for claim_id in claim_ids:
            self._take_away(claim_id, "the member is shutting down")
        if claim_ids:
            release = functools.partial(c.ReleaseClaims, member_id=self.member_id, claim_ids=claim_ids)
            try:
                with trio.move_on_at(self.clock.trio_deadline(self.clock.now() + timeout)):
                    await self.proposer.propose(release, timeout=timeout)
            except (*RETRYABLE_ERRORS, NodeStoppedError):
                pass  # no quorum to hand them back: the leases run out instead

    # --- what the apply tells us (synchronous, inside Raft's apply loop: quick, never raises) ------------

    def on_events(self, events: Sequence[Event]) -> None:
        for event in events:
            if isinstance(event, StepsReady):
                for name in event.node_names:
                    if name in self.registry:
                        self._mark_ready(name)
            elif isinstance(event, WorkflowCancelled):
                for revoked in event.revoked_claims:
                    if revoked.member_id == self.member_id:
                        self._take_away(revoked.claim_id, f"workflow {event.workflow_id} was cancelled")
            elif isinstance(event, NodeFailed) and event.lease_expired and event.member_id == self.member_id:
                self._take_away(event.claim_id, "its lease expired")
        self._tick_wakeup.set()

    def work_may_be_ready(self) -> None:
        """Claim every registered name again (at start, after a node is registered, after a snapshot)."""
        for registered in self.registry:
            self._mark_ready(registered.name)
        self._tick_wakeup.set()

    def _mark_ready(self, name: str) -> None:
        self._signals += 1
        self._maybe_ready[name] = self._signals
        self._claim_wakeup.set()

    def leadership_changed(self) -> None:
        self._tick_wakeup.set()

    def _take_away(self, claim_id: int, reason: str) -> None:
        attempt = self.running.get(claim_id)
        if attempt is not None and attempt.lost is None:
            attempt.lost = reason
            attempt.scope.cancel()

    # --- claiming -----------------------------------------------------------------------------------

    def _room(self) -> tuple[list[str], dict[str, int], int]:
        """The names worth claiming, the per-name limits and the number of steps to ask for."""
        # Outcomes waiting for their commit hold claims too; bound them as well, should commits stall.
        free = min(self.max_concurrent_steps - self._executing, 2 * self.max_concurrent_steps - len(self.running))
        if free <= 0 or not self._claiming:
            return [], {}, 0
        count = min(free, self.claim_batch)
        names: list[str] = []
        limits: dict[str, int] = {}
        for name in self._maybe_ready:
            registered = self.registry.get(name)
            if registered is None:
                continue
            if registered.concurrency is not None:
                room = registered.concurrency - self._running_by_node.get(name, 0)
                if room <= 0:
                    continue
                if room < count:
                    limits[name] = room
            names.append(name)
        return names, limits, count

    async def _claim_loop(self) -> None:
        yielded = False
        while True:
            self._claim_wakeup = trio.Event()  # replaced before looking, so no wake-up is missed
            names, limits, count = self._room()
            if names and not yielded and self._yields_to_followers():
                # The leader applies every entry first, so without this its claims always landed first and
                # under a light load it ran nearly every step while the followers idled. It lets them have
                # a go; with a backlog (its last claim came back full) it claims at once.
                await self.clock.sleep(self.leader_claim_delay)
                self._forget_names_with_nothing_claimable()
                yielded = True
                continue
            yielded = False
            if not names:
                await self._claim_wakeup.wait()
                continue
            claim = functools.partial(
                c.Claim,
                member_id=self.member_id,
                node_names=tuple(names),
                max_count=count,
                lease_seconds=self.claim_lease,
                node_limits=limits,
            )
            signals = {name: self._maybe_ready[name] for name in names}
            reply = await self.proposer.propose(claim)
            if not isinstance(reply, c.Claimed):
                logger.error("member %s: claim refused: %r", self.member_id, reply)
                await self._claim_wakeup.wait()
                continue
            self._backlog = len(reply.grants) == count
            if len(reply.grants) < count:
                # The claim stopped short: every name that was not held back by its own limit ran dry.
                granted: dict[str, int] = {}
                for grant in reply.grants:
                    granted[grant.node_name] = granted.get(grant.node_name, 0) + 1
                for name in names:
                    exhausted = granted.get(name, 0) < limits.get(name, count)
                    if exhausted and self._maybe_ready.get(name) == signals[name]:
                        del self._maybe_ready[name]
            for grant in reply.grants:
                self._start_attempt(grant)

    def _yields_to_followers(self) -> bool:
        """Whether this member, as leader of a cluster with other members, waits before claiming."""
        if self.leader_claim_delay <= 0 or self._backlog or not self.raft.is_leader:
            return False
        return len(self.raft.status().members) > 1

    def _forget_names_with_nothing_claimable(self) -> None:
        """Drop the names whose steps this member's state shows all taken: claiming them would only add
        an empty `Claim` to the log. A later `StepsReady` marks them again."""
        for name in list(self._maybe_ready):
            if self.state_machine.claimable(name) == 0:
                del self._maybe_ready[name]

    def _start_attempt(self, grant: c.ClaimGrant) -> None:
        registered = self.registry.get(grant.node_name)
        assert registered is not None and self._nursery is not None, grant.node_name
        attempt = _Attempt(grant, registered)
        self.running[grant.claim_id] = attempt
        self._executing += 1
        self._running_by_node[grant.node_name] = self._running_by_node.get(grant.node_name, 0) + 1
        self._started += 1
        self._renew_wakeup.set()
        self._nursery.start_soon(self._run_attempt, attempt)

    # --- running an attempt ---------------------------------------------------------------------------

    async def _run_attempt(self, attempt: _Attempt) -> None:
        grant = attempt.grant
        try:
            outcome: CommandBuilder | None = None
            try:
                with attempt.scope:
                    outcome = await self._execute(attempt)
            finally:
                self._finished_executing(attempt)
            if outcome is None or attempt.lost is not None:
                self._dropped += 1
                logger.debug("member %s: claim %d dropped: %s", self.member_id, grant.claim_id, attempt.lost)
                return
            try:
                reply = await self.proposer.propose(outcome)
            except ProposalTooLarge as exc:
                # The outcome (its state patch and next nodes) cannot go into the log: fail the step, for
                # good, since the same result would not fit again.
                error = f"the step's outcome does not fit in a log entry: {exc}"
                reply = await self.proposer.propose(self._failure(attempt, error, retryable=False))
            if isinstance(reply, c.ClaimLost):
                self._dropped += 1  # another member owns the step now: its outcome is the one that counts
            elif isinstance(reply, c.Invalid):
                logger.error("member %s: outcome of claim %d refused: %s", self.member_id, grant.claim_id, reply)
            else:
                self._committed += 1
        finally:
            del self.running[grant.claim_id]
            self._claim_wakeup.set()

    def _finished_executing(self, attempt: _Attempt) -> None:
        """The attempt's user code is done: its slot is free for another step (once per attempt)."""
        if attempt.executing:
            attempt.executing = False
            self._executing -= 1
            name = attempt.grant.node_name
            left = self._running_by_node[name] - 1
            if left:
                self._running_by_node[name] = left
            else:
                del self._running_by_node[name]
            self._claim_wakeup.set()

    async def _execute(self, attempt: _Attempt) -> CommandBuilder:
        """Run the node; the command that records what happened (never raises an `Exception`)."""
        grant, registered = attempt.grant, attempt.registered
        node = registered.node
        ctx = NodeContext(
            workflow_id=grant.workflow_id,
            node_name=grant.node_name,
            member_id=self.member_id,
            attempt=grant.attempt,
            execution_id=grant.execution_id,
            metadata=grant.metadata,
            started_at=self.clock.now(),
        )
        try:
            state, config = prepare_call(registered, grant.state, grant.config)
            timer = trio.CancelScope()
            if registered.timeout is not None:
                timer = self.clock.move_on_after(registered.timeout)
            result: object = None
            with timer:
                if registered.has_can_start and not await node.can_start(ctx, state, config):
                    return lambda now: c.ParkStep(now, grant.claim_id, grant.state_version)
                result = await node.execute(ctx, state, config)
            if timer.cancelled_caught:
                return self._failure(attempt, f"the attempt timed out after {registered.timeout} s", retryable=True)
            patch, next_nodes, join = result_patch(registered, result)
        except NonRetryableError as exc:  # PayloadError too: the same payload would fail again
            return self._failure(attempt, _describe(exc), retryable=False)
        except Exception as exc:
            return self._failure(attempt, _describe(exc), retryable=True)
        specs = tuple(NodeSpec(**spec) for spec in next_nodes)
        join_spec = NodeSpec(**join) if join is not None else None
        state_patch = patch or None
        return lambda now: c.CompleteStep(now, grant.claim_id, state_patch, specs, join_spec)

    def _failure(self, attempt: _Attempt, error: str, *, retryable: bool) -> CommandBuilder:
        policy = attempt.registered.retry
        jitter = policy.jitter * (2.0 * self.rng.random() - 1.0)  # drawn here so every member agrees on the delay
        claim_id = attempt.grant.claim_id
        return lambda now: c.FailStep(
            now,
            claim_id,
            error,
            retryable,
            policy.max_attempts,
            policy.initial_interval,
            policy.backoff,
            policy.max_interval,
            jitter,
        )

    # --- leases ---------------------------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        period = self.claim_lease / 3
        while True:
            if not self.running:
                self._renew_wakeup = trio.Event()
                await self._renew_wakeup.wait()
                continue
            await self.clock.sleep(period)
            claim_ids = tuple(sorted(self.running))
            if not claim_ids:
                continue
            try:
                renew = functools.partial(
                    c.RenewClaims, member_id=self.member_id, claim_ids=claim_ids, lease_seconds=self.claim_lease
                )
                reply = await self.proposer.propose(renew, timeout=period)
            except RETRYABLE_ERRORS:
                continue  # the next round tries again; an attempt whose lease runs out is cancelled by the apply
            if isinstance(reply, c.Renewed):
                for claim_id in reply.lost:
                    self._take_away(claim_id, "its claim was lost")

    async def _release_orphans(self) -> None:
        """Claims held under this member's id that this run of the engine did not make belong to a previous
        life of the member (a crash): hand them back now rather than after their lease."""
        answer = await self.proposer.read(c.MemberClaims(self.member_id))
        if not isinstance(answer, c.MemberClaimsView):
            return
        orphans = tuple(claim.claim_id for claim in answer.claims if claim.claim_id not in self.running)
        if orphans:
            await self.proposer.propose(lambda now: c.ReleaseClaims(now, self.member_id, orphans, crashed=True))

    # --- timers (the leader only) ----------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        delay = self.proposer.backoff_initial
        while True:
            self._tick_wakeup = trio.Event()
            if not self.raft.is_leader:
                await self._tick_wakeup.wait()
                continue
            answer = self.state_machine.answer(c.NextDeadline())
            due = answer.due if isinstance(answer, c.NextDeadlineView) else None
            if due is None:
                await self._tick_wakeup.wait()
                continue
            # `due` is in replicated time, which runs ahead of this member's clock if the clock was found
            # behind it (`leader_time`): wait the difference, not until the clock reads `due`.
            now = self.state_machine.leader_time(self.clock.now())
            if due > now:
                with self.clock.move_on_after(due - now):
                    await self._tick_wakeup.wait()
                continue
            try:
                await self.raft.propose(c.encode(c.Tick(self.proposer.now())))
            except RETRYABLE_ERRORS:
                await self.clock.sleep(delay * (0.5 + 0.5 * self.rng.random()))
                delay = min(delay * 2, self.proposer.backoff_max)
                continue
            delay = self.proposer.backoff_initial


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
