"""The workflow log's commands, the replies to them, the queries and their answers, and their encoding.

Every command carries `now`, the proposer's clock (the engine proposes through the leader): the state
machine never reads a clock, it only ever moves its replicated time forward to a command's `now`.

**Encoding.** One compact codec serves commands, replies, queries and answers, on every path (a forwarded
proposal returns the very bytes the leader's apply returned). A value is a JSON array::

    [format_version, tag, field_1, field_2, ...]

with the fields in the order the attrs class declares them; nested records are arrays of their fields,
enums their value, user payloads (state, config, patch, metadata) plain JSON. Tags are fixed numbers,
not class names, so renaming a class changes nothing on the wire. A newer version may append fields with
defaults: an older array with fewer fields still decodes. NaN and infinities are refused in both
directions, so a payload that `json` would write as non-standard JSON never reaches the log. Bad bytes
raise `CodecError` (and the state machine answers them with `Invalid`, changing nothing).
"""

from __future__ import annotations

import enum
import json
import math
import operator
import re
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

import attrs

from graft_trio.state.model import ExecutedStep, NodeSpec, StepStatus, WorkflowStatus

FORMAT_VERSION = 1
DEFAULT_RETENTION = 7 * 24 * 3600.0
MAX_CLAIMS_PER_COMMAND = 1024


class CodecError(ValueError):
    """The bytes are not a value of a format this version can read."""


# --- commands ------------------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class StartWorkflow:
    """Create a workflow; refused with `WorkflowExists` if the id is taken (by a retained one too)."""

    now: float
    workflow_id: str
    initial_state: Any
    initial_nodes: tuple[NodeSpec, ...]
    metadata: dict[str, Any] = attrs.field(factory=dict)
    retention: float = DEFAULT_RETENTION  # seconds it is kept once terminal


@attrs.frozen(slots=True)
class Claim:
    """Move up to `max_count` ready steps of `node_names` to claimed by `member_id`, in one step.

    Steps are taken best first: higher priority, then earlier arrival, across all the names given.
    `node_limits` caps how many of one node class this claim may take (the member's free capacity).
    """

    now: float
    member_id: str
    node_names: tuple[str, ...]
    max_count: int
    lease_seconds: float
    node_limits: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen(slots=True)
class RenewClaims:
    now: float
    member_id: str
    claim_ids: tuple[int, ...]
    lease_seconds: float


@attrs.frozen(slots=True)
class ReleaseClaims:
    """Hand claims back (all of the member's when `claim_ids` is empty), e.g. when it drains or restarts.

    `crashed=False` (a drain): the attempt did not happen and costs nothing. `crashed=True` (a member back
    from a crash releasing what its previous life held): counted like a lost lease, only sooner.
    """

    now: float
    member_id: str
    claim_ids: tuple[int, ...] = ()
    crashed: bool = False


@attrs.frozen(slots=True)
class CompleteStep:
    """A step's whole outcome as one command: refused with `ClaimLost` unless the claim is still held.

    `patch` (RFC 7386; None means no change), the enqueue of `next_nodes`, the `join` and the release
    of the claim are applied together or not at all.
    """

    now: float
    claim_id: int
    patch: Any = None
    next_nodes: tuple[NodeSpec, ...] = ()
    join: NodeSpec | None = None


@attrs.frozen(slots=True)
class FailStep:
    """An attempt raised. Retried after a backoff while `retryable` and attempts remain, else dead-lettered.

    The delay is ``min(initial_interval * backoff ** (failures - 1), max_interval) * (1 + jitter)``; the
    proposer draws `jitter` (in [-1, 1]) so that every member computes the same due time.
    """

    now: float
    claim_id: int
    error: str
    retryable: bool = True
    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 300.0
    jitter: float = 0.0


@attrs.frozen(slots=True)
class ParkStep:
    """`can_start` was false on the state at `state_version`: park until the workflow's state changes.

    If the state already changed since that version, the step goes straight back to ready instead, so
    a change that raced with the evaluation is never missed.
    """

    now: float
    claim_id: int
    state_version: int


@attrs.frozen(slots=True)
class PauseWorkflow:
    now: float
    workflow_id: str


@attrs.frozen(slots=True)
class ResumeWorkflow:
    now: float
    workflow_id: str


@attrs.frozen(slots=True)
class CancelWorkflow:
    now: float
    workflow_id: str
    reason: str | None = None


@attrs.frozen(slots=True)
class RetryWorkflow:
    """FAILED -> RUNNING: dead letters are queued again with fresh attempts."""

    now: float
    workflow_id: str


@attrs.frozen(slots=True)
class Tick:
    """Only moves the replicated clock: due timers fire, expired leases and retained workflows go."""

    now: float


@attrs.frozen(slots=True)
class Broadcast:
    """A command for every member (`Manager.broadcast`): changes no workflow, only emits `CommandBroadcast`,
    which each member turns into one call of its handler for `name`."""

    now: float
    name: str
    params: Any
    origin: str  # the member that broadcast it


Command = (
    StartWorkflow
    | Claim
    | RenewClaims
    | ReleaseClaims
    | CompleteStep
    | FailStep
    | ParkStep
    | PauseWorkflow
    | ResumeWorkflow
    | CancelWorkflow
    | RetryWorkflow
    | Tick
    | Broadcast
)

# --- replies to commands ---------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Invalid:
    """The command is malformed or out of range; nothing changed."""

    reason: str


@attrs.frozen(slots=True)
class WorkflowExists:
    workflow_id: str


@attrs.frozen(slots=True)
class NotFound:
    workflow_id: str


@attrs.frozen(slots=True)
class ClaimLost:
    """The claim is not held (lease expired, released, revoked by a cancel, or already used); nothing changed."""

    claim_id: int


@attrs.frozen(slots=True)
class InvalidTransition:
    workflow_id: str
    status: WorkflowStatus  # the workflow's status, which the command could not leave
    command: str


@attrs.frozen(slots=True)
class Started:
    workflow_id: str
    step_ids: tuple[int, ...]
    status: WorkflowStatus


@attrs.frozen(slots=True)
class ClaimGrant:
    """What a member needs to run the attempt, read at the very log index that granted the claim."""

    claim_id: int
    step_id: int
    workflow_id: str
    node_name: str
    config: Any
    attempt: int
    execution_id: str
    lease_expires_at: float
    state: Any
    state_version: int
    metadata: dict[str, Any]
    workflow_started_at: float


@attrs.frozen(slots=True)
class Claimed:
    grants: tuple[ClaimGrant, ...]


@attrs.frozen(slots=True)
class Renewed:
    lease_expires_at: float
    renewed: tuple[int, ...]
    lost: tuple[int, ...]  # not held any more: the member must stop those attempts


@attrs.frozen(slots=True)
class Released:
    claim_ids: tuple[int, ...]


@attrs.frozen(slots=True)
class StepCompleted:
    workflow_id: str
    enqueued: tuple[int, ...]  # step ids of the next nodes (and of joins that became due)
    dropped: tuple[str, ...]  # idempotency keys already seen in the workflow
    status: WorkflowStatus


@attrs.frozen(slots=True)
class StepFailed:
    workflow_id: str
    retry_at: float | None
    dead_lettered: bool
    status: WorkflowStatus


@attrs.frozen(slots=True)
class StepParked:
    workflow_id: str
    parked: bool  # False: the state had changed since `state_version`, the step is ready again
    status: WorkflowStatus


@attrs.frozen(slots=True)
class StatusChanged:
    workflow_id: str
    status: WorkflowStatus


@attrs.frozen(slots=True)
class Ticked:
    now: float


@attrs.frozen(slots=True)
class Broadcasted:
    index: int  # the log index of the broadcast, which its `CommandBroadcast` events carry


Refusal = Invalid | WorkflowExists | NotFound | ClaimLost | InvalidTransition
Result = (
    Refusal
    | Started
    | Claimed
    | Renewed
    | Released
    | StepCompleted
    | StepFailed
    | StepParked
    | StatusChanged
    | Ticked
    | Broadcasted
)
REFUSALS = (Invalid, WorkflowExists, NotFound, ClaimLost, InvalidTransition)

# --- queries and their answers ------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class GetWorkflow:
    workflow_id: str


@attrs.frozen(slots=True)
class ListWorkflows:
    """Workflows in the order they were started, optionally of one status."""

    status: WorkflowStatus | None = None
    limit: int = 1000
    offset: int = 0


@attrs.frozen(slots=True)
class QueueDepth:
    pass


@attrs.frozen(slots=True)
class MemberClaims:
    member_id: str


@attrs.frozen(slots=True)
class NextDeadline:
    """When the next timer fires, lease expires or retained workflow goes: when to propose a `Tick`."""


@attrs.frozen(slots=True)
class Stats:
    pass


Query = GetWorkflow | ListWorkflows | QueueDepth | MemberClaims | NextDeadline | Stats


@attrs.frozen(slots=True)
class StepView:
    step_id: int
    node_name: str
    config: Any
    status: StepStatus
    priority: int
    enqueued_at: float
    due: float | None
    attempts: int
    failures: int
    last_error: str | None


@attrs.frozen(slots=True)
class ExecutingStepView:
    workflow_id: str
    step_id: int
    node_name: str
    config: Any
    claim_id: int
    member_id: str
    attempt: int
    execution_id: str
    started_at: float
    lease_expires_at: float


@attrs.frozen(slots=True)
class WaitingJoinView:
    node_name: str
    scope_id: int
    outstanding: int  # steps and nested scopes it still waits for


@attrs.frozen(slots=True)
class WorkflowView:
    workflow_id: str
    status: WorkflowStatus
    current_state: Any
    metadata: dict[str, Any]
    started_at: float
    completed_at: float | None
    last_error: str | None
    state_version: int
    executed: tuple[ExecutedStep, ...]  # the last `HISTORY_LIMIT` finished attempts, oldest first
    executed_count: int
    executing: tuple[ExecutingStepView, ...]
    pending: tuple[StepView, ...]  # READY, DELAYED and PARKED steps
    dead_letters: tuple[StepView, ...]
    waiting_joins: tuple[WaitingJoinView, ...]


@attrs.frozen(slots=True)
class WorkflowSummary:
    workflow_id: str
    status: WorkflowStatus
    started_at: float
    completed_at: float | None
    last_error: str | None


@attrs.frozen(slots=True)
class WorkflowList:
    workflows: tuple[WorkflowSummary, ...]
    total: int  # how many matched, before `offset` and `limit`


@attrs.frozen(slots=True)
class NodeQueueDepth:
    node_name: str
    ready: int  # claimable now (steps of paused or failed workflows are not counted)
    delayed: int
    claimed: int


@attrs.frozen(slots=True)
class QueueDepthView:
    nodes: tuple[NodeQueueDepth, ...]  # sorted by node name


@attrs.frozen(slots=True)
class MemberClaimsView:
    member_id: str
    claims: tuple[ExecutingStepView, ...]  # by claim id


@attrs.frozen(slots=True)
class NextDeadlineView:
    due: float | None


@attrs.frozen(slots=True)
class StatsView:
    now: float
    workflows: dict[str, int]  # by status value
    ready: int
    delayed: int
    claimed: int
    parked: int
    dead: int


Answer = WorkflowView | NotFound | WorkflowList | QueueDepthView | MemberClaimsView | NextDeadlineView | StatsView

# --- the codec ------------------------------------------------------------------------------------------

_TAGS: dict[type[Any], int] = {
    # commands
    StartWorkflow: 1,
    Claim: 2,
    RenewClaims: 3,
    ReleaseClaims: 4,
    CompleteStep: 5,
    FailStep: 6,
    ParkStep: 7,
    PauseWorkflow: 8,
    ResumeWorkflow: 9,
    CancelWorkflow: 10,
    RetryWorkflow: 11,
    Tick: 12,
    Broadcast: 13,
    # replies
    Invalid: 32,
    WorkflowExists: 33,
    NotFound: 34,
    ClaimLost: 35,
    InvalidTransition: 36,
    Started: 37,
    Claimed: 38,
    Renewed: 39,
    Released: 40,
    StepCompleted: 41,
    StepFailed: 42,
    StepParked: 43,
    StatusChanged: 44,
    Ticked: 45,
    Broadcasted: 46,
    # queries
    GetWorkflow: 64,
    ListWorkflows: 65,
    QueueDepth: 66,
    MemberClaims: 67,
    NextDeadline: 68,
    Stats: 69,
    # answers
    WorkflowView: 96,
    WorkflowList: 97,
    QueueDepthView: 98,
    MemberClaimsView: 99,
    NextDeadlineView: 100,
    StatsView: 101,
}
_CLASSES: dict[int, type[Any]] = {tag: cls for cls, tag in _TAGS.items()}
COMMAND_TYPES: tuple[type[Any], ...] = tuple(cls for cls, tag in _TAGS.items() if tag < 32)
QUERY_TYPES: tuple[type[Any], ...] = tuple(cls for cls, tag in _TAGS.items() if 64 <= tag < 96)

_Convert = Callable[[Any], Any]


def encode(value: Any) -> bytes:
    """The bytes of a command, reply, query or answer."""
    tag = _TAGS.get(type(value))
    if tag is None:
        raise TypeError(f"{type(value).__name__} has no wire tag")
    return _dumps([FORMAT_VERSION, tag, *_fields_encoder(type(value))(value)])


_COMMAND_TIME = re.compile(rb"\[(\d+),(\d+),(-?[0-9][0-9.eE+-]*)(?=[,\]])")


def restamp(data: bytes, now: float) -> bytes:
    """The encoded command `data` with its time (its first field) replaced by `now`.

    The leader calls this on every command it appends (`WorkflowStateMachine.stamp`), so replicated time is
    the leader's clock whoever proposed. It touches only the number after the tag, without decoding the
    rest: a few microseconds whatever the payload. Anything that is not an encoded command of this format
    (which `apply` will refuse) is returned unchanged.
    """
    match = _COMMAND_TIME.match(data)
    if match is None or int(match[1]) != FORMAT_VERSION or int(match[2]) >= 32 or not math.isfinite(now):
        return data
    return b"%s%s%s" % (data[: match.start(3)], _dumps(float(now)), data[match.end(3) :])


def decode(data: bytes) -> Any:
    """The inverse of `encode`; raises `CodecError` on anything else."""
    try:
        raw = _JSON_DECODER.decode(data.decode())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CodecError(f"not JSON: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise CodecError("expected [version, tag, fields...]")
    if raw[0] != FORMAT_VERSION or type(raw[0]) is not int:
        raise CodecError(f"unknown format version {raw[0]!r}")
    cls = _CLASSES.get(raw[1]) if type(raw[1]) is int else None
    if cls is None:
        raise CodecError(f"unknown tag {raw[1]!r}")
    return _record_decoder(cls)(raw[2:])


def _dumps(value: Any) -> bytes:
    return _JSON_ENCODER.encode(value).encode()


def _refuse_constant(name: str) -> Any:
    raise CodecError(f"{name} is not JSON")


_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _identity(value: Any) -> Any:
    return value


def _fields_encoder(cls: type[Any]) -> Callable[[Any], list[Any]]:
    cached = _FIELDS_ENCODERS.get(cls)
    if cached is None:
        cached = _FIELDS_ENCODERS[cls] = _build_fields_encoder(cls)
    return cached


def _record_decoder(cls: type[Any]) -> _Convert:
    cached = _RECORD_DECODERS.get(cls)
    if cached is None:
        cached = _RECORD_DECODERS[cls] = _build_record_decoder(cls)
    return cached


_FIELDS_ENCODERS: dict[type[Any], Callable[[Any], list[Any]]] = {}
_RECORD_DECODERS: dict[type[Any], _Convert] = {}


def _build_fields_encoder(cls: type[Any]) -> Callable[[Any], list[Any]]:
    fields = _wire_fields(cls)
    getters = [operator.attrgetter(f.name) for f in fields]
    encoders = [encoder_for(f.type) for f in fields]
    if all(e is None for e in encoders):
        return lambda value: [get(value) for get in getters]
    pairs = [(get, enc or _identity) for get, enc in zip(getters, encoders, strict=True)]
    return lambda value: [enc(get(value)) for get, enc in pairs]


def _build_record_decoder(cls: type[Any]) -> _Convert:
    fields = _wire_fields(cls)
    decoders = [decoder_for(f.type) for f in fields]
    required = max((i + 1 for i, f in enumerate(fields) if f.default is attrs.NOTHING), default=0)
    name = cls.__name__

    def decode_record(raw: Any) -> Any:
        if not isinstance(raw, list) or not required <= len(raw) <= len(decoders):
            raise CodecError(f"{name}: expected {required} to {len(decoders)} fields")
        try:
            return cls(*[dec(item) for dec, item in zip(decoders, raw, strict=False)])
        except CodecError as exc:
            raise CodecError(f"{name}: {exc}") from None

    return decode_record


def _wire_fields(cls: type[Any]) -> list[attrs.Attribute[Any]]:
    attrs.resolve_types(cls, globalns=vars(sys.modules[cls.__module__]))
    fields = list(attrs.fields(cls))
    wire = [f for f in fields if not f.metadata.get("transient")]
    if fields[: len(wire)] != wire:
        raise TypeError(f"{cls.__name__}: transient fields must come last")
    return wire


def encoder_for(tp: Any) -> _Convert | None:
    """How to turn a value of type `tp` into JSON; None when it already is JSON."""
    if tp not in _ENCODERS:
        _ENCODERS[tp] = _build_encoder(tp)
    return _ENCODERS[tp]


def decoder_for(tp: Any) -> _Convert:
    """How to read a value of type `tp` back from JSON, checking its shape; raises `CodecError`."""
    decoder = _DECODERS.get(tp)
    if decoder is None:
        decoder = _DECODERS[tp] = _build_decoder(tp)
    return decoder


_ENCODERS: dict[Any, _Convert | None] = {}
_DECODERS: dict[Any, _Convert] = {}


def _build_encoder(tp: Any) -> _Convert | None:
    if tp in (Any, str, int, float, bool, type(None)):
        return None
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return operator.attrgetter("value")
    if isinstance(tp, type) and attrs.has(tp):
        return _fields_encoder(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        inner = encoder_for(args[0])
        if inner is None:
            return None
        item_encoder: _Convert = inner
        return lambda value: [item_encoder(item) for item in value]
    if origin is dict and args[0] is str:
        inner = encoder_for(args[1])
        if inner is None:
            return None
        value_encoder: _Convert = inner
        return lambda value: {key: value_encoder(item) for key, item in value.items()}
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = encoder_for(next(a for a in args if a is not type(None)))
        if inner is None:
            return None
        some_encoder: _Convert = inner
        return lambda value: None if value is None else some_encoder(value)
    raise TypeError(f"no encoding for {tp!r}")


def _build_decoder(tp: Any) -> _Convert:
    if tp is Any:
        return _identity
    if tp is str:
        return _typed(str, "a string")
    if tp is bool:
        return _typed(bool, "a boolean")
    if tp is int:
        return _typed(int, "an integer")
    if tp is float:
        return _decode_float
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _decode_enum(tp)
    if isinstance(tp, type) and attrs.has(tp):
        return _record_decoder(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_decoder = decoder_for(args[0])

        def decode_tuple(raw: Any) -> tuple[Any, ...]:
            if not isinstance(raw, list):
                raise CodecError(f"expected a list, got {type(raw).__name__}")
            return tuple(item_decoder(item) for item in raw)

        return decode_tuple
    if origin is dict and args[0] is str:
        value_decoder = decoder_for(args[1])

        def decode_dict(raw: Any) -> dict[str, Any]:
            if not isinstance(raw, dict):
                raise CodecError(f"expected an object, got {type(raw).__name__}")
            return raw if value_decoder is _identity else {key: value_decoder(item) for key, item in raw.items()}

        return decode_dict
    if origin in (typing.Union, types.UnionType) and type(None) in args and len(args) == 2:
        inner = decoder_for(next(a for a in args if a is not type(None)))
        return lambda raw: None if raw is None else inner(raw)
    raise TypeError(f"no decoding for {tp!r}")


def _typed(kind: type[Any], what: str) -> _Convert:
    def check(raw: Any) -> Any:
        if type(raw) is not kind:
            raise CodecError(f"expected {what}, got {type(raw).__name__}")
        return raw

    return check


def _decode_float(raw: Any) -> float:
    if type(raw) is float:
        return raw
    if type(raw) is int:
        return float(raw)
    raise CodecError(f"expected a number, got {type(raw).__name__}")


def _decode_enum(cls: type[enum.Enum]) -> _Convert:
    def decode_enum(raw: Any) -> Any:
        try:
            return cls(raw)
        except ValueError:
            raise CodecError(f"{raw!r} is not a {cls.__name__}") from None

    return decode_enum
