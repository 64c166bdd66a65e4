"""Property tests of `RaftLog` and `MemoryStorage` against simple models (hypothesis)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from graft_trio.raft import Entry, EntryKind, HardState, Membership, MemoryStorage, Snapshot, SnapshotMeta
from graft_trio.raft.log import RaftLog
from tests.raft_cluster import membership_of

MEMBERSHIPS = [
    membership_of(["a"]),
    membership_of(["a", "b"]),
    membership_of(["a", "b", "c"]),
    membership_of(["a", "c"], ["b"]),
]

# Each appended entry: None for a command, or the position of a membership in MEMBERSHIPS.
entry_shapes = st.lists(st.one_of(st.none(), st.integers(0, len(MEMBERSHIPS) - 1)), min_size=1, max_size=4)


def make_entry(index: int, term: int, shape: int | None) -> Entry:
    if shape is None:
        return Entry(term, index, EntryKind.NORMAL, f"{index}@{term}".encode())
    return Entry(term, index, EntryKind.MEMBERSHIP, membership=MEMBERSHIPS[shape])


def log_from_terms(offset: int, offset_term: int, terms: list[int]) -> RaftLog:
    entries = [make_entry(offset + 1 + i, t, None) for i, t in enumerate(terms)]
    return RaftLog(SnapshotMeta(offset, offset_term, MEMBERSHIPS[0]), entries, 0)


# --- simple properties -------------------------------------------------------------------------------


nondecreasing_terms = st.lists(st.integers(0, 3), max_size=30).map(
    lambda steps: [1 + sum(steps[: i + 1]) for i in range(len(steps))]
)


@settings(max_examples=100, deadline=None)
@given(
    offset=st.integers(0, 5),
    terms=nondecreasing_terms,
    index=st.integers(0, 40),
    term=st.integers(0, 100),
)
def test_find_conflict_by_term_returns_the_last_index_at_or_below_with_a_term_at_most_term(
    offset: int, terms: list[int], index: int, term: int
) -> None:
    offset_term = 1 if offset else 0
    log = log_from_terms(offset, offset_term, terms)
    found_index, found_term = log.find_conflict_by_term(index, term)
    assert found_term == log.term(found_index)
    assert log.offset <= found_index <= max(log.offset, min(index, log.last_index))
    if found_index > log.offset:
        assert found_term <= term
    # Every entry between it and the index asked for has a higher term: none was skipped.
    for between in range(found_index + 1, min(index, log.last_index) + 1):
        between_term = log.term(between)
        assert between_term is not None and between_term > term


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=20),
    low=st.integers(1, 20),
    max_bytes=st.integers(1, 400),
)
def test_slice_returns_at_least_one_entry_and_stops_once_the_byte_budget_is_exceeded(
    sizes: list[int], low: int, max_bytes: int
) -> None:
    entries = [Entry(1, i + 1, EntryKind.NORMAL, b"x" * size) for i, size in enumerate(sizes)]
    log = RaftLog(SnapshotMeta(), entries, 0)
    low = min(low, log.last_index)
    out = log.slice(low, log.last_index + 1, max_bytes)
    assert out and out == entries[low - 1 : low - 1 + len(out)]
    assert len(out) == 1 or sum(e.size() for e in out) <= max_bytes
    if low - 1 + len(out) < len(entries):
        assert sum(e.size() for e in entries[low - 1 : low + len(out)]) > max_bytes


def test_is_up_to_date_is_a_total_preorder_on_last_term_then_index() -> None:
    log = log_from_terms(0, 0, [1, 2, 2])
    assert log.is_up_to_date(3, 2) and log.is_up_to_date(1, 3) and not log.is_up_to_date(2, 2)


# --- a stateful model of the log ------------------------------------------------------------------------


class RaftLogMachine(RuleBasedStateMachine):
    """Drives a RaftLog as a follower's and a leader's log are driven, against a dict of entries."""

    def __init__(self) -> None:
        super().__init__()
        self.log = RaftLog(SnapshotMeta(), [], 0)
        self.entries: dict[int, Entry] = {}  # the model: every entry after the offset
        self.history: dict[int, Entry] = {}  # committed entries, compacted or not (a leader may resend them)
        self.offset = 0
        self.offset_term = 0
        self.base_membership = Membership()
        self.committed = 0
        self.applied = 0
        self.stable = 0
        self.max_term = 1

    @initialize(offset=st.integers(0, 4), shapes=st.lists(st.one_of(st.none(), st.integers(0, 3)), max_size=5))
    def start(self, offset: int, shapes: list[int | None]) -> None:
        self.offset, self.offset_term = offset, (1 if offset else 0)
        self.base_membership = MEMBERSHIPS[2] if offset else Membership()
        entries = [make_entry(offset + 1 + i, 1, shape) for i, shape in enumerate(shapes)]
        self.log = RaftLog(SnapshotMeta(offset, self.offset_term, self.base_membership), entries, 0)
        self.entries = {e.index: e for e in entries}
        self.committed = self.applied = offset
        self.stable = self.last_index
        self.history = {i: make_entry(i, 1, None) for i in range(1, offset + 1)}  # what the snapshot covers

    # --- the model ---

    @property
    def last_index(self) -> int:
        return max(self.entries, default=self.offset)

    def model_term(self, index: int) -> int | None:
        if index == self.offset:
            return self.offset_term
        entry = self.entries.get(index)
        return entry.term if entry is not None else None

    def model_membership_at(self, index: int) -> Membership:
        found = self.base_membership
        for i in sorted(self.entries):
            entry = self.entries[i]
            if i <= index and entry.membership is not None:
                found = entry.membership
        return found

    def replace_from(self, entries: list[Entry]) -> None:
        first = entries[0].index
        for index in [i for i in self.entries if i >= first]:
            del self.entries[index]
        for entry in entries:
            self.entries[entry.index] = entry
        self.stable = min(self.stable, first - 1)

    def new_entries(self, first: int, shapes: list[int | None], bump: int) -> list[Entry]:
        self.max_term += bump
        return [make_entry(first + i, self.max_term, shape) for i, shape in enumerate(shapes)]

    # --- rules ---

    @rule(data=st.data(), shapes=entry_shapes, bump=st.integers(0, 1))
    def append(self, data: st.DataObject, shapes: list[int | None], bump: int) -> None:
        low = max(self.committed, self.offset) + 1
        first = data.draw(st.integers(low, self.last_index + 1), label="first")
        entries = self.new_entries(first, shapes, bump if first > self.last_index else 1)
        self.log.append(entries)
        self.replace_from(entries)

    @rule(data=st.data(), shapes=entry_shapes)
    def maybe_append(self, data: st.DataObject, shapes: list[int | None]) -> None:
        # A leader's log: ours up to some point at or after our commit index, then entries of a newer term.
        keep = data.draw(st.integers(self.committed, self.last_index), label="keep")
        leader = {i: e for i, e in {**self.history, **self.entries}.items() if i <= keep}
        for entry in self.new_entries(keep + 1, shapes, 1):
            leader[entry.index] = entry
        leader_last = max(leader, default=0)
        prev = data.draw(st.integers(max(0, self.offset - 2), leader_last), label="prev")
        count = data.draw(st.integers(0, leader_last - prev), label="count")
        sent = [leader[i] for i in range(prev + 1, prev + count + 1)]
        prev_term = leader[prev].term if prev in leader else (self.offset_term if prev == self.offset else 0)
        if prev < self.offset and prev not in leader:
            return  # the leader would have sent a snapshot
        leader_commit = data.draw(st.integers(0, leader_last), label="leader_commit")

        result = self.log.maybe_append(prev, prev_term, leader_commit, sent)

        if prev < self.offset:
            sent = [e for e in sent if e.index > self.offset]
            if not sent:
                assert result == prev + count
                return
            prev, prev_term = self.offset, self.offset_term
        if self.model_term(prev) != prev_term:
            assert result is None
            return
        last_new = prev + len(sent)
        assert result == last_new
        conflict = next((e for e in sent if self.model_term(e.index) != e.term), None)
        if conflict is not None:
            self.replace_from([e for e in sent if e.index >= conflict.index])
        self.commit_model(min(leader_commit, last_new))

    def commit_model(self, index: int) -> None:
        if index > self.committed:
            self.committed = index
        for i in range(1, self.committed + 1):
            if i in self.entries:
                self.history[i] = self.entries[i]

    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(self.committed, self.last_index), label="commit")
        self.log.commit_to(index)
        self.commit_model(index)

    @rule(data=st.data())
    def apply(self, data: st.DataObject) -> None:
        # The driver applies an entry only after persisting it (it advances the core after both).
        highest = max(self.applied, min(self.committed, self.stable))
        self.applied = data.draw(st.integers(self.applied, highest), label="applied")
        self.log.applied = self.applied

    @rule()
    def persist(self) -> None:
        self.log.stable_to(self.log.last_index, self.log.last_term)
        self.stable = self.last_index

    @precondition(lambda self: self.applied > self.offset)
    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(self.offset + 1, self.applied), label="compact")
        self.log.compact(index)
        self.base_membership = self.model_membership_at(index)
        self.offset, self.offset_term = index, self.entries[index].term
        self.entries = {i: e for i, e in self.entries.items() if i > index}

    @rule(data=st.data(), membership=st.sampled_from(MEMBERSHIPS), matching=st.booleans())
    def restore(self, data: st.DataObject, membership: Membership, matching: bool) -> None:
        index = data.draw(st.integers(self.committed + 1, self.last_index + 3), label="snapshot")
        term = self.model_term(index)
        if not matching or term is None:
            self.max_term += 1
            term = self.max_term
        kept = self.log.restore(SnapshotMeta(index, term, membership))
        assert kept == (self.model_term(index) == term)
        # The leader's log up to the snapshot: ours where it matched, otherwise entries of the snapshot's term.
        for i in range(self.committed + 1, index + 1):
            self.history[i] = self.entries[i] if kept else make_entry(i, term, None)
        if kept:
            self.stable = max(self.stable, index)
            self.entries = {i: e for i, e in self.entries.items() if i > index}
        else:
            self.stable = index
            self.entries = {}
        self.offset, self.offset_term, self.base_membership = index, term, membership
        self.committed = max(self.committed, index)
        self.applied = max(self.applied, index)

    # --- invariants ---

    @invariant()
    def positions_match(self) -> None:
        log = self.log
        assert (log.offset, log.last_index, log.committed) == (self.offset, self.last_index, self.committed)
        assert log.entries == [self.entries[i] for i in sorted(self.entries)]
        assert log.last_term == (self.model_term(self.last_index) or 0)
        for index in range(max(0, self.offset - 1), self.last_index + 2):
            assert log.term(index) == self.model_term(index)

    @invariant()
    def membership_matches(self) -> None:
        assert self.log.membership == self.model_membership_at(self.last_index)
        for index in range(self.offset, self.last_index + 1):
            assert self.log.membership_at(index) == self.model_membership_at(index)
        changes = [i for i, e in self.entries.items() if e.membership is not None]
        assert self.log.membership_index == max(changes, default=self.offset)

    @invariant()
    def unstable_entries_are_those_after_the_stable_index(self) -> None:
        assert self.log.unstable_entries() == [self.entries[i] for i in sorted(self.entries) if i > self.stable]


RaftLogMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestRaftLog = RaftLogMachine.TestCase

# Without shrinking or the example database: only whether the model notices at all.
FIND_ONLY = settings(max_examples=200, stateful_step_count=25, deadline=None, phases=[Phase.generate], database=None)


def test_log_model_catches_a_follower_that_truncates_without_a_conflict(monkeypatch: pytest.MonkeyPatch) -> None:
    # A planted bug: a stale AppendEntries (a prefix of what the follower has) truncates the suffix.
    original = RaftLog.find_conflict

    def always_conflicts(self: RaftLog, entries: Sequence[Entry]) -> int:
        return original(self, entries) or (entries[0].index if entries else 0)

    monkeypatch.setattr(RaftLog, "find_conflict", always_conflicts)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(RaftLogMachine, settings=FIND_ONLY)


# --- MemoryStorage -------------------------------------------------------------------------------------------


def run(function: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
    return trio.run(functools.partial(function, *args, **kwargs))


Op = tuple[str, Any]


class StorageModel:
    """A member's disk as the storage contract describes it: a hard state, a snapshot and entries by index."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.snapshot: Snapshot | None = None
        self.entries: dict[int, Entry] = {}

    def copy(self) -> StorageModel:
        other = StorageModel()
        other.hard_state, other.snapshot, other.entries = self.hard_state, self.snapshot, dict(self.entries)
        return other

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.meta.index if self.snapshot is not None else 0

    @property
    def last_index(self) -> int:
        return max(self.entries, default=self.snapshot_index)

    def apply(self, op: Op) -> None:
        kind, value = op
        if kind == "hard_state":
            self.hard_state = value
        elif kind == "entries":
            first = value[0].index
            self.entries = {i: e for i, e in self.entries.items() if i < first}
            self.entries.update({e.index: e for e in value if e.index > self.snapshot_index})
        else:
            snapshot, discard_log = value
            self.snapshot = snapshot
            self.entries = {} if discard_log else {i: e for i, e in self.entries.items() if i > snapshot.meta.index}


class MemoryStorageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.storage = MemoryStorage()
        self.durable = StorageModel()
        self.pending: list[Op] = []
        self.term = 1

    def visible(self) -> StorageModel:
        state = self.durable.copy()
        for op in self.pending:
            state.apply(op)
        return state

    def sync(self) -> None:
        for op in self.pending:
            self.durable.apply(op)
        self.pending = []

    @rule(
        data=st.data(),
        count=st.integers(0, 4),
        with_hard_state=st.booleans(),
        sync=st.booleans(),
        bump=st.integers(0, 1),
    )
    def save(self, data: st.DataObject, count: int, with_hard_state: bool, sync: bool, bump: int) -> None:
        visible = self.visible()
        self.term += bump
        first = data.draw(st.integers(visible.snapshot_index + 1, visible.last_index + 1), label="first")
        entries = [
            Entry(self.term, first + i, EntryKind.NORMAL, f"{first + i}@{self.term}".encode()) for i in range(count)
        ]
        hard_state = HardState(self.term, "a", visible.snapshot_index) if with_hard_state else None
        run(self.storage.save, hard_state, entries, sync=sync)
        if hard_state is not None:
            self.pending.append(("hard_state", hard_state))
        if entries:
            self.pending.append(("entries", tuple(entries)))
        if sync:
            self.sync()

    @rule(data=st.data(), discard_log=st.booleans())
    def save_snapshot(self, data: st.DataObject, discard_log: bool) -> None:
        visible = self.visible()
        index = data.draw(st.integers(visible.snapshot_index + 1, visible.last_index + 2), label="snapshot")
        entry = visible.entries.get(index)
        meta = SnapshotMeta(index, entry.term if entry is not None else self.term, MEMBERSHIPS[2])
        snapshot = Snapshot(meta, f"state@{index}".encode())
        run(self.storage.save_snapshot, snapshot, discard_log=discard_log)
        self.pending.append(("snapshot", (snapshot, discard_log)))
        self.sync()

    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        keep = data.draw(st.integers(0, len(self.pending)), label="keep_pending")
        self.storage.crash(keep_pending=keep)
        for op in self.pending[:keep]:
            self.durable.apply(op)
        self.pending = []

    @invariant()
    def load_returns_what_was_written(self) -> None:
        expected = self.visible()
        loaded = run(self.storage.load)
        assert loaded.hard_state == expected.hard_state
        assert loaded.snapshot == expected.snapshot
        assert list(loaded.entries) == [expected.entries[i] for i in sorted(expected.entries)]
        assert self.storage.pending_writes == len(self.pending)

    @invariant()
    def stored_log_is_contiguous_after_the_snapshot(self) -> None:
        loaded = run(self.storage.load)
        first = (loaded.snapshot.meta.index if loaded.snapshot is not None else 0) + 1
        assert [e.index for e in loaded.entries] == list(range(first, first + len(loaded.entries)))


MemoryStorageMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=20, deadline=None)
TestMemoryStorage = MemoryStorageMachine.TestCase


def test_storage_model_catches_a_crash_that_keeps_unsynced_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    # A planted bug: a crash loses nothing, as if every write had been synced.
    monkeypatch.setattr(MemoryStorage, "crash", lambda self, keep_pending=0: None)
    with pytest.raises(AssertionError):
        run_state_machine_as_test(MemoryStorageMachine, settings=FIND_ONLY)


async def test_synced_writes_survive_a_crash_and_unsynced_ones_do_not() -> None:
    storage = MemoryStorage()
    first = [Entry(1, 1, EntryKind.NORMAL, b"a"), Entry(1, 2, EntryKind.NORMAL, b"b")]
    await storage.save(HardState(1, "a", 1), first)
    await storage.save(HardState(2, "b", 2), [Entry(2, 3, EntryKind.NORMAL, b"c")], sync=False)
    assert len((await storage.load()).entries) == 3  # a restart without a crash sees the OS's buffers
    storage.crash()
    state = await storage.load()
    assert state.hard_state == HardState(1, "a", 1) and list(state.entries) == first


async def test_a_torn_write_keeps_a_prefix_of_the_pending_writes() -> None:
    storage = MemoryStorage()
    await storage.save(HardState(1, None, 0), [], sync=True)
    await storage.save(HardState(2, "a", 0), [Entry(2, 1, EntryKind.NORMAL, b"x")], sync=False)
    storage.crash(keep_pending=1)  # the hard state reached the disk, the entries did not
    state = await storage.load()
    assert state.hard_state == HardState(2, "a", 0) and state.entries == ()


async def test_sync_delay_lets_a_crash_land_between_a_write_and_its_sync() -> None:
    release = trio.Event()

    async def sync_delay() -> None:
        await release.wait()

    storage = MemoryStorage(sync_delay=sync_delay)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(storage.save, HardState(3, "a", 0), [Entry(3, 1, EntryKind.NORMAL, b"x")])
        await trio.testing.wait_all_tasks_blocked()
        assert storage.pending_writes == 2
        storage.crash()
        nursery.cancel_scope.cancel()
    state = await storage.load()
    assert state.hard_state == HardState() and state.entries == ()
