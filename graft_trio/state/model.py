"""The records the workflow state machine keeps: workflows, their steps, claims, join scopes, history.

These are plain data. The rules that move a step between statuses and keep the counts right live in
`machine.py`, in one place; this module only says what each record holds.

A **step** is one run of one node of one workflow: created when it is enqueued, removed when it completes.
Its status says where it is::

    READY   --Claim-->  CLAIMED --CompleteStep--> (removed; its effect is in the workflow state)
    DELAYED --due-->    READY        |--FailStep (attempts left)--> DELAYED or READY
                                     |--FailStep (none left)/too many lost leases--> DEAD (a dead letter)
                                     |--ParkStep--> PARKED --the workflow's state changes--> READY
                                     |--lease expires / ReleaseClaims--> READY
    DEAD    --RetryWorkflow--> READY

A **scope** is the unit of fan-in: the set of steps (and nested scopes) a join waits for. Every workflow
has a root scope; a step that fans out with a join opens a child scope holding its next nodes, and the
join is enqueued into the parent once the child holds nothing (docs/STATE.md has the rules).
"""

from __future__ import annotations

import collections
import enum
from typing import Any

import attrs

ROOT_SCOPE = 0
HISTORY_LIMIT = 1000  # executed-step records kept per workflow; `executed_count` counts them all
MAX_LEASE_LOSSES = 3  # a step whose lease is lost this many times is dead-lettered (a crash loop)


class WorkflowStatus(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED)


class StepStatus(enum.Enum):
    READY = "ready"
    DELAYED = "delayed"
    CLAIMED = "claimed"
    PARKED = "parked"
    DEAD = "dead"


@attrs.frozen(slots=True)
class NodeSpec:
    """A node to run: an initial node of a trigger, a next node or a join of a step's result."""

    name: str
    config: Any = None
    priority: int = 0  # higher is claimed first
    delay: float = 0.0  # seconds after enqueue before the step may be claimed
    idempotency_key: str | None = None  # a second enqueue with the same key in the same workflow is dropped


@attrs.define(slots=True, eq=False)
class Claim:
    """A step held by a member. `claim_id` is a fencing token: larger means later, never reused."""

    claim_id: int
    member_id: str
    attempt: int
    execution_id: str
    claimed_at: float
    lease_expires_at: float  # the claim is held while the replicated clock is before this


@attrs.define(slots=True, eq=False)
class Step:
    step_id: int  # the global arrival sequence: ties in priority are claimed in this order
    workflow_id: str
    spec: NodeSpec
    scope_id: int
    status: StepStatus
    enqueued_at: float
    due: float | None = None  # DELAYED: when it becomes READY
    attempts: int = 0  # claims that may have run user code (parking does not count)
    failures: int = 0  # FailSteps since the step was enqueued (or retried)
    lease_losses: int = 0
    claim: Claim | None = None
    last_error: str | None = None
    # Not replicated state: which entry of the ready heap or the timer heap is this step's live one.
    queue_token: int = attrs.field(default=0, metadata={"transient": True})
    queued: bool = attrs.field(default=False, metadata={"transient": True})


@attrs.define(slots=True, eq=False)
class Scope:
    """What a join waits for. `outstanding` = live steps in the scope + open child scopes."""

    scope_id: int
    parent_id: int | None  # None for the root scope
    join: NodeSpec | None  # enqueued into the parent when this scope drains (None for the root)
    outstanding: int = 0
    # Joins asked for by steps of this scope that fanned out no work of their own: each runs once, in this
    # scope, when it drains. Keyed by node name (the first request's spec wins), in the order of request.
    barriers: dict[str, NodeSpec] = attrs.Factory(dict)


@attrs.frozen(slots=True)
class ExecutedStep:
    """One finished attempt, kept in the workflow's history."""

    step_id: int
    node_name: str
    attempt: int
    claim_id: int
    member_id: str
    execution_id: str
    started_at: float
    finished_at: float
    outcome: str  # "completed", "failed", "lease_expired"
    error: str | None = None

    @property
    def duration(self) -> float:
        return self.finished_at - self.started_at


@attrs.define(slots=True, eq=False)
class Workflow:
    workflow_id: str
    status: WorkflowStatus
    state: Any
    metadata: dict[str, Any]
    started_at: float
    retention: float  # seconds a terminal workflow is kept before it is removed
    completed_at: float | None = None  # when it became terminal (None while RUNNING or PAUSED)
    last_error: str | None = None
    state_version: int = 0  # bumped whenever a patch changes `state`
    next_scope_id: int = ROOT_SCOPE + 1
    executed_count: int = 0
    steps: dict[int, Step] = attrs.Factory(dict)  # live steps, by step id
    scopes: dict[int, Scope] = attrs.Factory(dict)
    idempotency_keys: dict[str, None] = attrs.Factory(dict)  # keys seen, in order (a dict: no set order leaks)
    history: collections.deque[ExecutedStep] = attrs.Factory(lambda: collections.deque(maxlen=HISTORY_LIMIT))
    # Counts of `steps` by status, kept by the machine (derived: rebuilt on restore).
    active: int = 0  # READY + DELAYED + CLAIMED: work that can still change the state
    parked: int = 0
    dead: int = 0
    # The encoded snapshot record of a COMPLETED or CANCELLED workflow, which nothing changes any more
    # (derived, made at the first snapshot that includes it). Retained workflows are most of a snapshot.
    sealed_record: bytes | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def retain_until(self) -> float | None:
        if self.completed_at is None or not self.status.is_terminal:
            return None
        return self.completed_at + self.retention
