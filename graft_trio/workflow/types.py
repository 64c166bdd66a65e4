"""The workflow types users write against (SPEC §2): nodes, their results, triggers, policies and errors.

Everything here is plain data or an abstract base: nothing runs, nothing touches the replicated state. How
payloads become the user's classes and back is `graft_trio.workflow.payloads`; the engine fills `WorkflowState`.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeGuard, TypeVar

import attrs

StateT = TypeVar("StateT")
ConfigT = TypeVar("ConfigT")


# --- errors ------------------------------------------------------------------------------------------


class NonRetryableError(Exception):
    """Raised by a node to fail its step at once: no further attempt is made, whatever its `RetryPolicy`."""


class PayloadError(NonRetryableError):
    """A payload did not fit its type (or was not JSON): the same bytes would fail again, so no retry.

    `what` says which payload (``"state"``, ``"config"``, ``"result"``, ...), `expected` the type it had to
    fit, and `problems` each problem as ``"<what went wrong> @ <path>"`` with a JSON path such as
    ``$.items[2].name``; `node` names the node whose payload it was, when known.
    """

    def __init__(self, what: str, expected: str, problems: Iterable[str], node: str | None = None) -> None:
        self.what = what
        self.expected = expected
        self.problems = tuple(problems)
        self.node = node
        prefix = f"node {node!r}: " if node is not None else ""
        super().__init__(f"{prefix}{what} does not fit {expected}: {'; '.join(self.problems)}")

    @property
    def paths(self) -> tuple[str, ...]:
        """The JSON path of each problem, in order."""
        return tuple(problem.rpartition(" @ ")[2] for problem in self.problems)


class NodeRegistrationError(Exception):
    """`register_node` refused a node; the message says what is wrong with it and how to fix it."""


class WorkflowExistsError(Exception):
    """`start_workflow` was given the id of a workflow that already exists."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id!r} already exists")
        self.workflow_id = workflow_id


class WorkflowNotFoundError(LookupError):
    """No workflow has this id (it never existed, or retention removed it)."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id!r} not found")
        self.workflow_id = workflow_id


# --- validators shared by the types below -------------------------------------------------------------


def _is_real(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _non_empty_str(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{attribute.name} must be a non-empty string, got {value!r}")


def _str_mapping(value: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"metadata must be a mapping of str to str, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {item!r}")
    return dict(value)


# --- policies -----------------------------------------------------------------------------------------


@attrs.frozen
class RetryPolicy:
    """How a node's failed attempts are retried: at most `max_attempts` attempts in all, with exponential backoff.

    After attempt ``n`` fails, the next one waits ``initial_interval * backoff ** (n - 1)`` seconds, capped at
    `max_interval`, spread by ``± jitter`` (a fraction of the delay) so that retries do not move in lockstep.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 300.0
    jitter: float = 0.1

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or isinstance(self.max_attempts, bool) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if not _is_real(self.initial_interval) or self.initial_interval < 0:
            raise ValueError(f"initial_interval must be a finite number >= 0, got {self.initial_interval!r}")
        if not _is_real(self.backoff) or self.backoff < 1:
            raise ValueError(f"backoff must be a finite number >= 1, got {self.backoff!r}")
        if not _is_real(self.max_interval) or self.max_interval < self.initial_interval:
            raise ValueError(
                f"max_interval must be a finite number >= initial_interval ({self.initial_interval}), "
                f"got {self.max_interval!r}"
            )
        if not _is_real(self.jitter) or not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be a number in [0, 1], got {self.jitter!r}")

    def should_retry(self, attempt: int) -> bool:
        """Whether another attempt follows the failure of attempt number `attempt` (1-based)."""
        return attempt < self.max_attempts

    def delay_for(self, attempt: int, jitter_draw: float) -> float:
        """Seconds to wait after attempt number `attempt` (1, 2, ...) failed, before the next one.

        `jitter_draw` is a number in [0, 1) from the caller's random source (so the caller decides what is
        random): 0 gives the shortest delay, ``1 - jitter`` of the base, and the draw moves it linearly up to
        ``1 + jitter`` of the base. The result is never more than `max_interval`, never negative.
        """
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise ValueError(f"attempt must be an int >= 1, got {attempt!r}")
        if not _is_real(jitter_draw) or not 0 <= jitter_draw < 1:
            raise ValueError(f"jitter_draw must be a number in [0, 1), got {jitter_draw!r}")
        try:
            base = self.initial_interval * self.backoff ** (attempt - 1)
        except OverflowError:  # a huge attempt number: the cap applies long before
            base = math.inf
        base = min(base, self.max_interval)
        return min(self.max_interval, base * (1 + self.jitter * (2 * jitter_draw - 1)))


# --- what starts a workflow and what a step returns ---------------------------------------------------


@attrs.frozen
class NodeConfig:
    """A node a trigger starts: its `name` and its `config` (a mapping, an attrs/dataclass instance or None)."""

    name: str = attrs.field(validator=_non_empty_str)
    config: object = None


def _validate_priority(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"priority must be an int, got {value!r}")


def _validate_delay(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if not _is_real(value) or value < 0:
        raise ValueError(f"delay must be a finite number of seconds >= 0, got {value!r}")


def _validate_idempotency_key(_instance: object, _attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"idempotency_key must be None or a non-empty string, got {value!r}")


@attrs.frozen
class NextNode:
    """A step a result asks for.

    `priority`: higher is claimed first. `delay`: seconds before it may run (a durable timer).
    `idempotency_key`: a second enqueue with the same key in the same workflow is dropped.
    """

    name: str = attrs.field(validator=_non_empty_str)
    config: object = None
    priority: int = attrs.field(default=0, validator=_validate_priority)
    delay: float = attrs.field(default=0.0, validator=_validate_delay)
    idempotency_key: str | None = attrs.field(default=None, validator=_validate_idempotency_key)


def _next_nodes_tuple(value: Iterable[NextNode]) -> tuple[NextNode, ...]:
    if isinstance(value, NextNode):
        raise TypeError("next_nodes takes a list of NextNode; for one node write next_nodes=[NextNode(...)]")
    if isinstance(value, str | bytes | Mapping):
        raise TypeError(f"next_nodes must be a list of NextNode, got {type(value).__name__}")
    nodes = tuple(value)
    for index, node in enumerate(nodes):
        if not isinstance(node, NextNode):
            raise TypeError(f"next_nodes[{index}] must be a NextNode, got {type(node).__name__}")
    return nodes


def _validate_data(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not (value is None or isinstance(value, Mapping) or is_structured_instance(value)):
        raise TypeError(
            f"{attribute.name} must be None, a mapping or an attrs/dataclass instance, got {type(value).__name__}"
        )


@attrs.frozen
class NodeResult:
    """What `Node.execute` returns.

    `data` (a mapping, an attrs/dataclass instance or None) is merged into the workflow state as a JSON Merge
    Patch (RFC 7386): mappings merge recursively, a ``None`` value in a mapping deletes that key, anything else
    replaces. An attrs/dataclass instance never deletes: its ``None`` fields are left out of the patch (to
    delete a key, return a mapping with ``None`` for it). `next_nodes` run after this step, in parallel;
    `join` runs once, after every branch and everything they spawned has finished.
    """

    data: object = attrs.field(default=None, validator=_validate_data)
    next_nodes: tuple[NextNode, ...] = attrs.field(default=(), converter=_next_nodes_tuple)
    join: NextNode | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(NextNode))
    )


def is_structured_instance(value: object) -> bool:
    """Whether `value` is an instance (not a class) of an attrs class or a dataclass."""
    cls = type(value)
    return attrs.has(cls) or hasattr(cls, "__dataclass_fields__")


def _validate_initial_nodes(_instance: object, _attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    if not value:
        raise ValueError("initial_nodes must name at least one node")
    for index, node in enumerate(value):
        if not isinstance(node, NodeConfig):
            raise TypeError(f"initial_nodes[{index}] must be a NodeConfig, got {type(node).__name__}")


def _node_configs_tuple(value: Iterable[NodeConfig]) -> tuple[NodeConfig, ...]:
    if isinstance(value, NodeConfig):
        raise TypeError("initial_nodes takes a list of NodeConfig; for one node write initial_nodes=[NodeConfig(...)]")
    return tuple(value)


@attrs.frozen
class WorkflowTrigger:
    """What `start_workflow` starts: a new workflow `workflow_id` with `initial_state` (a mapping, an
    attrs/dataclass instance or None for ``{}``), the nodes it begins with, and string `metadata` that every
    step sees in its `NodeContext`."""

    workflow_id: str = attrs.field(validator=_non_empty_str)
    initial_state: object = attrs.field(validator=_validate_data)
    initial_nodes: tuple[NodeConfig, ...] = attrs.field(
        converter=_node_configs_tuple, validator=_validate_initial_nodes
    )
    metadata: Mapping[str, str] = attrs.field(factory=dict, converter=_str_mapping)


# --- what a node sees --------------------------------------------------------------------------------


@attrs.frozen
class NodeContext:
    """One attempt of one step, as its node sees it.

    `member_id` is the member running the attempt, `attempt` counts from 1, `execution_id` names the step
    (the same for all its attempts), `metadata` is the trigger's, `started_at` is when this attempt began on
    the member's clock (seconds).
    """

    workflow_id: str
    node_name: str
    member_id: str
    attempt: int
    execution_id: str
    metadata: Mapping[str, str]
    started_at: float


class Node(abc.ABC, Generic[StateT, ConfigT]):
    """A workflow node: subclass it with the state and config types as parameters, e.g.
    ``class Greeter(Node[GreeterState, GreeterConfig])``.

    Class attributes: `name` (unique in the cluster; required), `retry`, `timeout` (seconds per attempt, the
    attempt is cancelled past it; None for no limit) and `concurrency` (at most this many attempts of this
    node at once on a member; None for no limit). A node may also override `can_start`.
    """

    name: str
    retry: RetryPolicy = RetryPolicy()
    timeout: float | None = None
    concurrency: int | None = None

    @abc.abstractmethod
    async def execute(self, ctx: NodeContext, state: StateT, config: ConfigT) -> NodeResult:
        """Run one attempt of a step. Raise to fail it (retried per `retry`; `NonRetryableError` is not)."""

    async def can_start(self, ctx: NodeContext, state: StateT, config: ConfigT) -> bool:
        """Whether the step may run now. A step whose predicate is false is parked until its workflow's state
        changes. The default (not overriding it) always starts; the engine then skips the call."""
        return True


# --- what a reader sees ------------------------------------------------------------------------------


class WorkflowStatus(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        """COMPLETED, FAILED and CANCELLED are terminal: a terminal status is never overwritten."""
        return self in (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED)


class StepStatus(enum.Enum):
    QUEUED = "queued"  # may be claimed now
    WAITING = "waiting"  # behind a durable timer (NextNode.delay or a retry's backoff) until `run_after`
    PARKED = "parked"  # its can_start said no; evaluated again when the workflow's state changes
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"  # attempts ran out or it raised NonRetryableError: kept as a dead letter
    CANCELLED = "cancelled"


@attrs.frozen
class StepInfo:
    """One step of a workflow as `get_workflow` reports it. Times are seconds on the cluster's clock."""

    execution_id: str
    node_name: str
    status: StepStatus
    config: Any = None
    attempt: int = 0
    priority: int = 0
    member_id: str | None = None
    enqueued_at: float | None = None
    run_after: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from `started_at` to `finished_at`, once both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@attrs.frozen
class WorkflowState:
    """A snapshot of one workflow: what `get_workflow`, `wait_for_workflow` and `watch_workflow` return.

    `current_state` is the merged JSON document. Steps are listed by where they are: `executed_steps`
    (completed, in commit order), `executing_steps` (claimed now), `pending_steps` (queued, waiting or
    parked) and `dead_letters` (failed; `retry_workflow` queues them again).
    """

    workflow_id: str
    status: WorkflowStatus
    current_state: dict[str, Any]
    started_at: float
    completed_at: float | None = None
    executed_steps: tuple[StepInfo, ...] = ()
    executing_steps: tuple[StepInfo, ...] = ()
    pending_steps: tuple[StepInfo, ...] = ()
    dead_letters: tuple[StepInfo, ...] = ()
    last_error: str | None = None
    metadata: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def id(self) -> str:
        """The workflow's id (`workflow_id`)."""
        return self.workflow_id
