"""Linearizability checking for the histories the cluster simulator records.

This module owns one question: could the recorded operations have happened one at a time, each at some
instant between its call and its return, in an order that a sequential model accepts? It is pure: a
finished history goes in, a `LinearizabilityResult` comes out, with no clock, I/O or randomness, and the
same history always gives the same result.

The search is Wing & Gong's depth-first search over call and return events, with Lowe's memoization of
(set of linearized operations, model state) as in Porcupine. A history is first split by key: a history
is linearizable if and only if every key's sub-history is (P-compositionality), and small partitions keep
the search and its bitsets small.

Conventions:

- Intervals are closed. An operation whose call time equals another's return time is concurrent with it,
  so either may be linearized first; in the event list, calls sort before returns at equal times.
- `ret=None` marks an indeterminate operation (timed out, or its client crashed): it may take effect at
  any instant after its call, or never. Its return is placed at +infinity, and once every completed
  operation is linearized, any indeterminate ones still pending are taken never to have happened.
- The key-value model reads an absent key as "" (a get's `output=None` means the same), and an
  indeterminate get says nothing about the state, so `check_history` drops it before searching.
- Operations that carry the same client and `batch` number were submitted together and take effect
  atomically (`RaftNode.propose_many`): within a partition they are linearized one right after another,
  in the order of their positions, with no other operation between them, and all or none of them. Across
  partitions nothing ties them together: a batch's writes to different keys are each checked on their
  own key, so a reader that saw one key's write and not another's at the same time goes unnoticed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Generic, Literal, Protocol, TypeVar

import attrs

Status = Literal["ok", "violation", "timeout"]

DEFAULT_MAX_STEPS = 2_000_000

# How much of a failing search the explanation quotes; the full lists are on the result.
_QUOTED_PREFIX_OPS = 3
_QUOTED_FRONTIER_OPS = 5


def _check_return_time(
    instance: Operation, attribute: attrs.Attribute[float | None], ret: float | None
) -> None:
    if ret is not None and ret < instance.call:
        raise ValueError(f"operation returns at {ret} before its call at {instance.call}: {instance!r}")


@attrs.frozen
class Operation:
    """One client operation as the simulator observed it.

    `value` is the argument of a put or append; `output` is what a get returned. `ret=None` means the
    client never saw a response, so the operation may or may not have taken effect. `batch` is set on
    the operations a client submitted together as one atomic batch: (the client's number for the batch,
    the operation's position in it).
    """

    client_id: int
    key: str
    kind: str
    value: str | None
    output: str | None
    call: float
    ret: float | None = attrs.field(validator=_check_return_time)
    batch: tuple[int, int] | None = None


StateT = TypeVar("StateT", bound=Hashable)


class Model(Protocol[StateT]):
    """A sequential specification: the states an object can be in and how operations move between them.

    States must be hashable and compare equal exactly when they behave the same, because the search
    memoizes on them.
    """

    def init(self) -> StateT:
        """The state before any operation."""
        ...

    def step(self, state: StateT, op: Operation) -> tuple[bool, StateT]:
        """Whether `op`, with its recorded output, is legal in `state`, and the state after it."""
        ...


class KeyValueModel:
    """One key of a key-value store: a string register with get, put and string append."""

    def init(self) -> str:
        return ""

    def step(self, state: str, op: Operation) -> tuple[bool, str]:
        kind = op.kind
        if kind == "get":
            # An indeterminate get's output was never seen, so it cannot contradict any state.
            if op.ret is None:
                return True, state
            return (op.output or "") == state, state
        if kind == "put":
            return True, op.value or ""
        if kind == "append":
            return True, state + (op.value or "")
        raise ValueError(f"unknown key-value operation kind {kind!r}: {op!r}")


@attrs.frozen
class LinearizabilityResult:
    """The verdict on a history.

    On "violation" or "timeout", `key` names the first such key (in sorted order; a violation wins over
    a timeout), `explanation` says what went wrong in a few lines, `longest_prefix` is the longest
    linearizable prefix the search found for that key, in linearization order, and `frontier` holds the
    operations of that key that would have had to come next (every unplaced operation called no later than
    the earliest unplaced return). `steps` counts search steps over all keys.
    """

    status: Status
    key: str | None = None
    explanation: str = ""
    longest_prefix: tuple[Operation, ...] = ()
    frontier: tuple[Operation, ...] = ()
    timed_out_keys: tuple[str, ...] = ()
    steps: int = 0

    @property
    def ok(self) -> bool:
        """True only when the history was shown linearizable; a timeout is not ok, and not a violation."""
        return self.status == "ok"


def check_history(ops: Iterable[Operation], *, max_steps: int = DEFAULT_MAX_STEPS) -> LinearizabilityResult:
    """Check a key-value history against `KeyValueModel`, one key at a time.

    `max_steps` bounds the search of each key, so one hard key cannot hide a violation on another; a key
    that exhausts it is reported as "timeout" unless some key has a violation. Every key is checked.
    Raises ValueError on an operation of unknown kind.
    """
    model = KeyValueModel()
    by_key: dict[str, list[Operation]] = {}
    for op in ops:
        if op.kind not in ("get", "put", "append"):
            raise ValueError(f"unknown key-value operation kind {op.kind!r}: {op!r}")
        if op.kind == "get" and op.ret is None:
            continue
        by_key.setdefault(op.key, []).append(op)

    # Every key is checked even after a violation, so that `timed_out_keys` is complete.
    results = [check_operations(by_key[key], model, max_steps=max_steps, key=key) for key in sorted(by_key)]
    total_steps = sum(result.steps for result in results)
    timed_out_keys = tuple(result.key or "" for result in results if result.status == "timeout")
    for status in ("violation", "timeout"):
        for result in results:
            if result.status == status:
                return attrs.evolve(result, steps=total_steps, timed_out_keys=timed_out_keys)
    return LinearizabilityResult(status="ok", steps=total_steps)


def check_operations(
    ops: Iterable[Operation],
    model: Model[StateT],
    *,
    max_steps: int = DEFAULT_MAX_STEPS,
    key: str | None = None,
) -> LinearizabilityResult:
    """Check one partition of a history against any sequential `model`, without splitting it further.

    `key` only labels the result. Every operation is handed to `model.step`, indeterminate ones included.
    """
    ordered = sorted(ops, key=_order_key)
    search = _Search(ordered, model, max_steps)
    status = search.run()
    if status == "ok":
        return LinearizabilityResult(status="ok", key=None, steps=search.steps)

    prefix = tuple(ordered[i] for i in search.best_prefix)
    frontier = _frontier(ordered, search.best_prefix)
    label = f"key {key!r}" if key is not None else "history"
    if status == "timeout":
        explanation = (
            f"{label}: gave up after {search.steps} steps; the longest linearizable prefix found places "
            f"{len(prefix)} of {len(ordered)} operations."
        )
    else:
        explanation = _explain_violation(label, ordered, prefix, frontier, search.best_state, model)
    return LinearizabilityResult(
        status=status,
        key=key,
        explanation=explanation,
        longest_prefix=prefix,
        frontier=frontier,
        timed_out_keys=(key or "",) if status == "timeout" else (),
        steps=search.steps,
    )


def _order_key(op: Operation) -> tuple[float, int, float, str, bool, str, bool, str, tuple[int, int]]:
    # Every field takes part, so the order (and with it the search and its report) does not depend on
    # the order the history was recorded in.
    return (
        op.call,
        op.client_id,
        math.inf if op.ret is None else op.ret,
        op.kind,
        op.value is None,
        op.value or "",
        op.output is None,
        op.output or "",
        op.batch or (-1, -1),
    )


class _Search(Generic[StateT]):
    """Wing & Gong's search with Lowe's memoization over one partition's operations, sorted by `_order_key`.

    Events live in a doubly linked list of array slots (slot 0 is the head, -1 ends the list) so that
    linearizing an operation unlinks its call and return in O(1) and backtracking relinks them in
    reverse order, as in dancing links.

    A batch's operations are chained (`batch_next`, `batch_previous`): once one is linearized, the next
    one of its batch is the only candidate, and an operation that has a predecessor in its batch is never
    a candidate otherwise. Which batch is half linearized follows from the set of linearized operations,
    so the memoization on (set, state) stays sound.
    """

    def __init__(self, ops: Sequence[Operation], model: Model[StateT], max_steps: int) -> None:
        self.ops = ops
        self.model = model
        self.max_steps = max_steps
        self.steps = 0
        self.best_prefix: list[int] = []
        self.best_state: StateT = model.init()

        count = len(ops)
        # Calls sort before returns at equal times: that is what makes touching intervals concurrent.
        events: list[tuple[float, int, int]] = []
        for index, op in enumerate(ops):
            events.append((op.call, 0, index))
            events.append((math.inf if op.ret is None else op.ret, 1, index))
        events.sort()

        slots = 2 * count + 1
        self.slot_op = [0] * slots
        self.slot_is_call = [False] * slots
        self.slot_is_open_return = [False] * slots
        self.match = [0] * slots
        call_slot = [0] * count
        for slot, (_, is_return, index) in enumerate(events, start=1):
            self.slot_op[slot] = index
            if is_return:
                self.slot_is_open_return[slot] = ops[index].ret is None
                self.match[call_slot[index]] = slot
            else:
                self.slot_is_call[slot] = True
                call_slot[index] = slot
        self.next = [slot + 1 for slot in range(slots)]
        self.next[slots - 1] = -1
        self.prev = [slot - 1 for slot in range(slots)]

        self.batch_next = [-1] * count
        self.batch_previous = [-1] * count
        batches: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for index, op in enumerate(ops):
            if op.batch is not None:
                number, position = op.batch
                batches.setdefault((op.client_id, number), []).append((position, index))
        for members in batches.values():
            members.sort()
            for (_, earlier), (_, later) in itertools.pairwise(members):
                self.batch_next[earlier] = later
                self.batch_previous[later] = earlier

    def run(self) -> Status:
        ops = self.ops
        step = self.model.step
        slot_op = self.slot_op
        slot_is_call = self.slot_is_call
        slot_is_open_return = self.slot_is_open_return
        match = self.match
        next_ = self.next
        prev = self.prev
        batch_next = self.batch_next
        batch_previous = self.batch_previous
        bits = [1 << index for index in range(len(ops))]
        max_steps = self.max_steps
        # The operation that must be linearized next, because the last one linearized is part of a batch
        # that goes on; -1 when none must.
        required = -1

        state = self.model.init()
        linearized = 0
        # Lowe's memoization: two paths that linearized the same set of operations and reached the same
        # state have the same future, so the second one is pruned.
        seen: set[tuple[int, StateT]] = set()
        # (call slot, state before it) for each linearized operation, in linearization order.
        stack: list[tuple[int, StateT]] = []
        steps = 0
        slot = next_[0]
        try:
            while slot != -1:
                if steps >= max_steps:
                    return "timeout"
                steps += 1
                if slot_is_call[slot]:
                    index = slot_op[slot]
                    # Not a candidate while a batch goes on, unless it is that batch's next operation, nor
                    # when it would start a batch anywhere but at the batch's first operation.
                    if index != required and (required >= 0 or batch_previous[index] >= 0):
                        slot = next_[slot]
                        continue
                    legal, new_state = step(state, ops[index])
                    if legal:
                        candidate = (linearized | bits[index], new_state)
                        if candidate not in seen:
                            seen.add(candidate)
                            stack.append((slot, state))
                            state = new_state
                            linearized = candidate[0]
                            required = batch_next[index]
                            # Unlink the call, then its return.
                            after = next_[slot]
                            next_[prev[slot]] = after
                            if after != -1:
                                prev[after] = prev[slot]
                            ret_slot = match[slot]
                            after = next_[ret_slot]
                            next_[prev[ret_slot]] = after
                            if after != -1:
                                prev[after] = prev[ret_slot]
                            if len(stack) > len(self.best_prefix):
                                self.best_prefix = [slot_op[s] for s, _ in stack]
                                self.best_state = state
                            slot = next_[0]
                            continue
                    slot = next_[slot]
                    continue
                if slot_is_open_return[slot] and required < 0:
                    # Returns at +infinity come after every finite one, so reaching one means every
                    # completed operation is linearized; the pending indeterminate ones never happened.
                    # (Not in the middle of a batch, though: the rest of it could not be placed, so the
                    # batch cannot have happened at all.)
                    return "ok"
                # Some operation returned here without being linearized: undo the last choice.
                if not stack:
                    return "violation"
                slot, state = stack.pop()
                linearized &= ~bits[slot_op[slot]]
                required = batch_next[slot_op[stack[-1][0]]] if stack else -1
                # Relink the return, then the call: the exact reverse of unlinking.
                ret_slot = match[slot]
                next_[prev[ret_slot]] = ret_slot
                after = next_[ret_slot]
                if after != -1:
                    prev[after] = ret_slot
                next_[prev[slot]] = slot
                after = next_[slot]
                if after != -1:
                    prev[after] = slot
                slot = next_[slot]
            return "ok"
        finally:
            self.steps = steps


def _frontier(ordered: Sequence[Operation], prefix: Sequence[int]) -> tuple[Operation, ...]:
    placed = set(prefix)
    unplaced = [op for index, op in enumerate(ordered) if index not in placed]
    completed_returns = [op.ret for op in unplaced if op.ret is not None]
    if not completed_returns:
        return tuple(unplaced)
    deadline = min(completed_returns)
    return tuple(op for op in unplaced if op.call <= deadline)


def _explain_violation(
    label: str,
    ordered: Sequence[Operation],
    prefix: Sequence[Operation],
    frontier: Sequence[Operation],
    state: StateT,
    model: Model[StateT],
) -> str:
    lines = [f"{label}: not linearizable."]
    if prefix:
        quoted = prefix[-_QUOTED_PREFIX_OPS:]
        elided = "..., " if len(prefix) > len(quoted) else ""
        lines.append(
            f"The longest linearizable prefix places {len(prefix)} of {len(ordered)} operations "
            f"({elided}{', '.join(describe_operation(op) for op in quoted)}) and leaves state {state!r}."
        )
    else:
        lines.append(f"Nothing can be linearized first from the initial state {state!r}.")
    rejected = [op for op in frontier if not model.step(state, op)[0]]
    if rejected:
        quoted = rejected[:_QUOTED_FRONTIER_OPS]
        more = f" and {len(rejected) - len(quoted)} more" if len(rejected) > len(quoted) else ""
        lines.append(
            "The model rejects each operation that must come next: "
            f"{'; '.join(describe_operation(op) for op in quoted)}{more}."
        )
    else:
        lines.append(
            f"Each of the {len(frontier)} operations that could come next fits, but every continuation "
            "fails later."
        )
    return " ".join(lines)


def describe_operation(op: Operation) -> str:
    """A one-line rendering of `op` for reports, e.g. `client 2 get -> 'ab' [3, 4.5]`."""
    ret = "?" if op.ret is None else f"{op.ret:g}"
    action = f"get -> {op.output!r}" if op.kind == "get" else f"{op.kind} {op.value!r}"
    batch = "" if op.batch is None else f" (batch {op.batch[0]} #{op.batch[1]})"
    return f"client {op.client_id} {action}{batch} [{op.call:g}, {ret}]"
