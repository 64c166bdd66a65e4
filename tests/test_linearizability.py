"""Tests for the linearizability checker: known histories, planted bugs, and a brute-force oracle."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sims.linearizability import (
    KeyValueModel,
    LinearizabilityResult,
    Operation,
    check_history,
    check_operations,
    describe_operation,
)


def put(client: int, value: str, call: float, ret: float | None, key: str = "k") -> Operation:
    return Operation(client_id=client, key=key, kind="put", value=value, output=None, call=call, ret=ret)


def append(client: int, value: str, call: float, ret: float | None, key: str = "k") -> Operation:
    return Operation(client_id=client, key=key, kind="append", value=value, output=None, call=call, ret=ret)


def get(client: int, output: str | None, call: float, ret: float | None, key: str = "k") -> Operation:
    return Operation(client_id=client, key=key, kind="get", value=None, output=output, call=call, ret=ret)


def assert_ok(ops: Sequence[Operation]) -> None:
    result = check_history(ops)
    assert result.status == "ok", result.explanation
    assert result.ok


def assert_violation(ops: Sequence[Operation]) -> LinearizabilityResult:
    result = check_history(ops)
    assert result.status == "violation"
    assert not result.ok
    return result


# Known linearizable histories.


def test_empty_history_is_linearizable() -> None:
    assert_ok([])


def test_sequential_history_is_linearizable() -> None:
    assert_ok(
        [
            get(1, "", 0, 1),
            put(1, "a", 2, 3),
            get(2, "a", 4, 5),
            append(2, "b", 6, 7),
            get(1, "ab", 8, 9),
            put(3, "c", 10, 11),
            get(3, "c", 12, 13),
        ]
    )


def test_reading_an_absent_key_returns_empty() -> None:
    assert_ok([get(1, None, 0, 1), get(2, "", 2, 3), put(1, "a", 0, 1, key="other")])


def test_get_concurrent_with_put_may_see_old_or_new_value() -> None:
    for seen in ("old", "new"):
        assert_ok([put(1, "old", 0, 1), put(1, "new", 2, 6), get(2, seen, 3, 4)])


def test_overlapping_reads_may_see_a_write_at_different_points() -> None:
    # All three reads overlap the slow put of "new": the earliest still sees "old", the next already
    # sees "new", and so does the last one.
    assert_ok(
        [
            put(1, "old", 0, 1),
            put(1, "new", 2, 10),
            get(2, "old", 3, 4),
            get(3, "new", 3.5, 5),
            get(2, "new", 6, 7),
        ]
    )


def test_concurrent_appends_may_apply_in_either_order() -> None:
    assert_ok([append(1, "x", 0, 5), append(2, "y", 1, 6), get(3, "yx", 7, 8)])
    assert_ok([append(1, "x", 0, 5), append(2, "y", 1, 6), get(3, "xy", 7, 8)])


def test_append_chain_with_interleaved_reads() -> None:
    assert_ok(
        [
            append(1, "a", 0, 2),
            append(2, "b", 1, 4),
            get(3, "a", 1.5, 3),
            append(1, "c", 3, 6),
            get(3, "ab", 4, 5),
            get(2, "abc", 6.5, 7),
        ]
    )


def test_indeterminate_put_that_took_effect() -> None:
    assert_ok([put(1, "a", 0, 1), put(2, "b", 2, None), get(3, "b", 5, 6)])


def test_indeterminate_put_that_never_took_effect() -> None:
    assert_ok([put(1, "a", 0, 1), put(2, "b", 2, None), get(3, "a", 5, 6), get(3, "a", 7, 8)])


def test_indeterminate_put_may_take_effect_long_after_its_call() -> None:
    assert_ok([put(1, "a", 0, 1), put(2, "b", 2, None), get(3, "a", 50, 51), get(3, "b", 90, 91)])


def test_indeterminate_append_may_take_effect_or_not() -> None:
    assert_ok([put(1, "a", 0, 1), append(2, "b", 2, None), get(3, "ab", 5, 6)])
    assert_ok([put(1, "a", 0, 1), append(2, "b", 2, None), get(3, "a", 5, 6)])


def test_indeterminate_get_constrains_nothing() -> None:
    assert_ok([put(1, "a", 0, 1), get(2, "never written", 2, None), get(2, None, 3, None), get(3, "a", 4, 5)])


def test_call_at_another_operations_return_time_is_concurrent_with_it() -> None:
    # The get is called at the instant the put returns, so it may be linearized before the put.
    assert_ok([put(1, "a", 0, 5), get(2, "", 5, 6)])
    # Called strictly later, it may not.
    assert_violation([put(1, "a", 0, 5), get(2, "", 5.5, 6)])


def test_keys_are_independent() -> None:
    assert_ok([put(1, "a", 0, 10, key="x"), get(2, "", 11, 12, key="y"), get(2, "a", 13, 14, key="x")])


# Batches (`propose_many`): writes submitted together take effect at one instant, in order, all or none.


def batch(client: int, number: int, call: float, ret: float | None, *writes: tuple[str, str, str]) -> list[Operation]:
    """The operations of one batch of (kind, value, key) writes, as the simulator's client records them."""
    return [
        Operation(client, key, kind, value, None, call, ret, (number, position))
        for position, (kind, value, key) in enumerate(writes)
    ]


def test_a_batch_applies_its_writes_to_one_key_in_order() -> None:
    writes = batch(1, 1, 0, 1, ("put", "x", "k"), ("append", "y", "k"))
    assert_ok([*writes, get(2, "xy", 2, 3)])
    # Applied last to first, the put would have overwritten the append.
    assert_violation([*writes, get(2, "x", 2, 3)])
    # The same writes, not batched, were concurrent: either order is linearizable.
    assert_ok([put(1, "x", 0, 1), append(2, "y", 0, 1), get(3, "x", 2, 3)])


def test_two_appends_of_a_batch_keep_their_order() -> None:
    writes = batch(1, 1, 0, 1, ("append", "a", "k"), ("append", "b", "k"))
    assert_ok([*writes, get(2, "ab", 2, 3)])
    result = assert_violation([*writes, get(2, "ba", 2, 3)])
    assert "(batch 1 #1)" in result.explanation  # the prefix quoted places the batch's second write


def test_nothing_comes_between_the_writes_of_a_batch() -> None:
    writes = batch(1, 1, 0, 10, ("append", "a", "k"), ("append", "b", "k"))
    for seen in ("", "ab"):
        assert_ok([*writes, get(2, seen, 2, 3)])
    assert_violation([*writes, get(2, "a", 2, 3)])  # a read in the middle of the batch
    assert_violation([*writes, append(2, "c", 2, 3), get(2, "acb", 11, 12)])


def test_an_indeterminate_batch_takes_effect_all_or_none() -> None:
    writes = batch(1, 1, 0, None, ("append", "a", "k"), ("append", "b", "k"))
    for seen in ("", "ab"):
        assert_ok([*writes, get(2, seen, 5, 6)])
    assert_violation([*writes, get(2, "a", 5, 6)])
    assert_violation([*writes, get(2, "b", 5, 6)])


def test_a_batch_across_keys_is_checked_key_by_key() -> None:
    writes = batch(1, 1, 0, 1, ("put", "x", "k"), ("append", "y", "j"), ("append", "z", "k"))
    assert_ok([*writes, get(2, "xz", 2, 3), get(2, "y", 2, 3, key="j")])
    assert_violation([*writes, get(2, "x", 2, 3), get(2, "y", 2, 3, key="j")])


@pytest.mark.xfail(
    strict=True,
    reason="the history is split by key, so a batch's writes to two keys are not checked for atomicity "
    "(a weaker check, documented in docs/SIMULATION.md)",
)
def test_a_reader_seeing_half_of_a_batch_across_keys_is_a_violation() -> None:
    # The first read sees the batch's write to k, so the batch is done; a later read misses its write to j.
    writes = batch(1, 1, 0, 10, ("put", "x", "k"), ("put", "y", "j"))
    assert_violation([*writes, get(2, "x", 2, 3), get(2, "", 4, 5, key="j")])


# Known violations.


def test_stale_read_after_a_completed_put_is_a_violation() -> None:
    result = assert_violation([put(1, "a", 0, 1), put(1, "b", 2, 3), get(2, "a", 4, 5)])
    assert result.key == "k"


def test_two_reads_seeing_values_in_an_impossible_order_is_a_violation() -> None:
    # The put of "b" is still running, but once a read has seen it, a later read cannot see "a" again.
    assert_violation([put(1, "a", 0, 1), put(1, "b", 2, 10), get(2, "b", 3, 4), get(3, "a", 5, 6)])


def test_read_missing_a_completed_append_is_a_violation() -> None:
    assert_violation([append(1, "x", 0, 1), append(2, "y", 2, 3), get(3, "y", 4, 5)])


def test_read_of_a_value_never_written_is_a_violation() -> None:
    assert_violation([put(1, "a", 0, 1), append(2, "b", 0.5, 3), get(3, "ba", 4, 5)])


def test_read_before_an_indeterminate_put_was_called_is_a_violation() -> None:
    assert_violation([get(1, "b", 0, 1), put(2, "b", 2, None)])


def test_an_indeterminate_put_takes_effect_at_most_once() -> None:
    assert_violation(
        [put(1, "a", 0, 1), put(2, "b", 2, None), get(3, "b", 3, 4), put(1, "c", 5, 6), get(3, "b", 7, 8)]
    )


def test_violation_names_the_key_and_explains_what_could_not_be_placed() -> None:
    stale = get(2, "a", 4, 5, key="y")
    history = [
        put(1, "z", 0, 1, key="x"),
        put(1, "a", 0, 1, key="y"),
        put(1, "b", 2, 3, key="y"),
        stale,
        get(2, "z", 4, 5, key="z"),  # a value never written to key z: a violation there too
    ]
    result = assert_violation(history)
    assert result.key == "y"  # the first violating key in sorted order
    assert [op.value for op in result.longest_prefix] == ["a", "b"]
    assert result.frontier == (stale,)
    assert "key 'y'" in result.explanation
    assert describe_operation(stale) in result.explanation
    assert "'b'" in result.explanation  # the state the prefix leaves


def test_result_does_not_depend_on_recording_order() -> None:
    history = [
        put(1, "a", 0, 1),
        append(2, "b", 0, 4),
        get(3, "ab", 1, 2),
        get(1, "a", 3, 5),
        put(4, "c", 3, None),
        get(2, "a", 3, 3),
        get(1, "abc", 6, 7),
    ]
    expected = check_history(history)
    assert expected.status == "violation"
    shuffler = random.Random(7)
    for _ in range(20):
        shuffled = list(history)
        shuffler.shuffle(shuffled)
        assert check_history(shuffled) == expected


def test_malformed_operations_are_rejected() -> None:
    with pytest.raises(ValueError, match="before its call"):
        put(1, "a", 5, 4)
    with pytest.raises(ValueError, match="unknown key-value operation kind"):
        check_history([Operation(1, "k", "delete", None, None, 0, 1)])


def test_check_operations_works_with_any_model() -> None:
    @attrs.frozen
    class CounterModel:
        """A counter where "put" adds int(value) and "get" reads the total."""

        def init(self) -> int:
            return 0

        def step(self, state: int, op: Operation) -> tuple[bool, int]:
            if op.kind == "get":
                return op.output == str(state), state
            return True, state + int(op.value or "0")

    model = CounterModel()
    concurrent = [put(1, "2", 0, 5), put(2, "3", 0, 5), get(3, "3", 1, 2), get(3, "5", 6, 7)]
    assert check_operations(concurrent, model).status == "ok"
    impossible = [*concurrent[:3], get(3, "4", 6, 7)]
    assert check_operations(impossible, model).status == "violation"
    # This model, unlike the key-value one, rejects an indeterminate read it disagrees with; the checker
    # still passes the history, because an indeterminate operation may be left out altogether.
    assert check_operations([*concurrent, get(4, "99", 1, None)], model).status == "ok"


# Memoization and the step budget.


def concurrent_puts_with_an_impossible_read(writers: int) -> list[Operation]:
    """All writers overlap, then a read sees a value none of them wrote.

    Without memoization the search tries every order of the writers (writers! of them); with it, the
    (set of writers linearized, last value written) pairs number writers * 2**writers.
    """
    ops = [put(client, f"v{client}", 0, 10) for client in range(writers)]
    return [*ops, get(writers, "never written", 11, 12)]


def test_memoization_keeps_a_factorial_search_small() -> None:
    result = check_history(concurrent_puts_with_an_impossible_read(12))
    assert result.status == "violation"
    # 12! is about 4.8e8 orders; the memoized search visits a tiny fraction of that.
    assert result.steps < 400_000


def test_exhausted_budget_is_a_timeout_not_a_verdict() -> None:
    result = check_history(concurrent_puts_with_an_impossible_read(12), max_steps=1_000)
    assert result.status == "timeout"
    assert not result.ok
    assert result.key == "k"
    assert result.timed_out_keys == ("k",)
    assert result.steps == 1_000
    assert "gave up after 1000 steps" in result.explanation


def test_violation_on_one_key_wins_over_a_timeout_on_another() -> None:
    slow = concurrent_puts_with_an_impossible_read(12)
    broken = [put(1, "a", 0, 1, key="b"), get(2, "x", 2, 3, key="b")]
    result = check_history([*slow, *broken], max_steps=1_000)
    assert result.status == "violation"
    assert result.key == "b"
    assert result.timed_out_keys == ("k",)


def register_workload(seed: int, clients: int, ops_per_client: int, key: str = "k") -> list[Operation]:
    """A well-formed, linearizable history: each client runs its operations one after another, and each
    operation takes effect at a random instant inside its interval."""
    rng = random.Random(seed)
    timed: list[tuple[float, int, Operation]] = []
    for client in range(clients):
        now = rng.uniform(0, 3)
        for number in range(ops_per_client):
            call = now
            ret = call + rng.uniform(1, 10)
            kind = rng.choice(["get", "get", "put", "append"])
            value = f"<{client}.{number}>" if kind != "get" else None
            timed.append((rng.uniform(call, ret), len(timed), Operation(client, key, kind, value, None, call, ret)))
            now = ret + rng.uniform(0, 2)
    state = ""
    history = []
    for _, _, op in sorted(timed):
        if op.kind == "get":
            op = attrs.evolve(op, output=state)
        elif op.kind == "put":
            state = op.value or ""
        else:
            state += op.value or ""
        history.append(op)
    return history


def test_large_concurrent_history_checks_within_a_small_budget() -> None:
    # 500 operations from 5 clients on one key; the budget is what a fast check looks like, since a step
    # count, unlike a wall-clock limit, does not depend on the machine.
    history = register_workload(seed=1, clients=5, ops_per_client=100)
    result = check_history(history, max_steps=100_000)
    assert result.status == "ok", result.explanation

    reads = [index for index, op in enumerate(history) if op.kind == "get" and op.output]
    planted = list(history)
    planted[reads[len(reads) // 2]] = attrs.evolve(history[reads[len(reads) // 2]], output="never written")
    assert check_history(planted, max_steps=100_000).status == "violation"


# Generated histories.

KEYS = ("a", "b")


@st.composite
def linearizable_histories(draw: st.DrawFn) -> list[Operation]:
    """Run a sequential register, then draw a real-time interval around each operation's linearization
    point; some operations are indeterminate, and of those some took effect and some did not.

    Times are small integers so that calls and returns often coincide, which exercises the tie convention:
    when an interval ends exactly where another begins, the generator may order them either way.
    """
    count = draw(st.integers(1, 40))
    states = dict.fromkeys(KEYS, "")
    history = []
    for number in range(count):
        key = draw(st.sampled_from(KEYS))
        kind = draw(st.sampled_from(("get", "put", "append", "batch")))
        point = 10 * number
        call = point - draw(st.integers(0, 25))
        indeterminate = draw(st.integers(0, 9)) == 0
        ret = None if indeterminate else point + draw(st.integers(0, 25))
        client = draw(st.integers(0, 4))
        if kind == "batch":
            # Two to four writes at one linearization point, applied in order; all of them or none.
            writes = [
                (draw(st.sampled_from(("put", "append"))), draw(st.sampled_from(KEYS)))
                for _ in range(draw(st.integers(2, 4)))
            ]
            happened = not indeterminate or draw(st.booleans())
            for position, (write, write_key) in enumerate(writes):
                value = f"v{number}.{position};" if write == "put" else f"<{number}.{position}>"
                if happened:
                    states[write_key] = value if write == "put" else states[write_key] + value
                history.append(Operation(client, write_key, write, value, None, call, ret, (number, position)))
            continue
        if kind == "get":
            output = draw(st.sampled_from((None, "garbage"))) if indeterminate else states[key]
            history.append(Operation(client, key, kind, None, output, call, ret))
            continue
        # Values are unique and self-delimiting: no state can be built two ways.
        value = f"v{number};" if kind == "put" else f"<{number}>"
        if not indeterminate or draw(st.booleans()):
            states[key] = value if kind == "put" else states[key] + value
        history.append(Operation(client, key, kind, value, None, call, ret))
    return history


def quiescent_end(history: Sequence[Operation]) -> float:
    return max([op.ret if op.ret is not None else op.call for op in history], default=0) + 1


@settings(max_examples=200, deadline=None)
@given(linearizable_histories())
def test_generated_linearizable_histories_pass(history: list[Operation]) -> None:
    result = check_history(history)
    assert result.status == "ok", result.explanation


@settings(max_examples=100, deadline=None)
@given(linearizable_histories(), st.data())
def test_planted_read_of_a_never_written_value_is_caught(history: list[Operation], data: st.DataObject) -> None:
    reads = [index for index, op in enumerate(history) if op.kind == "get" and op.ret is not None]
    assume(reads)
    target = data.draw(st.sampled_from(reads))
    planted = list(history)
    planted[target] = attrs.evolve(history[target], output="never written")
    result = check_history(planted)
    assert result.status == "violation"
    assert result.key == history[target].key


@settings(max_examples=100, deadline=None)
@given(linearizable_histories(), st.sampled_from(KEYS))
def test_planted_stale_read_after_quiescence_is_caught(history: list[Operation], key: str) -> None:
    # After everything completed, two sequential puts of fresh values and a read of the older one. No
    # pending indeterminate operation can bring back the first value: only the first put writes it, and
    # it precedes the second in real time.
    end = quiescent_end(history)
    planted = [
        *history,
        put(7, "first;", end, end + 1, key=key),
        put(8, "second;", end + 2, end + 3, key=key),
        get(9, "first;", end + 4, end + 5, key=key),
    ]
    result = check_history(planted)
    assert result.status == "violation"
    assert result.key == key


def brute_force_is_linearizable(history: Sequence[Operation]) -> bool:
    """The definition, directly: some subset of the indeterminate operations, together with every
    completed one, has an order that respects real time and that the model accepts."""
    model = KeyValueModel()
    completed = [op for op in history if op.ret is not None]
    pending = [op for op in history if op.ret is None and op.kind != "get"]
    for size in range(len(pending) + 1):
        for chosen in itertools.combinations(pending, size):
            if not whole_batches(chosen, pending):
                continue
            for order in itertools.permutations([*completed, *chosen]):
                if any(
                    (later.ret if later.ret is not None else math.inf) < earlier.call
                    for position, earlier in enumerate(order)
                    for later in order[position + 1 :]
                ):
                    continue
                if not batches_in_one_piece(order):
                    continue
                state = model.init()
                for op in order:
                    legal, state = model.step(state, op)
                    if not legal:
                        break
                else:
                    return True
    return False


def batch_key(op: Operation) -> tuple[int, int] | None:
    return None if op.batch is None else (op.client_id, op.batch[0])


def whole_batches(chosen: Sequence[Operation], pending: Sequence[Operation]) -> bool:
    """Whether `chosen` takes every pending operation of each batch it takes one of."""
    taken = {batch_key(op) for op in chosen} - {None}
    return all(op in chosen for op in pending if batch_key(op) in taken)


def batches_in_one_piece(order: Sequence[Operation]) -> bool:
    """Whether each batch's operations come one right after another in `order`, by position."""
    for position, op in enumerate(order):
        if op.batch is not None and op.batch[1] > 0:
            before = order[position - 1] if position else None
            if before is None or batch_key(before) != batch_key(op) or before.batch != (op.batch[0], op.batch[1] - 1):
                return False
    return True


@st.composite
def small_arbitrary_histories(draw: st.DrawFn) -> list[Operation]:
    """Up to six operations on one key with random intervals and random read outputs from a small pool,
    so that roughly half are linearizable. Some writes come in batches of two or three."""
    count = draw(st.integers(1, 6))
    history: list[Operation] = []
    for number in range(count):
        kind = draw(st.sampled_from(("get", "put", "append", "batch")))
        call = draw(st.integers(0, 8))
        ret = None if draw(st.integers(0, 5)) == 0 else call + draw(st.integers(0, 4))
        if kind == "get":
            output = draw(st.sampled_from(("", "a", "b", "ab", "ba", "bb")))
            history.append(Operation(number, "k", kind, None, output, call, ret))
        elif kind == "batch":
            size = min(draw(st.integers(2, 3)), 6 - len(history))
            for position in range(size):
                write = draw(st.sampled_from(("put", "append")))
                value = draw(st.sampled_from(("a", "b")))
                history.append(Operation(number, "k", write, value, None, call, ret, (number, position)))
        else:
            history.append(Operation(number, "k", kind, draw(st.sampled_from(("a", "b"))), None, call, ret))
        if len(history) >= 6:
            break
    return history


@settings(max_examples=200, deadline=None)
@given(small_arbitrary_histories())
def test_agrees_with_brute_force_on_small_histories(history: list[Operation]) -> None:
    expected = "ok" if brute_force_is_linearizable(history) else "violation"
    assert check_history(history).status == expected
