"""Known Raft and workflow-engine bugs, planted by patching the real code for the length of a run.

A mutant is a context manager that replaces one method of the core, the driver or the workflow state
machine with a broken version and restores it on exit. Production code carries no switch for any of them.
The Raft mutants are for the key-value workload, the workflow ones (`claim-unfenced`, `join-count`,
`dead-letter-completes`) for the workflow workload (`--workload workflows`). `python -m sims run [--workload W]
--mutant NAME` must report failures for each; without a mutant the same seeds pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

import graft_trio.raft.node as raft_node
from graft_trio.raft.codec import decode_commands
from graft_trio.raft.core import RaftCore, Ready
from graft_trio.raft.messages import Entry, EntryKind
from graft_trio.raft.node import RaftNode
from graft_trio.state import commands as c
from graft_trio.state import machine
from graft_trio.state.events import WorkflowCompleted
from graft_trio.state.machine import WorkflowStateMachine
from graft_trio.state.merge_patch import apply_merge_patch
from graft_trio.state.model import Claim, StepStatus, WorkflowStatus


@contextmanager
def _patched(owner: object, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def commit_old_term() -> Iterator[None]:
    """Figure 8 of the Raft paper: the leader commits an earlier term's entry by counting its replicas."""

    def can_commit(self: RaftCore, index: int) -> bool:
        return True

    with _patched(RaftCore, "_can_commit", can_commit):
        yield


@contextmanager
def forget_vote() -> Iterator[None]:
    """The vote is not persisted: after a crash a member may vote again in the same term."""
    original = RaftNode._persist

    async def persist(self: RaftNode, ready: Ready) -> None:
        if ready.hard_state is not None and ready.hard_state.vote is not None:
            ready = attrs.evolve(ready, hard_state=attrs.evolve(ready.hard_state, vote=None))
        await original(self, ready)

    with _patched(RaftNode, "_persist", persist):
        yield


@contextmanager
def stale_read() -> Iterator[None]:
    """The leader serves a read at its commit index without confirming it is still the leader."""

    def leader_read(self: RaftCore, requester: str, context: int) -> None:
        self._release_read(requester, context, self.log.committed)

    with _patched(RaftCore, "_leader_read", leader_read):
        yield


@contextmanager
def ack_before_sync() -> Iterator[None]:
    """A member sends its messages (acknowledgements included) before its entries are durable."""

    async def process_ready(self: RaftNode, core: RaftCore, ready: Ready) -> None:
        self._send_messages(ready)
        await self._persist(ready)
        self._apply(ready)
        core.advance(ready)
        await self._maybe_snapshot(core)

    with _patched(RaftNode, "_process_ready", process_ready):
        yield


@contextmanager
def batch_reversed() -> Iterator[None]:
    """A member applies the commands of a batch (`propose_many`, a BATCH entry) last to first.

    `RaftNode._apply_entry` splits a batch with the driver module's `decode_commands`; for the length of
    each BATCH entry's application, that name returns the commands reversed (and the batch's results come
    back in that order too)."""
    original = RaftNode._apply_entry

    def reversed_commands(blob: bytes) -> list[bytes]:
        return decode_commands(blob)[::-1]

    def apply_entry(self: RaftNode, entry: Entry) -> None:
        if entry.kind is not EntryKind.BATCH:
            original(self, entry)
            return
        with _patched(raft_node, "decode_commands", reversed_commands):
            original(self, entry)

    with _patched(RaftNode, "_apply_entry", apply_entry):
        yield


@contextmanager
def _handler_patched(command: type, replacement: Callable[..., Any]) -> Iterator[None]:
    """Replace the state machine's handler of `command` (handlers are looked up in `machine._HANDLERS`)."""
    original = machine._HANDLERS[command]
    machine._HANDLERS[command] = replacement
    try:
        yield
    finally:
        machine._HANDLERS[command] = original


@contextmanager
def claim_unfenced() -> Iterator[None]:
    """CompleteStep is accepted although its claim is no longer held (its lease expired, or the step was
    released): the step is completed by whichever attempt commits first, and a stale attempt whose step
    another attempt already completed still merges its patch."""
    original = machine._HANDLERS[c.CompleteStep]

    def complete(self: WorkflowStateMachine, cmd: c.CompleteStep) -> c.Result:
        if cmd.claim_id in self._claims:
            return original(self, cmd)
        for wf in self.workflows.values():
            record = next((r for r in wf.history if r.claim_id == cmd.claim_id), None)
            if record is None:
                continue
            if wf.status not in machine.LIVE_WORKFLOW:
                break
            step = wf.steps.get(record.step_id)
            if step is None:  # another attempt completed it: merge the stale patch all the same
                if cmd.patch is not None:
                    wf.state, changed = apply_merge_patch(wf.state, cmd.patch)
                    wf.state_version += int(changed)
                return c.StepCompleted(wf.workflow_id, (), (), wf.status)
            if step.status is StepStatus.CLAIMED:
                assert step.claim is not None
                return original(self, attrs.evolve(cmd, claim_id=step.claim.claim_id))
            if step.status in (StepStatus.READY, StepStatus.DELAYED):
                self._leave(wf, step)
                step.claim = Claim(
                    cmd.claim_id, record.member_id, record.attempt, record.execution_id, record.started_at, self.now + 1
                )
                self._enter(wf, step, StepStatus.CLAIMED)
                return original(self, cmd)
            break
        return original(self, cmd)

    with _handler_patched(c.CompleteStep, complete):
        yield


@contextmanager
def join_count() -> Iterator[None]:
    """A join's count is off by one: the join is enqueued when one unit of the work it waits for is still
    outstanding (and not again when the scope really drains), so it runs before its last branch is done."""
    settle = WorkflowStateMachine._settle

    def settle_one_early(self: WorkflowStateMachine, wf: Any, scope_id: int) -> None:
        early: dict[tuple[str, int], None] = vars(self).setdefault("_early_joins", {})  # joins that already went
        scope = wf.scopes.get(scope_id)
        key = (wf.workflow_id, scope_id)
        if scope is None or scope.join is None or scope.parent_id is None or scope.barriers:
            settle(self, wf, scope_id)
        elif key not in early and scope.outstanding == 1:
            early[key] = None
            self._enqueue(wf, scope.join, scope.parent_id)
        elif key in early and scope.outstanding == 0:
            del wf.scopes[scope_id]
            wf.scopes[scope.parent_id].outstanding -= 1
            settle_one_early(self, wf, scope.parent_id)
        else:
            settle(self, wf, scope_id)

    with _patched(WorkflowStateMachine, "_settle", settle_one_early):
        yield


@contextmanager
def dead_letter_completes() -> Iterator[None]:
    """Upstream's bug (UPSTREAM.md §6.2, items 3 and 8): a dead letter does not hold its workflow back, and
    completion overwrites FAILED, so a workflow whose step failed for good ends COMPLETED."""
    original = machine._HANDLERS[c.FailStep]

    def fail(self: WorkflowStateMachine, cmd: c.FailStep) -> c.Result:
        step = self._claims.get(cmd.claim_id)
        result = original(self, cmd)
        if step is not None and isinstance(result, c.StepFailed) and result.dead_lettered:
            wf = self.workflows[step.workflow_id]
            self._leave(wf, step)
            del wf.steps[step.step_id]
            del self._steps[step.step_id]
            wf.scopes[step.scope_id].outstanding -= 1
            self._settle(wf, step.scope_id)
        return result

    def complete_workflow(self: WorkflowStateMachine, wf: Any) -> None:
        self._set_status(wf, WorkflowStatus.COMPLETED)
        self._events.append(WorkflowCompleted(self._index, wf.workflow_id, wf.started_at, self.now, wf.state))

    with (
        _handler_patched(c.FailStep, fail),
        _patched(WorkflowStateMachine, "_complete_workflow", complete_workflow),
    ):
        yield


MUTANTS: dict[str, Callable[[], Any]] = {
    "commit-old-term": commit_old_term,
    "forget-vote": forget_vote,
    "stale-read": stale_read,
    "ack-before-sync": ack_before_sync,
    "batch-reversed": batch_reversed,
}

# Bugs of the workflow state machine, for the workflow workload (`--workload workflows`).
WORKFLOW_MUTANTS: dict[str, Callable[[], Any]] = {
    "claim-unfenced": claim_unfenced,
    "join-count": join_count,
    "dead-letter-completes": dead_letter_completes,
}


@contextmanager
def planted(name: str | None) -> Iterator[None]:
    """Plant the mutant called `name` (nothing for None) for the length of the block."""
    if name is None:
        yield
        return
    known = {**MUTANTS, **WORKFLOW_MUTANTS}
    if name not in known:
        raise KeyError(f"no mutant named {name!r}; known: {', '.join(sorted(known))}")
    with known[name]():
        yield
