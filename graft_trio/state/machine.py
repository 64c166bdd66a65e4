"""`WorkflowStateMachine`: the replicated state of every workflow, its queue, claims, timers and joins.

`apply` is a pure function of (state, command): no clock, no randomness, no I/O, no iteration over a set.
Time is the largest `now` any command has carried (the leader's clock, never a replica's), so it never
goes backwards when leadership moves to a member whose clock is behind. Before each command is handled,
the machine catches up with that time: due timers make their steps ready, expired leases send their
steps back to ready, and terminal workflows past their retention are removed. A `Tick` command does only
that, for when no other command flows; `NextDeadline` tells the engine when one is worth proposing.

Indexes (all rebuilt from the steps on `restore`, none part of a snapshot):

- a ready heap per node name, keyed ``(-priority, step_id)``: a claim pops the best head among the
  names it asks for, O(log n) per step claimed;
- a timer heap keyed ``(due, step_id)``, a lease heap keyed ``(lease_expires_at, claim_id)`` and a
  retention heap keyed ``(retain_until, workflow_id)``: each apply pops only what is due.

Entries are never searched for and removed: a step that leaves a heap bumps its `queue_token`, which makes
its entry stale, and stale entries are dropped when they reach the head (or when a heap holds more stale
entries than live ones). Every key is unique, so the order of pops, hence behaviour, does not depend on
the layout of a heap, and a restored machine behaves exactly like the one that took the snapshot.

Counts are kept in one place: every change of a step's status goes through `_leave` (undo the indexes
and counts of the old status) and `_enter` (set the new status, then `_index_step`), and restore builds
the indexes with that same `_index_step`. `check_invariants` recomputes them all from scratch.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

from graft_trio.raft.statemachine import StateMachine
from graft_trio.state import commands as c
from graft_trio.state.commands import CodecError, decode, decoder_for, encode, encoder_for
from graft_trio.state.events import (
    CommandBroadcast,
    Event,
    NodeCompleted,
    NodeFailed,
    NodeStarted,
    RevokedClaim,
    StepsReady,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowPaused,
    WorkflowResumed,
    WorkflowStarted,
)
from graft_trio.state.merge_patch import apply_merge_patch
from graft_trio.state.model import (
    HISTORY_LIMIT,
    MAX_LEASE_LOSSES,
    ROOT_SCOPE,
    Claim,
    ExecutedStep,
    NodeSpec,
    Scope,
    Step,
    StepStatus,
    Workflow,
    WorkflowStatus,
)

SNAPSHOT_VERSION = 1
CLAIM_ID_STRIDE = 1 << 16  # claim id = log index * stride + position in the command: monotonic, never reused
RETENTION_BATCH = 1000  # workflows removed by one apply at most; the rest go with the next commands

READY = StepStatus.READY
DELAYED = StepStatus.DELAYED
CLAIMED = StepStatus.CLAIMED
PARKED = StepStatus.PARKED
DEAD = StepStatus.DEAD
RUNNING = WorkflowStatus.RUNNING
PAUSED = WorkflowStatus.PAUSED
ACTIVE_STATUSES = (READY, DELAYED, CLAIMED)
LIVE_WORKFLOW = (RUNNING, PAUSED)
_SEALED = (WorkflowStatus.COMPLETED, WorkflowStatus.CANCELLED)  # statuses after which a workflow never changes


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

EventListener = Callable[[Sequence[Event]], None]


def _record_encoder(cls: type[Any]) -> Callable[[Any], Any]:
    encoder = encoder_for(cls)
    assert encoder is not None
    return encoder


_encode_step = _record_encoder(Step)
_decode_step = decoder_for(Step)
_encode_scope = _record_encoder(Scope)
_decode_scope = decoder_for(Scope)
_encode_executed = _record_encoder(ExecutedStep)
_decode_executed = decoder_for(ExecutedStep)


class InvalidCommand(Exception):
    """Raised by validation, before anything is changed; becomes an `Invalid` reply."""


def retry_delay(failures: int, initial_interval: float, backoff: float, max_interval: float, jitter: float) -> float:
    """Seconds before retry number `failures`: exponential, capped, spread by the proposer's jitter and capped
    again, so that no wait exceeds `max_interval` (as `RetryPolicy.delay_for` computes it)."""
    try:
        base = initial_interval * backoff ** (failures - 1)
    except OverflowError:
        base = max_interval
    return max(0.0, min(min(base, max_interval) * (1.0 + jitter), max_interval))


class WorkflowStateMachine(StateMachine):
    """The workflow log's state machine; see the module docstring and docs/STATE.md.

    `listener` is called after every apply with the events it emitted (on every member alike). It runs
    inside Raft's apply loop, so it must be quick and must not raise: hand the events to a channel.
    """

    def __init__(self, listener: EventListener | None = None) -> None:
        self.listener = listener
        # How far this member's clock was found behind replicated time while it led (see `leader_time`).
        # Local, never replicated: it relates this member's clock to the log's time.
        self._clock_correction = 0.0
        self._reset()

    def _reset(self) -> None:
        self.now = 0.0
        self.next_step_id = 1
        self.workflows: dict[str, Workflow] = {}
        self._steps: dict[int, Step] = {}
        self._claims: dict[int, Step] = {}
        self._member_claims: dict[str, dict[int, None]] = {}
        self._ready: dict[str, list[tuple[int, int, int]]] = {}
        self._ready_count: dict[str, int] = {}  # claimable steps per node name
        self._delayed_count: dict[str, int] = {}
        self._claimed_count: dict[str, int] = {}
        self._totals: dict[StepStatus, int] = dict.fromkeys(StepStatus, 0)
        self._status_count: dict[WorkflowStatus, int] = dict.fromkeys(WorkflowStatus, 0)
        self._timers: list[tuple[float, int, int]] = []
        self._leases: list[tuple[float, int]] = []
        self._retention: list[tuple[float, str]] = []
        # Scratch of the command being applied.
        self._index = 0
        self._events: list[Event] = []
        self._ready_names: dict[str, None] = {}
        self._enqueued: list[int] = []
        self._dropped: list[str] = []

    # --- the StateMachine interface -------------------------------------------------------------------

    def stamp(self, command: bytes, leader_time: float) -> bytes:
        """Commands carry the leader's time (`leader_time` of its clock), whichever member proposed them."""
        return c.restamp(command, self.leader_time(leader_time))

    def leader_time(self, clock_now: float) -> float:
        """The time this member stamps on commands while it leads, given its clock's reading.

        Its clock, moved forward by as much as it was ever found behind replicated time. A leader whose clock
        is behind the previous leader's would otherwise stamp times the log already passed: replicated time
        (the maximum of the stamps) would stand still until its clock caught up, and every timer, lease and
        retention would fire that much late. With the correction it advances at the leader's pace from where
        the log stands. A clock ahead of the log needs none: replicated time jumps forward to it, as it
        would with any leader change between members whose clocks differ.
        """
        if clock_now + self._clock_correction < self.now:
            self._clock_correction = self.now - clock_now
        return clock_now + self._clock_correction

    def apply(self, index: int, command: bytes) -> bytes:
        try:
            decoded = decode(command)
        except CodecError as exc:
            return encode(c.Invalid(str(exc)))
        result, events = self.apply_command(index, decoded)
        if events and self.listener is not None:
            self.listener(events)
        return encode(result)

    def query(self, query: bytes) -> bytes:
        try:
            decoded = decode(query)
        except CodecError as exc:
            return encode(c.Invalid(str(exc)))
        return encode(self.answer(decoded))

    def snapshot(self) -> bytes:
        """The whole state as JSON: `[version, now, next_step_id, [workflow record, ...]]`.

        It runs on the member's event loop. A COMPLETED or CANCELLED workflow never changes again, so its
        record is encoded once and kept (`Workflow.sealed_record`): with the default 7-day retention those
        are nearly all of the records, and a snapshot costs little more than joining them.
        """
        records: list[bytes] = []
        for wf in self.workflows.values():
            if wf.status in _SEALED:
                if wf.sealed_record is None:
                    wf.sealed_record = _dumps(self._workflow_record(wf))
                records.append(wf.sealed_record)
            else:
                records.append(_dumps(self._workflow_record(wf)))
        head = _dumps([SNAPSHOT_VERSION, self.now, self.next_step_id])
        return b"%s,[%s]]" % (head[:-1], b",".join(records))

    def restore(self, snapshot: bytes) -> None:
        """Replace the whole state. No events are emitted: a member that installs a snapshot skipped the
        entries in between, so its engine should read the state again (`MemberClaims`, `GetWorkflow`)."""
        raw = json.loads(snapshot)
        if not isinstance(raw, list) or len(raw) != 4 or raw[0] != SNAPSHOT_VERSION:
            raise CodecError(f"not a workflow snapshot of version {SNAPSHOT_VERSION}")
        _, now, next_step_id, workflows = raw
        self._reset()
        self.now = float(now)
        self.next_step_id = next_step_id
        for record in workflows:
            wf = self._workflow_from_record(record)
            self.workflows[wf.workflow_id] = wf
            self._status_count[wf.status] += 1
            for step in wf.steps.values():
                self._steps[step.step_id] = step
                self._index_step(wf, step)
            self._push_retention(wf)
        self._ready_names = {}

    # --- applying a command -----------------------------------------------------------------------------

    def apply_command(self, index: int, command: Any) -> tuple[c.Result, list[Event]]:
        """Apply a decoded command at log `index`: the reply and the events, in order."""
        handler = _HANDLERS.get(type(command))
        if handler is None:
            return c.Invalid(f"{type(command).__name__} is not a command"), []
        if not math.isfinite(command.now):
            return c.Invalid("now must be a finite number"), []
        self._index = index
        self._events = []
        self._ready_names = {}
        self._enqueued = []
        self._dropped = []
        self.now = max(self.now, command.now)
        self._fire_timers()
        self._expire_leases()
        self._remove_retained()
        try:
            result = handler(self, command)
        except InvalidCommand as exc:
            result = c.Invalid(str(exc))
        self._trim_heads()
        events = self._events
        if self._ready_names:
            events.append(StepsReady(index, tuple(self._ready_names)))
        self._events = []
        return result, events

    def _start(self, cmd: c.StartWorkflow) -> c.Result:
        _check_duration(cmd.retention, "retention")
        for spec in cmd.initial_nodes:
            _check_spec(spec)
        if cmd.workflow_id in self.workflows:
            return c.WorkflowExists(cmd.workflow_id)
        wf = Workflow(
            workflow_id=cmd.workflow_id,
            status=RUNNING,
            state=cmd.initial_state,
            metadata=cmd.metadata,
            started_at=self.now,
            retention=cmd.retention,
        )
        wf.scopes[ROOT_SCOPE] = Scope(ROOT_SCOPE, None, None)
        self.workflows[wf.workflow_id] = wf
        self._status_count[RUNNING] += 1
        names = tuple(spec.name for spec in cmd.initial_nodes)
        self._events.append(WorkflowStarted(self._index, wf.workflow_id, self.now, names, wf.metadata))
        for spec in cmd.initial_nodes:
            self._enqueue(wf, spec, ROOT_SCOPE)
        self._settle(wf, ROOT_SCOPE)  # a trigger with no nodes completes at once
        return c.Started(wf.workflow_id, tuple(self._enqueued), wf.status)

    def _claim(self, cmd: c.Claim) -> c.Result:
        if not 0 <= cmd.max_count <= c.MAX_CLAIMS_PER_COMMAND:
            raise InvalidCommand(f"max_count must be in [0, {c.MAX_CLAIMS_PER_COMMAND}]")
        _check_lease(cmd.lease_seconds)
        names = list(dict.fromkeys(cmd.node_names))
        room = {name: cmd.node_limits.get(name, cmd.max_count) for name in names}
        grants: list[c.ClaimGrant] = []
        while len(grants) < cmd.max_count:
            best: tuple[int, int, int] | None = None
            best_name = ""
            for name in names:
                if room[name] <= 0:
                    continue
                head = self._ready_head(name)
                if head is not None and (best is None or head < best):
                    best, best_name = head, name
            if best is None:
                break
            heapq.heappop(self._ready[best_name])
            room[best_name] -= 1
            step = self._steps[best[1]]
            wf = self.workflows[step.workflow_id]
            claim_id = self._index * CLAIM_ID_STRIDE + len(grants)
            self._leave(wf, step)
            step.attempts += 1
            claim = Claim(
                claim_id=claim_id,
                member_id=cmd.member_id,
                attempt=step.attempts,
                execution_id=f"{wf.workflow_id}/{step.spec.name}/{step.step_id}",  # one per step, all attempts
                claimed_at=self.now,
                lease_expires_at=self.now + cmd.lease_seconds,
            )
            step.claim = claim
            self._enter(wf, step, CLAIMED)
            grants.append(
                c.ClaimGrant(
                    claim_id=claim_id,
                    step_id=step.step_id,
                    workflow_id=wf.workflow_id,
                    node_name=step.spec.name,
                    config=step.spec.config,
                    attempt=claim.attempt,
                    execution_id=claim.execution_id,
                    lease_expires_at=claim.lease_expires_at,
                    state=wf.state,
                    state_version=wf.state_version,
                    metadata=wf.metadata,
                    workflow_started_at=wf.started_at,
                )
            )
            self._events.append(
                NodeStarted(
                    self._index,
                    wf.workflow_id,
                    step.step_id,
                    step.spec.name,
                    claim_id,
                    cmd.member_id,
                    claim.attempt,
                    claim.execution_id,
                    self.now,
                )
            )
        return c.Claimed(tuple(grants))

    def _renew(self, cmd: c.RenewClaims) -> c.Result:
        _check_lease(cmd.lease_seconds)
        expires = self.now + cmd.lease_seconds
        renewed: list[int] = []
        lost: list[int] = []
        for claim_id in cmd.claim_ids:
            step = self._claims.get(claim_id)
            if step is None or step.claim is None or step.claim.member_id != cmd.member_id:
                lost.append(claim_id)
                continue
            if expires > step.claim.lease_expires_at:  # a renewal never shortens a lease
                step.claim.lease_expires_at = expires
                self._push_lease(step.claim)
            renewed.append(claim_id)
        return c.Renewed(expires, tuple(renewed), tuple(lost))

    def _release(self, cmd: c.ReleaseClaims) -> c.Result:
        held = self._member_claims.get(cmd.member_id, {})
        claim_ids = sorted(held) if not cmd.claim_ids else [i for i in dict.fromkeys(cmd.claim_ids) if i in held]
        for claim_id in claim_ids:
            step = self._claims[claim_id]
            wf = self.workflows[step.workflow_id]
            if cmd.crashed:
                self._lose_claim(wf, step, f"member {cmd.member_id} restarted while running the step")
            else:
                self._leave(wf, step)
                step.attempts -= 1  # handed back unrun: not an attempt
                self._enter(wf, step, READY)
        return c.Released(tuple(claim_ids))

    def _complete(self, cmd: c.CompleteStep) -> c.Result:
        for spec in cmd.next_nodes:
            _check_spec(spec)
        if cmd.join is not None:
            _check_spec(cmd.join)
        step = self._claims.get(cmd.claim_id)
        if step is None or step.claim is None:
            return c.ClaimLost(cmd.claim_id)
        wf = self.workflows[step.workflow_id]
        claim = step.claim
        changed = False
        if cmd.patch is not None:
            new_state, changed = apply_merge_patch(wf.state, cmd.patch)
            if changed:
                wf.state = new_state
                wf.state_version += 1
        self._leave(wf, step)
        self._record(wf, step, claim, "completed", None)
        wf.executed_count += 1

        scope = wf.scopes[step.scope_id]
        target = scope
        join = cmd.join
        if join is not None and not (scope.join is not None and scope.join.name == join.name):
            if cmd.next_nodes:
                # A fan-out with a join: its next nodes form a new scope the join waits for.
                target = Scope(wf.next_scope_id, scope.scope_id, join)
                wf.next_scope_id += 1
                wf.scopes[target.scope_id] = target
                scope.outstanding += 1
            else:
                # A branch asking for a fan-in: once per scope, when the scope it is in drains.
                scope.barriers.setdefault(join.name, join)
        # (A join naming the scope's own join adds nothing: that join already waits for this work.)
        for spec in cmd.next_nodes:
            self._enqueue(wf, spec, target.scope_id)
        if target is not scope:
            self._settle(wf, target.scope_id)  # all its nodes may have been dropped as duplicates
        if changed:
            self._unpark_all(wf)

        del wf.steps[step.step_id]
        del self._steps[step.step_id]
        scope.outstanding -= 1
        self._events.append(
            NodeCompleted(
                self._index,
                wf.workflow_id,
                step.step_id,
                step.spec.name,
                claim.claim_id,
                claim.member_id,
                claim.attempt,
                claim.execution_id,
                claim.claimed_at,
                self.now,
                tuple(s.name for s in cmd.next_nodes),
            )
        )
        self._settle(wf, scope.scope_id)
        self._fail_if_stuck(wf)
        return c.StepCompleted(wf.workflow_id, tuple(self._enqueued), tuple(self._dropped), wf.status)

    def _fail(self, cmd: c.FailStep) -> c.Result:
        if cmd.max_attempts < 1:
            raise InvalidCommand("max_attempts must be at least 1")
        _check_duration(cmd.initial_interval, "initial_interval")
        _check_duration(cmd.max_interval, "max_interval")
        if not (math.isfinite(cmd.backoff) and cmd.backoff >= 1.0):
            raise InvalidCommand("backoff must be a finite number of at least 1")
        if not -1.0 <= cmd.jitter <= 1.0:
            raise InvalidCommand("jitter must be in [-1, 1]")
        step = self._claims.get(cmd.claim_id)
        if step is None or step.claim is None:
            return c.ClaimLost(cmd.claim_id)
        wf = self.workflows[step.workflow_id]
        claim = step.claim
        self._leave(wf, step)
        self._record(wf, step, claim, "failed", cmd.error)
        step.failures += 1
        step.last_error = cmd.error
        retry_at: float | None = None
        if cmd.retryable and step.failures < cmd.max_attempts:
            delay = retry_delay(step.failures, cmd.initial_interval, cmd.backoff, cmd.max_interval, cmd.jitter)
            retry_at = self.now + delay
            self._make_waiting(wf, step, retry_at)
        self._events.append(self._node_failed(step, claim, cmd.error, retry_at, lease_expired=False))
        if retry_at is None:
            self._enter(wf, step, DEAD)
            self._fail_workflow(wf, cmd.error, step)
        return c.StepFailed(wf.workflow_id, retry_at, retry_at is None, wf.status)

    def _park(self, cmd: c.ParkStep) -> c.Result:
        step = self._claims.get(cmd.claim_id)
        if step is None:
            return c.ClaimLost(cmd.claim_id)
        wf = self.workflows[step.workflow_id]
        self._leave(wf, step)
        step.attempts -= 1  # can_start said "not yet": the node did not run
        parked = cmd.state_version == wf.state_version
        self._enter(wf, step, PARKED if parked else READY)
        self._fail_if_stuck(wf)
        return c.StepParked(wf.workflow_id, parked, wf.status)

    def _pause(self, cmd: c.PauseWorkflow) -> c.Result:
        wf = self.workflows.get(cmd.workflow_id)
        if wf is None:
            return c.NotFound(cmd.workflow_id)
        if wf.status is not RUNNING:
            return c.InvalidTransition(wf.workflow_id, wf.status, "pause")
        self._set_status(wf, PAUSED)
        self._events.append(WorkflowPaused(self._index, wf.workflow_id, self.now))
        return c.StatusChanged(wf.workflow_id, wf.status)

    def _resume(self, cmd: c.ResumeWorkflow) -> c.Result:
        wf = self.workflows.get(cmd.workflow_id)
        if wf is None:
            return c.NotFound(cmd.workflow_id)
        if wf.status is not PAUSED:
            return c.InvalidTransition(wf.workflow_id, wf.status, "resume")
        self._set_status(wf, RUNNING)
        self._events.append(WorkflowResumed(self._index, wf.workflow_id, self.now, retried=False))
        return c.StatusChanged(wf.workflow_id, wf.status)

    def _cancel(self, cmd: c.CancelWorkflow) -> c.Result:
        wf = self.workflows.get(cmd.workflow_id)
        if wf is None:
            return c.NotFound(cmd.workflow_id)
        if wf.status not in LIVE_WORKFLOW:
            return c.InvalidTransition(wf.workflow_id, wf.status, "cancel")
        revoked: list[RevokedClaim] = []
        for step in wf.steps.values():
            if step.claim is not None:
                revoked.append(RevokedClaim(step.claim.claim_id, step.claim.member_id, step.step_id, step.spec.name))
            self._leave(wf, step)
            del self._steps[step.step_id]
        wf.steps.clear()
        wf.scopes = {ROOT_SCOPE: Scope(ROOT_SCOPE, None, None)}
        self._set_status(wf, WorkflowStatus.CANCELLED)
        self._events.append(WorkflowCancelled(self._index, wf.workflow_id, self.now, cmd.reason, tuple(revoked)))
        return c.StatusChanged(wf.workflow_id, wf.status)

    def _retry(self, cmd: c.RetryWorkflow) -> c.Result:
        wf = self.workflows.get(cmd.workflow_id)
        if wf is None:
            return c.NotFound(cmd.workflow_id)
        if wf.status is not WorkflowStatus.FAILED:
            return c.InvalidTransition(wf.workflow_id, wf.status, "retry")
        self._set_status(wf, RUNNING)
        for step in [s for s in wf.steps.values() if s.status is DEAD]:
            self._leave(wf, step)
            step.failures = 0
            step.lease_losses = 0
            self._enter(wf, step, READY)
        self._events.append(WorkflowResumed(self._index, wf.workflow_id, self.now, retried=True))
        return c.StatusChanged(wf.workflow_id, wf.status)

    def _tick(self, cmd: c.Tick) -> c.Result:
        return c.Ticked(self.now)

    def _broadcast(self, cmd: c.Broadcast) -> c.Result:
        if not cmd.name:
            raise InvalidCommand("a broadcast command needs a name")
        self._events.append(CommandBroadcast(self._index, cmd.name, cmd.params, cmd.origin, self.now))
        return c.Broadcasted(self._index)

    # --- time -------------------------------------------------------------------------------------------

    def _fire_timers(self) -> None:
        timers = self._timers
        while timers and timers[0][0] <= self.now:
            entry = heapq.heappop(timers)
            if not self._live_timer(entry):
                continue
            step = self._steps[entry[1]]
            wf = self.workflows[step.workflow_id]
            self._leave(wf, step)
            self._enter(wf, step, READY)

    def _expire_leases(self) -> None:
        leases = self._leases
        while leases and leases[0][0] <= self.now:
            entry = heapq.heappop(leases)
            if not self._live_lease(entry):
                continue
            step = self._claims[entry[1]]
            assert step.claim is not None
            wf = self.workflows[step.workflow_id]
            self._lose_claim(wf, step, f"the lease of claim {entry[1]} held by {step.claim.member_id} expired")

    def _remove_retained(self) -> None:
        retention = self._retention
        removed = 0
        while retention and retention[0][0] <= self.now and removed < RETENTION_BATCH:
            entry = heapq.heappop(retention)
            if not self._live_retention(entry):
                continue
            workflow_id = entry[1]
            wf = self.workflows[workflow_id]
            for step in wf.steps.values():  # a FAILED workflow may still hold steps
                self._leave(wf, step)
                del self._steps[step.step_id]
            del self.workflows[workflow_id]
            self._status_count[wf.status] -= 1
            removed += 1

    def _trim_heads(self) -> None:
        """Drop stale heads, so that `NextDeadline` names a real deadline."""
        while self._timers and not self._live_timer(self._timers[0]):
            heapq.heappop(self._timers)
        while self._leases and not self._live_lease(self._leases[0]):
            heapq.heappop(self._leases)
        while self._retention and not self._live_retention(self._retention[0]):
            heapq.heappop(self._retention)

    # --- steps: status changes and the indexes that follow them ------------------------------------------

    def _enqueue(self, wf: Workflow, spec: NodeSpec, scope_id: int) -> Step | None:
        key = spec.idempotency_key
        if key is not None:
            if key in wf.idempotency_keys:
                self._dropped.append(key)
                return None
            wf.idempotency_keys[key] = None
        step = Step(self.next_step_id, wf.workflow_id, spec, scope_id, READY, self.now)
        self.next_step_id += 1
        wf.steps[step.step_id] = step
        self._steps[step.step_id] = step
        wf.scopes[scope_id].outstanding += 1
        self._enqueued.append(step.step_id)
        if spec.delay > 0:
            self._make_waiting(wf, step, self.now + spec.delay)
        else:
            self._enter(wf, step, READY)
        return step

    def _make_waiting(self, wf: Workflow, step: Step, due: float) -> None:
        """Enter DELAYED until `due`, or READY if that is not in the future."""
        if due > self.now:
            step.due = due
            self._enter(wf, step, DELAYED)
        else:
            self._enter(wf, step, READY)

    def _enter(self, wf: Workflow, step: Step, status: StepStatus) -> None:
        step.status = status
        self._index_step(wf, step)

    def _index_step(self, wf: Workflow, step: Step) -> None:
        """Add `step`, in its current status, to the counts and indexes."""
        status = step.status
        name = step.spec.name
        self._totals[status] += 1
        if status is READY:
            wf.active += 1
            if wf.status is RUNNING:
                self._queue(step)
        elif status is DELAYED:
            assert step.due is not None
            wf.active += 1
            _bump(self._delayed_count, name, 1)
            step.queue_token += 1
            _push(self._timers, (step.due, step.step_id, step.queue_token), self._totals[DELAYED], self._live_timer)
        elif status is CLAIMED:
            claim = step.claim
            assert claim is not None
            wf.active += 1
            _bump(self._claimed_count, name, 1)
            self._claims[claim.claim_id] = step
            self._member_claims.setdefault(claim.member_id, {})[claim.claim_id] = None
            self._push_lease(claim)
        elif status is PARKED:
            wf.parked += 1
        else:
            wf.dead += 1

    def _leave(self, wf: Workflow, step: Step) -> None:
        """Remove `step` from the counts and indexes of its current status (the inverse of `_index_step`)."""
        status = step.status
        name = step.spec.name
        self._totals[status] -= 1
        if status is READY:
            wf.active -= 1
            self._unqueue(step)
        elif status is DELAYED:
            wf.active -= 1
            _bump(self._delayed_count, name, -1)
            step.queue_token += 1
            step.due = None
        elif status is CLAIMED:
            claim = step.claim
            assert claim is not None
            wf.active -= 1
            _bump(self._claimed_count, name, -1)
            del self._claims[claim.claim_id]
            held = self._member_claims[claim.member_id]
            del held[claim.claim_id]
            if not held:
                del self._member_claims[claim.member_id]
            step.claim = None
        elif status is PARKED:
            wf.parked -= 1
        else:
            wf.dead -= 1

    def _queue(self, step: Step) -> None:
        name = step.spec.name
        step.queue_token += 1
        step.queued = True
        count = _bump(self._ready_count, name, 1)
        entry = (-step.spec.priority, step.step_id, step.queue_token)
        _push(self._ready.setdefault(name, []), entry, count, self._live_ready)
        self._ready_names[name] = None

    def claimable(self, node_name: str) -> int:
        """How many steps of `node_name` a claim could take now, as far as this member has applied."""
        return self._ready_count.get(node_name, 0)

    def _unqueue(self, step: Step) -> None:
        if step.queued:
            step.queued = False
            step.queue_token += 1
            _bump(self._ready_count, step.spec.name, -1)

    def _ready_head(self, name: str) -> tuple[int, int, int] | None:
        heap = self._ready.get(name)
        while heap:
            if self._live_ready(heap[0]):
                return heap[0]
            heapq.heappop(heap)
        if heap is not None:
            del self._ready[name]
        return None

    # An entry is live while it is the one its record points at; any other entry is stale.

    def _live_ready(self, entry: tuple[int, int, int]) -> bool:
        step = self._steps.get(entry[1])
        return step is not None and step.queued and step.queue_token == entry[2]

    def _live_timer(self, entry: tuple[float, int, int]) -> bool:
        step = self._steps.get(entry[1])
        return step is not None and step.status is DELAYED and step.queue_token == entry[2]

    def _live_lease(self, entry: tuple[float, int]) -> bool:
        step = self._claims.get(entry[1])
        return step is not None and step.claim is not None and step.claim.lease_expires_at == entry[0]

    def _live_retention(self, entry: tuple[float, str]) -> bool:
        wf = self.workflows.get(entry[1])
        return wf is not None and wf.retain_until == entry[0]

    def _push_lease(self, claim: Claim) -> None:
        _push(self._leases, (claim.lease_expires_at, claim.claim_id), len(self._claims), self._live_lease)

    def _push_retention(self, wf: Workflow) -> None:
        until = wf.retain_until
        if until is not None:
            terminal = len(self.workflows) - self._status_count[RUNNING] - self._status_count[PAUSED]
            _push(self._retention, (until, wf.workflow_id), terminal, self._live_retention)

    def _lose_claim(self, wf: Workflow, step: Step, reason: str) -> None:
        """The claim's attempt is gone with its member: not the user code's fault, so no retry is spent,
        but a step that loses its lease `MAX_LEASE_LOSSES` times (it crashes whoever runs it) is dead."""
        claim = step.claim
        assert claim is not None
        self._leave(wf, step)
        self._record(wf, step, claim, "lease_expired", reason)
        step.lease_losses += 1
        step.last_error = reason
        dead = step.lease_losses >= MAX_LEASE_LOSSES
        if dead:
            reason = f"{reason}; the step lost its claim {step.lease_losses} times (it crashes or stalls its member)"
        self._events.append(self._node_failed(step, claim, reason, None if dead else self.now, lease_expired=True))
        if dead:
            self._enter(wf, step, DEAD)
            self._fail_workflow(wf, reason, step)
        else:
            self._enter(wf, step, READY)

    def _unpark_all(self, wf: Workflow) -> None:
        if wf.parked:
            for step in wf.steps.values():
                if step.status is PARKED:
                    self._leave(wf, step)
                    self._enter(wf, step, READY)

    def _fail_if_stuck(self, wf: Workflow) -> None:
        """Parked steps with no work left that could change the state would wait forever: fail instead."""
        if wf.parked and not wf.active and wf.status in LIVE_WORKFLOW:
            parked = [s for s in wf.steps.values() if s.status is PARKED]
            names = ", ".join(dict.fromkeys(s.spec.name for s in parked))
            error = f"can_start of {names} stayed false and no work is left that could change the state"
            for step in parked:
                self._leave(wf, step)
                step.last_error = error
                self._enter(wf, step, DEAD)
            self._fail_workflow(wf, error, parked[0])

    def _record(self, wf: Workflow, step: Step, claim: Claim, outcome: str, error: str | None) -> None:
        wf.history.append(
            ExecutedStep(
                step.step_id,
                step.spec.name,
                claim.attempt,
                claim.claim_id,
                claim.member_id,
                claim.execution_id,
                claim.claimed_at,
                self.now,
                outcome,
                error,
            )
        )

    def _node_failed(
        self, step: Step, claim: Claim, error: str, retry_at: float | None, *, lease_expired: bool
    ) -> NodeFailed:
        return NodeFailed(
            self._index,
            step.workflow_id,
            step.step_id,
            step.spec.name,
            claim.claim_id,
            claim.member_id,
            claim.attempt,
            claim.execution_id,
            error,
            self.now,
            retry_at,
            retry_at is None,
            lease_expired,
        )

    # --- scopes and workflow status -------------------------------------------------------------------

    def _settle(self, wf: Workflow, scope_id: int) -> None:
        """Run what waits for a scope that may have drained: its barriers, then its join, up the tree."""
        scope = wf.scopes[scope_id]
        while scope.outstanding == 0:
            if scope.barriers:
                barriers = list(scope.barriers.values())
                scope.barriers.clear()
                for spec in barriers:
                    self._enqueue(wf, spec, scope.scope_id)
                continue
            if scope.parent_id is None:
                self._complete_workflow(wf)
                return
            assert scope.join is not None
            del wf.scopes[scope.scope_id]
            parent = wf.scopes[scope.parent_id]
            parent.outstanding -= 1
            self._enqueue(wf, scope.join, parent.scope_id)
            scope = parent

    def _complete_workflow(self, wf: Workflow) -> None:
        # Reached only when nothing is outstanding, which a FAILED workflow (it has a dead letter) or a
        # CANCELLED one (it is never settled) cannot be: a terminal status is never overwritten.
        assert wf.status in LIVE_WORKFLOW, wf.status
        self._set_status(wf, WorkflowStatus.COMPLETED)
        self._events.append(WorkflowCompleted(self._index, wf.workflow_id, wf.started_at, self.now, wf.state))

    def _fail_workflow(self, wf: Workflow, error: str, step: Step) -> None:
        wf.last_error = error
        if wf.status in LIVE_WORKFLOW:
            self._set_status(wf, WorkflowStatus.FAILED)
            self._events.append(
                WorkflowFailed(self._index, wf.workflow_id, self.now, error, step.spec.name, step.step_id)
            )

    def _set_status(self, wf: Workflow, status: WorkflowStatus) -> None:
        wf.sealed_record = None
        old = wf.status
        self._status_count[old] -= 1
        self._status_count[status] += 1
        wf.status = status
        if old is RUNNING:
            for step in wf.steps.values():
                self._unqueue(step)
        elif status is RUNNING:
            for step in wf.steps.values():
                if step.status is READY:
                    self._queue(step)
        if status.is_terminal:
            wf.completed_at = self.now
            self._push_retention(wf)
        else:
            wf.completed_at = None

    # --- reads ----------------------------------------------------------------------------------------

    def answer(self, query: Any) -> c.Answer | c.Invalid:
        """Answer a decoded query; reads never change the state."""
        if isinstance(query, c.GetWorkflow):
            wf = self.workflows.get(query.workflow_id)
            return c.NotFound(query.workflow_id) if wf is None else self._view(wf)
        if isinstance(query, c.ListWorkflows):
            matching = [wf for wf in self.workflows.values() if query.status is None or wf.status is query.status]
            page = matching[max(query.offset, 0) : max(query.offset, 0) + max(query.limit, 0)]
            summaries = tuple(
                c.WorkflowSummary(wf.workflow_id, wf.status, wf.started_at, wf.completed_at, wf.last_error)
                for wf in page
            )
            return c.WorkflowList(summaries, len(matching))
        if isinstance(query, c.QueueDepth):
            names = sorted(dict.fromkeys([*self._ready_count, *self._delayed_count, *self._claimed_count]))
            return c.QueueDepthView(
                tuple(
                    c.NodeQueueDepth(
                        name,
                        self._ready_count.get(name, 0),
                        self._delayed_count.get(name, 0),
                        self._claimed_count.get(name, 0),
                    )
                    for name in names
                )
            )
        if isinstance(query, c.MemberClaims):
            claim_ids = sorted(self._member_claims.get(query.member_id, {}))
            return c.MemberClaimsView(query.member_id, tuple(_executing(self._claims[i]) for i in claim_ids))
        if isinstance(query, c.NextDeadline):
            heads: list[float] = []
            for heap in (self._timers, self._leases, self._retention):
                if heap:
                    heads.append(heap[0][0])
            return c.NextDeadlineView(min(heads) if heads else None)
        if isinstance(query, c.Stats):
            return c.StatsView(
                self.now,
                {status.value: count for status, count in self._status_count.items()},
                self._totals[READY],
                self._totals[DELAYED],
                self._totals[CLAIMED],
                self._totals[PARKED],
                self._totals[DEAD],
            )
        return c.Invalid(f"{type(query).__name__} is not a query")

    def _view(self, wf: Workflow) -> c.WorkflowView:
        executing: list[c.ExecutingStepView] = []
        pending: list[c.StepView] = []
        dead: list[c.StepView] = []
        for step in wf.steps.values():
            if step.status is CLAIMED:
                executing.append(_executing(step))
            else:
                view = c.StepView(
                    step.step_id,
                    step.spec.name,
                    step.spec.config,
                    step.status,
                    step.spec.priority,
                    step.enqueued_at,
                    step.due,
                    step.attempts,
                    step.failures,
                    step.last_error,
                )
                (dead if step.status is DEAD else pending).append(view)
        waiting: list[c.WaitingJoinView] = []
        for scope in wf.scopes.values():
            if scope.join is not None:
                waiting.append(c.WaitingJoinView(scope.join.name, scope.scope_id, scope.outstanding))
            for name in scope.barriers:
                waiting.append(c.WaitingJoinView(name, scope.scope_id, scope.outstanding))
        return c.WorkflowView(
            workflow_id=wf.workflow_id,
            status=wf.status,
            current_state=wf.state,
            metadata=wf.metadata,
            started_at=wf.started_at,
            completed_at=wf.completed_at,
            last_error=wf.last_error,
            state_version=wf.state_version,
            executed=tuple(wf.history),
            executed_count=wf.executed_count,
            executing=tuple(executing),
            pending=tuple(pending),
            dead_letters=tuple(dead),
            waiting_joins=tuple(waiting),
        )

    # --- snapshot records -------------------------------------------------------------------------------

    @staticmethod
    def _workflow_record(wf: Workflow) -> list[Any]:
        return [
            wf.workflow_id,
            wf.status.value,
            wf.state,
            wf.metadata,
            wf.started_at,
            wf.retention,
            wf.completed_at,
            wf.last_error,
            wf.state_version,
            wf.next_scope_id,
            wf.executed_count,
            [_encode_step(step) for step in wf.steps.values()],
            [_encode_scope(scope) for scope in wf.scopes.values()],
            list(wf.idempotency_keys),
            [_encode_executed(record) for record in wf.history],
        ]

    @staticmethod
    def _workflow_from_record(record: list[Any]) -> Workflow:
        (
            workflow_id,
            status,
            state,
            metadata,
            started_at,
            retention,
            completed_at,
            last_error,
            state_version,
            next_scope_id,
            executed_count,
            steps,
            scopes,
            keys,
            history,
        ) = record
        wf = Workflow(
            workflow_id=workflow_id,
            status=WorkflowStatus(status),
            state=state,
            metadata=metadata,
            started_at=float(started_at),
            retention=float(retention),
            completed_at=None if completed_at is None else float(completed_at),
            last_error=last_error,
            state_version=state_version,
            next_scope_id=next_scope_id,
            executed_count=executed_count,
        )
        for raw in steps:
            step = _decode_step(raw)
            wf.steps[step.step_id] = step
        for raw in scopes:
            scope = _decode_scope(raw)
            wf.scopes[scope.scope_id] = scope
        wf.idempotency_keys = dict.fromkeys(keys)
        wf.history.extend(_decode_executed(raw) for raw in history[-HISTORY_LIMIT:])
        return wf

    # --- invariants -------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Recompute every count and index from the steps and compare; raises AssertionError. O(n): for
        tests and the simulator, not for the apply path."""
        steps: dict[int, Step] = {}
        ready: dict[str, int] = {}
        delayed: dict[str, int] = {}
        claimed: dict[str, int] = {}
        totals = dict.fromkeys(StepStatus, 0)
        statuses = dict.fromkeys(WorkflowStatus, 0)
        claims: dict[int, Step] = {}
        for wf in self.workflows.values():
            statuses[wf.status] += 1
            outstanding = dict.fromkeys(wf.scopes, 0)
            counts = dict.fromkeys(StepStatus, 0)
            for step_id, step in wf.steps.items():
                assert step_id == step.step_id and step.workflow_id == wf.workflow_id
                assert step.step_id < self.next_step_id
                assert step.step_id not in steps, f"step {step_id} in two workflows"
                steps[step_id] = step
                counts[step.status] += 1
                totals[step.status] += 1
                assert step.scope_id in wf.scopes, f"step {step_id} in a closed scope {step.scope_id}"
                outstanding[step.scope_id] += 1
                assert (step.claim is not None) == (step.status is CLAIMED), f"step {step_id} claim/status"
                assert (step.due is not None) == (step.status is DELAYED), f"step {step_id} due/status"
                assert step.queued == (step.status is READY and wf.status is RUNNING), f"step {step_id} queued"
                if step.status is READY and wf.status is RUNNING:
                    _bump(ready, step.spec.name, 1)
                    assert (-step.spec.priority, step_id, step.queue_token) in self._ready[step.spec.name]
                elif step.status is DELAYED:
                    _bump(delayed, step.spec.name, 1)
                    assert (step.due, step_id, step.queue_token) in self._timers, f"step {step_id} has no timer"
                elif step.claim is not None:
                    _bump(claimed, step.spec.name, 1)
                    claims[step.claim.claim_id] = step
                    assert step.claim.lease_expires_at > self.now, f"claim {step.claim.claim_id} outlived its lease"
                    assert (step.claim.lease_expires_at, step.claim.claim_id) in self._leases
            for scope in wf.scopes.values():
                if scope.parent_id is not None:
                    assert scope.parent_id in wf.scopes and scope.join is not None
                    outstanding[scope.parent_id] += 1
                else:
                    assert scope.scope_id == ROOT_SCOPE
            for scope_id, count in outstanding.items():
                assert wf.scopes[scope_id].outstanding == count, f"{wf.workflow_id} scope {scope_id} count"
            assert wf.active == counts[READY] + counts[DELAYED] + counts[CLAIMED], f"{wf.workflow_id} active"
            assert wf.parked == counts[PARKED] and wf.dead == counts[DEAD], f"{wf.workflow_id} parked/dead"
            root = wf.scopes.get(ROOT_SCOPE)
            if wf.status in LIVE_WORKFLOW:
                # completion is derived from counts: a live workflow always has something outstanding
                assert root is not None and root.outstanding > 0, f"{wf.workflow_id} live with nothing to do"
                assert not (wf.parked and not wf.active), f"{wf.workflow_id} stuck on parked steps"
                assert wf.completed_at is None
            else:
                assert wf.completed_at is not None
                assert (wf.retain_until, wf.workflow_id) in self._retention or wf.retain_until is None
            if wf.status is WorkflowStatus.FAILED:
                assert wf.dead > 0, f"{wf.workflow_id} failed without a dead letter"
            if wf.status in (WorkflowStatus.COMPLETED, WorkflowStatus.CANCELLED):
                assert not wf.steps, f"{wf.workflow_id} is {wf.status.value} with live steps"
        assert steps.keys() == self._steps.keys(), "step index"
        assert claims.keys() == self._claims.keys(), "claim index"
        assert ready == self._ready_count, f"ready counts {ready} != {self._ready_count}"
        assert delayed == self._delayed_count, "delayed counts"
        assert claimed == self._claimed_count, "claimed counts"
        assert totals == self._totals, "totals"
        assert statuses == self._status_count, "status counts"
        by_member: dict[str, list[int]] = {}
        for claim_id, step in claims.items():
            assert step.claim is not None
            by_member.setdefault(step.claim.member_id, []).append(claim_id)
        assert {m: sorted(ids) for m, ids in by_member.items()} == {
            m: sorted(ids) for m, ids in self._member_claims.items()
        }, "member claims"


_HANDLERS: dict[type[Any], Callable[[WorkflowStateMachine, Any], c.Result]] = {
    c.StartWorkflow: WorkflowStateMachine._start,
    c.Claim: WorkflowStateMachine._claim,
    c.RenewClaims: WorkflowStateMachine._renew,
    c.ReleaseClaims: WorkflowStateMachine._release,
    c.CompleteStep: WorkflowStateMachine._complete,
    c.FailStep: WorkflowStateMachine._fail,
    c.ParkStep: WorkflowStateMachine._park,
    c.PauseWorkflow: WorkflowStateMachine._pause,
    c.ResumeWorkflow: WorkflowStateMachine._resume,
    c.CancelWorkflow: WorkflowStateMachine._cancel,
    c.RetryWorkflow: WorkflowStateMachine._retry,
    c.Tick: WorkflowStateMachine._tick,
    c.Broadcast: WorkflowStateMachine._broadcast,
}


def _executing(step: Step) -> c.ExecutingStepView:
    claim = step.claim
    assert claim is not None
    return c.ExecutingStepView(
        step.workflow_id,
        step.step_id,
        step.spec.name,
        step.spec.config,
        claim.claim_id,
        claim.member_id,
        claim.attempt,
        claim.execution_id,
        claim.claimed_at,
        claim.lease_expires_at,
    )


def _bump(counts: dict[str, int], name: str, delta: int) -> int:
    count = counts.get(name, 0) + delta
    if count:
        counts[name] = count
    else:
        del counts[name]
    return count


def _push(heap: list[Any], entry: Any, live: int, valid: Callable[[Any], bool]) -> None:
    """Push; once stale entries outnumber the live ones, rebuild the heap without them (amortised O(1))."""
    heapq.heappush(heap, entry)
    if len(heap) > 2 * live + 64:
        heap[:] = [e for e in heap if valid(e)]
        heapq.heapify(heap)


def _check_spec(spec: NodeSpec) -> None:
    if not spec.name:
        raise InvalidCommand("a node needs a name")
    if not (math.isfinite(spec.delay) and spec.delay >= 0):
        raise InvalidCommand(f"node {spec.name}: delay must be a finite number >= 0")


def _check_duration(value: float, what: str) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise InvalidCommand(f"{what} must be a finite number >= 0")


def _check_lease(lease_seconds: float) -> None:
    if not (math.isfinite(lease_seconds) and lease_seconds > 0):
        raise InvalidCommand("lease_seconds must be a finite number > 0")
