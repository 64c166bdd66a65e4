"""The events of SPEC section 2, as small immutable attrs classes.

The workflow and node events are emitted by `WorkflowStateMachine.apply`, so every member emits the same
events, in the same order, for the same log entry; each carries the `index` of that entry, which orders
them and lets a subscriber that restarts tell what it has already seen. `MemberJoined`, `MemberLeft` and
`LeaderChanged` are facts about the Raft membership and leadership, not about the workflow log: the
Manager emits them from the Raft member's status, with the index at which it saw the change.

`StepsReady` is not part of the user-facing list: it tells the engine of every member that steps of these
node classes became claimable, so members claim when there is work instead of polling.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen(slots=True)
class WorkflowStarted:
    index: int
    workflow_id: str
    started_at: float
    node_names: tuple[str, ...]
    metadata: dict[str, Any]


@attrs.frozen(slots=True)
class WorkflowCompleted:
    index: int
    workflow_id: str
    started_at: float
    completed_at: float
    final_state: Any


@attrs.frozen(slots=True)
class WorkflowFailed:
    index: int
    workflow_id: str
    failed_at: float
    error: str
    node_name: str | None  # the step whose failure failed the workflow
    step_id: int | None


@attrs.frozen(slots=True)
class WorkflowPaused:
    index: int
    workflow_id: str
    paused_at: float


@attrs.frozen(slots=True)
class WorkflowResumed:
    index: int
    workflow_id: str
    resumed_at: float
    retried: bool  # True when `RetryWorkflow` brought a FAILED workflow back


@attrs.frozen(slots=True)
class RevokedClaim:
    """A claim taken away from a member that may still be running its attempt: the member must cancel it."""

    claim_id: int
    member_id: str
    step_id: int
    node_name: str


@attrs.frozen(slots=True)
class WorkflowCancelled:
    index: int
    workflow_id: str
    cancelled_at: float
    reason: str | None
    revoked_claims: tuple[RevokedClaim, ...]


@attrs.frozen(slots=True)
class NodeStarted:
    index: int
    workflow_id: str
    step_id: int
    node_name: str
    claim_id: int
    member_id: str
    attempt: int
    execution_id: str
    started_at: float


@attrs.frozen(slots=True)
class NodeCompleted:
    index: int
    workflow_id: str
    step_id: int
    node_name: str
    claim_id: int
    member_id: str
    attempt: int
    execution_id: str
    started_at: float
    completed_at: float
    next_nodes: tuple[str, ...]  # the node names this step enqueued (duplicates by idempotency key dropped)


@attrs.frozen(slots=True)
class NodeFailed:
    index: int
    workflow_id: str
    step_id: int
    node_name: str
    claim_id: int
    member_id: str
    attempt: int
    execution_id: str
    error: str
    failed_at: float
    retry_at: float | None  # when the retry becomes claimable; None when the step was dead-lettered
    dead_lettered: bool
    lease_expired: bool  # the attempt was lost with its lease (the member crashed, stalled or left)


@attrs.frozen(slots=True)
class MemberJoined:
    index: int
    member_id: str
    address: str
    voter: bool


@attrs.frozen(slots=True)
class MemberLeft:
    index: int
    member_id: str


@attrs.frozen(slots=True)
class LeaderChanged:
    index: int
    term: int
    leader_id: str | None
    previous_leader_id: str | None


@attrs.frozen(slots=True)
class StepsReady:
    index: int
    node_names: tuple[str, ...]


@attrs.frozen(slots=True)
class CommandBroadcast:
    """A `Broadcast` command applied: every member calls its handler for `name` once."""

    index: int
    name: str
    params: Any
    origin: str
    broadcast_at: float


Event = (
    WorkflowStarted
    | WorkflowCompleted
    | WorkflowFailed
    | WorkflowPaused
    | WorkflowResumed
    | WorkflowCancelled
    | NodeStarted
    | NodeCompleted
    | NodeFailed
    | MemberJoined
    | MemberLeft
    | LeaderChanged
    | StepsReady
    | CommandBroadcast
)
