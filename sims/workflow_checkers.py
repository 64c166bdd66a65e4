"""The workflow engine's guarantees, checked on what a simulated run recorded (SPEC §2, issue 4 §3).

Each checker is a pure function of the run's records and returns `Violation`s (empty when the property
holds), so a test can feed it a hand-built record with a planted bug:

- **completion**: every workflow the model starts is started, and is terminal (on the log) within the
  bounded virtual time after healing;
- **model**: a workflow's final status and state are the model's: COMPLETED with every step's effect
  exactly once (one attempt key per step), or FAILED at the step the model made fatal, with only steps
  whose parent ran, none after the fatal one, each at most once; a workflow that lost one step's claim
  `MAX_LEASE_LOSSES` times (the engine's crash-loop guard) may be FAILED instead of COMPLETED;
- **joins**: a join ran at most once, and only after every step it waits for had completed in the log
  (its claim comes after their completions) and its state showed all of them;
- **effects-once**: in the log, every step completes at most once (by step id and by the model's step);
- **terminal-stable**: on every member incarnation, no event follows a workflow's terminal event, and the
  final status is the first terminal status the log announced;
- **events**: every member incarnation saw, in log order and once each, exactly the events of the log
  entries it applied (with gaps only where it installed a snapshot), and all members saw the same events
  for each entry; nobody's queue overflowed;
- **replicas-agree**: at the end every member holds the same status, state and error for each workflow.

Deterministic: no set is iterated for output; each list of violations comes out in a fixed order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from graft_trio.events import EventsDropped
from graft_trio.state.events import (
    LeaderChanged,
    MemberJoined,
    MemberLeft,
    NodeCompleted,
    NodeStarted,
    WorkflowCancelled,
    WorkflowCompleted,
    WorkflowFailed,
    WorkflowPaused,
    WorkflowResumed,
)
from sims.checkers import Violation

LEASE_LOSS_MARK = "lost its claim"  # in `last_error` when the engine's crash-loop guard failed the step
TERMINAL_EVENTS = (WorkflowCompleted, WorkflowFailed, WorkflowCancelled)
STATUS_EVENTS = (*TERMINAL_EVENTS, WorkflowPaused, WorkflowResumed)
NOT_FROM_THE_LOG = (LeaderChanged, MemberJoined, MemberLeft)  # the Manager's own, from Raft, not the workflow state


@attrs.frozen
class StepPlan:
    """One step of a planned workflow: its node, its parent (the step that enqueues it) and what it does."""

    step_id: str
    node: str
    parent: str | None
    fatal: bool
    awaits: tuple[str, ...]  # for a join: every step of the fan-out it closes


@attrs.frozen
class WorkflowPlan:
    """What the model expects of one workflow."""

    workflow_id: str
    start_at: float
    initial: tuple[dict[str, Any], ...]  # the configs of the initial nodes (each holds its subtree)
    steps: Mapping[str, StepPlan]  # in plan order
    fatal: str | None  # the step that raises NonRetryableError, if any

    @property
    def expected_status(self) -> str:
        return "FAILED" if self.fatal is not None else "COMPLETED"

    def blocked_by_fatal(self) -> tuple[str, ...]:
        """Steps that can never run because they come after the fatal step (descendants and joins)."""
        if self.fatal is None:
            return ()
        blocked: dict[str, None] = {self.fatal: None}
        changed = True
        while changed:
            changed = False
            for step in self.steps.values():
                if step.step_id in blocked:
                    continue
                if (step.parent is not None and step.parent in blocked) or any(a in blocked for a in step.awaits):
                    blocked[step.step_id] = None
                    changed = True
        return tuple(blocked)


@attrs.frozen
class FinalView:
    """A workflow as one member holds it at the end of a run."""

    status: str
    state: Any
    last_error: str | None


@attrs.frozen
class Incarnation:
    """One life of a member: the log indexes it applied in order (0 marks a snapshot install) and the
    events its subscription delivered, in delivery order."""

    name: str  # "n3#2"
    applied: tuple[int, ...]
    events: tuple[Any, ...]


def _runs(state: Any) -> dict[str, Any]:
    runs = state.get("runs") if isinstance(state, dict) else None
    return runs if isinstance(runs, dict) else {}


def _saw(state: Any) -> dict[str, Any]:
    saw = state.get("saw") if isinstance(state, dict) else None
    return saw if isinstance(saw, dict) else {}


def check_completion(
    plans: Sequence[WorkflowPlan], started: Mapping[str, bool], terminal: Mapping[str, str], now: float
) -> list[Violation]:
    found: list[Violation] = []
    for plan in plans:
        if not started.get(plan.workflow_id):
            found.append(Violation("completion", now, f"workflow {plan.workflow_id} was never started"))
        elif plan.workflow_id not in terminal:
            found.append(
                Violation("completion", now, f"workflow {plan.workflow_id} is not terminal after the heal phase")
            )
    return found


def check_model(plans: Sequence[WorkflowPlan], finals: Mapping[str, FinalView], now: float) -> list[Violation]:
    """Final status and state against the model (see the module docstring)."""
    found: list[Violation] = []

    def fail(plan: WorkflowPlan, detail: str) -> None:
        found.append(Violation("model", now, f"workflow {plan.workflow_id}: {detail}"))

    for plan in plans:
        final = finals.get(plan.workflow_id)
        if final is None or final.status not in ("COMPLETED", "FAILED"):
            continue  # the completion checker reports it
        runs = _runs(final.state)
        for step_id in sorted(runs):
            if step_id not in plan.steps:
                fail(plan, f"state records a run of {step_id!r}, which is no step of the workflow")
            elif not isinstance(runs[step_id], dict) or len(runs[step_id]) != 1:
                fail(plan, f"step {step_id}'s effect was applied more than once: {runs[step_id]!r}")
        crash_looped = final.status == "FAILED" and LEASE_LOSS_MARK in (final.last_error or "")
        if final.status == "COMPLETED":
            if plan.fatal is not None:
                fail(plan, f"COMPLETED, but step {plan.fatal} raises NonRetryableError")
                continue
            missing = [s for s in plan.steps if s not in runs]
            if missing:
                fail(plan, f"COMPLETED without the effect of {', '.join(missing)}")
        elif plan.fatal is None and not crash_looped:
            fail(plan, f"FAILED ({final.last_error!r}), but no step of it is fatal")
            continue
        else:  # FAILED, as the model says (or by the crash-loop guard)
            if plan.fatal is not None and not crash_looped and f"fatal {plan.fatal}" not in (final.last_error or ""):
                fail(plan, f"FAILED with {final.last_error!r}, expected the failure of {plan.fatal}")
            for step_id in plan.blocked_by_fatal():
                if step_id in runs:
                    fail(plan, f"step {step_id} ran, but it comes after the fatal step {plan.fatal}")
            for step_id, step in plan.steps.items():
                if step_id in runs and step.parent is not None and step.parent not in runs:
                    fail(plan, f"step {step_id} ran, but the step that enqueues it ({step.parent}) did not")
        saw = _saw(final.state)
        for step_id, step in plan.steps.items():
            if step.awaits and step_id in runs and saw.get(step_id) != list(step.awaits):
                fail(plan, f"join {step_id} ran having seen {saw.get(step_id)!r} of {list(step.awaits)!r}")
    return found


def canonical_events(
    incarnations: Sequence[Incarnation], now: float
) -> tuple[dict[int, tuple[Any, ...]], list[Violation]]:
    """The log's events by index, from every incarnation that applied the index; a violation for every
    index two incarnations saw different events for."""
    by_index: dict[int, tuple[Any, ...]] = {}
    owner: dict[int, str] = {}
    found: list[Violation] = []
    for incarnation in incarnations:
        grouped = _group(incarnation)
        for index in incarnation.applied:
            if index == 0:
                continue
            events = grouped.get(index, ())
            if index not in by_index:
                by_index[index] = events
                owner[index] = incarnation.name
            elif by_index[index] != events:
                found.append(
                    Violation(
                        "events",
                        now,
                        f"entry {index}: {incarnation.name} saw {_names(events)}, {owner[index]} saw "
                        f"{_names(by_index[index])}",
                    )
                )
    return dict(sorted(by_index.items())), found


def _group(incarnation: Incarnation) -> dict[int, tuple[Any, ...]]:
    grouped: dict[int, list[Any]] = {}
    for event in incarnation.events:
        if isinstance(event, (*NOT_FROM_THE_LOG, EventsDropped)):
            continue
        grouped.setdefault(event.index, []).append(event)
    return {index: tuple(events) for index, events in grouped.items()}


def _names(events: Sequence[Any]) -> str:
    return "[" + ", ".join(f"{type(e).__name__}({getattr(e, 'workflow_id', '')})" for e in events) + "]"


def check_events(incarnations: Sequence[Incarnation], now: float) -> list[Violation]:
    """Each incarnation saw exactly the events of the entries it applied, in log order, once each."""
    found: list[Violation] = []
    canonical, disagreements = canonical_events(incarnations, now)
    found.extend(disagreements)
    for incarnation in incarnations:
        log_events = [e for e in incarnation.events if not isinstance(e, NOT_FROM_THE_LOG)]
        dropped = [e for e in log_events if isinstance(e, EventsDropped)]
        if dropped:
            found.append(Violation("events", now, f"{incarnation.name}: events dropped: {dropped[0]}"))
            continue
        expected = [event for index in incarnation.applied if index for event in canonical.get(index, ())]
        if log_events != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(log_events, expected, strict=False)) if a != b),
                min(len(log_events), len(expected)),
            )
            seen = log_events[at] if at < len(log_events) else None
            wanted = expected[at] if at < len(expected) else None
            found.append(
                Violation(
                    "events",
                    now,
                    f"{incarnation.name}: event {at} of {len(log_events)} is {_describe(seen)}, the log has "
                    f"{_describe(wanted)} there ({len(expected)} events for the entries it applied)",
                )
            )
    return found


def _describe(event: Any) -> str:
    if event is None:
        return "nothing"
    return f"{type(event).__name__}(index={getattr(event, 'index', '?')}, {getattr(event, 'workflow_id', '')})"


def check_terminal_stable(
    incarnations: Sequence[Incarnation], finals: Mapping[str, FinalView], now: float
) -> list[Violation]:
    found: list[Violation] = []
    first_terminal: dict[str, str] = {}
    for incarnation in incarnations:
        terminal: dict[str, Any] = {}
        for event in incarnation.events:
            if not isinstance(event, STATUS_EVENTS):
                continue
            workflow_id = event.workflow_id
            if workflow_id in terminal:
                found.append(
                    Violation(
                        "terminal-stable",
                        now,
                        f"{incarnation.name}: workflow {workflow_id} got {type(event).__name__} at entry "
                        f"{event.index} after {type(terminal[workflow_id]).__name__} at entry "
                        f"{terminal[workflow_id].index}",
                    )
                )
            if isinstance(event, TERMINAL_EVENTS):
                terminal[workflow_id] = event
                status = _TERMINAL_STATUS[type(event)]
                if first_terminal.setdefault(workflow_id, status) != status:
                    found.append(
                        Violation(
                            "terminal-stable",
                            now,
                            f"workflow {workflow_id} announced {first_terminal[workflow_id]} and, on "
                            f"{incarnation.name}, {status}",
                        )
                    )
    for workflow_id, status in sorted(first_terminal.items()):
        final = finals.get(workflow_id)
        if final is not None and final.status != status:
            found.append(
                Violation("terminal-stable", now, f"workflow {workflow_id} announced {status}, ended {final.status}")
            )
    return found


_TERMINAL_STATUS: dict[type[Any], str] = {
    WorkflowCompleted: "COMPLETED",
    WorkflowFailed: "FAILED",
    WorkflowCancelled: "CANCELLED",
}


def check_effects_once(
    plans: Sequence[WorkflowPlan],
    canonical: Mapping[int, Sequence[Any]],
    executions: Mapping[str, str],
    now: float,
) -> list[Violation]:
    """In the log, each step completes at most once, and a join's claim comes after the completion of every
    step it waits for. `executions` maps an execution id to the model's step id (recorded by the nodes)."""
    found: list[Violation] = []
    completed_steps: dict[tuple[str, int], int] = {}
    completed_at: dict[tuple[str, str], int] = {}
    claimed_at: dict[int, int] = {}
    joins: list[tuple[str, str, int]] = []  # (workflow, step, claim id) of completed joins
    plan_of = {plan.workflow_id: plan for plan in plans}
    for index, events in canonical.items():
        for event in events:
            if isinstance(event, NodeStarted):
                claimed_at[event.claim_id] = index
            elif isinstance(event, NodeCompleted):
                key = (event.workflow_id, event.step_id)
                if key in completed_steps:
                    found.append(
                        Violation(
                            "effects-once",
                            now,
                            f"workflow {event.workflow_id}: step {event.step_id} ({event.node_name}) completed "
                            f"at entries {completed_steps[key]} and {index}",
                        )
                    )
                completed_steps[key] = index
                logical = executions.get(event.execution_id)
                if logical is None:
                    found.append(
                        Violation("effects-once", now, f"{event.execution_id} completed but no node ever ran it")
                    )
                    continue
                done = (event.workflow_id, logical)
                if done in completed_at:
                    found.append(
                        Violation(
                            "effects-once",
                            now,
                            f"workflow {event.workflow_id}: step {logical} completed at entries "
                            f"{completed_at[done]} and {index}",
                        )
                    )
                    continue
                completed_at[done] = index
                plan = plan_of.get(event.workflow_id)
                if plan is not None and logical in plan.steps and plan.steps[logical].awaits:
                    joins.append((event.workflow_id, logical, event.claim_id))
    for workflow_id, join_id, claim_id in joins:
        plan = plan_of[workflow_id]
        claimed = claimed_at.get(claim_id)
        for awaited in plan.steps[join_id].awaits:
            done_at = completed_at.get((workflow_id, awaited))
            if done_at is None or claimed is None or done_at >= claimed:
                found.append(
                    Violation(
                        "joins",
                        now,
                        f"workflow {workflow_id}: join {join_id} was claimed at entry {claimed} before "
                        f"{awaited} completed (entry {done_at})",
                    )
                )
    return found


def check_replicas_agree(views: Mapping[str, Mapping[str, FinalView | None]], now: float) -> list[Violation]:
    """`views`: member -> workflow -> its view there (None when the member does not hold it)."""
    found: list[Violation] = []
    members = sorted(views)
    if not members:
        return found
    reference = members[0]
    for member in members[1:]:
        for workflow_id in sorted(views[reference]):
            theirs = views[member].get(workflow_id)
            ours = views[reference][workflow_id]
            if theirs != ours:
                found.append(
                    Violation(
                        "replicas-agree",
                        now,
                        f"workflow {workflow_id}: {reference} holds {_brief(ours)}, {member} holds {_brief(theirs)}",
                    )
                )
    return found


def _brief(view: FinalView | None) -> str:
    if view is None:
        return "nothing"
    return f"{view.status} with {len(_runs(view.state))} runs ({view.last_error!r})"
