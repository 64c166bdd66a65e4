"""FileStorage keeps what it promised across restarts, torn writes, kill -9 and corruption."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import hypothesis.strategies as st
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from graft_trio.raft import codec, file_storage
from graft_trio.raft.file_storage import FileStorage
from graft_trio.raft.messages import Entry, EntryKind, HardState, Member, Membership, Snapshot, SnapshotMeta
from graft_trio.raft.storage import CorruptStorageError, MemoryStorage, PersistentState, StorageInUseError, open_storage

T = TypeVar("T")
SMALL_SEGMENTS = 4096
TINY_SEGMENTS = 1024


def data_of(index: int, term: int) -> bytes:
    return f"{index}:{term};".encode() * (1 + index % 5)


def make_entries(first: int, last: int, term: int) -> list[Entry]:
    return [Entry(term, index, data=data_of(index, term)) for index in range(first, last + 1)]


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("log-*.seg"))


def log_end(storage: FileStorage) -> tuple[Path, int]:
    """The last segment and where its records end (the rest of the file is preallocated zeros)."""
    files = storage._files
    assert files is not None
    return Path(files.path) / f"log-{files.segments[-1]:016x}.seg", files.size


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0xFF]))


async def reopened(path: Path, segment_size: int = SMALL_SEGMENTS) -> PersistentState:
    storage = FileStorage(path, segment_size=segment_size)
    try:
        return await storage.load()
    finally:
        await storage.close()


# --- the codec --------------------------------------------------------------------------------------

texts = st.text(max_size=8)
memberships = st.builds(
    Membership.of, st.lists(st.builds(Member, texts, texts, st.booleans()), max_size=3, unique_by=lambda m: m.node_id)
)
entries_strategy = st.builds(
    Entry,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.sampled_from(EntryKind),
    st.binary(max_size=64),
    texts,
    st.none() | memberships,
)
hard_states = st.builds(HardState, st.integers(0, 2**64 - 1), st.none() | texts, st.integers(0, 2**64 - 1))


@given(st.none() | hard_states, st.lists(entries_strategy, max_size=4))
def test_codec_round_trips_batches(hard_state: HardState | None, entries: list[Entry]) -> None:
    assert codec.decode_batch(codec.encode_batch(hard_state, entries)) == (hard_state, entries)


@given(st.builds(SnapshotMeta, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), memberships))
def test_codec_round_trips_snapshot_metadata(meta: SnapshotMeta) -> None:
    assert codec.decode_snapshot_meta(codec.encode_snapshot_meta(meta)) == meta


@given(st.none() | hard_states, st.lists(entries_strategy, min_size=1, max_size=3), st.data())
def test_codec_refuses_damaged_bytes_with_codec_error_only(
    hard_state: HardState | None, entries: list[Entry], data: st.DataObject
) -> None:
    blob = bytearray(codec.encode_batch(hard_state, entries))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    else:
        blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
    # A flipped byte inside data may still decode (the record checksum catches that); what must not
    # happen is any other exception escaping recovery.
    with contextlib.suppress(codec.CodecError):
        codec.decode_batch(bytes(blob))


def test_codec_refuses_an_unknown_version() -> None:
    blob = bytearray(codec.encode_batch(None, []))
    blob[0] = codec.FORMAT_VERSION + 1
    with pytest.raises(codec.CodecError, match="version"):
        codec.decode_batch(bytes(blob))


# --- round trips ------------------------------------------------------------------------------------


async def test_round_trip_of_every_field(tmp_path: Path) -> None:
    membership = Membership.of([Member("n2", "127.0.0.1:2", voter=False), Member("n1", "[::1]:1")])
    entries = [
        Entry(1, 1, EntryKind.MEMBERSHIP, membership=membership),
        Entry(1, 2, EntryKind.NOOP),
        Entry(2, 3, data=b"\x00\xff" * 1000, request_id="req-é"),
        Entry(2, 4, data=b""),
    ]
    hard_state = HardState(term=2, vote="n1", commit=3)
    storage = FileStorage(tmp_path / "a" / "b")  # missing parents are created
    assert await storage.load() == PersistentState()
    await storage.save(hard_state, entries)
    await storage.close()
    assert await reopened(tmp_path / "a" / "b", file_storage.SEGMENT_SIZE) == PersistentState(
        hard_state, None, tuple(entries)
    )


async def test_an_empty_vote_is_not_no_vote(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(HardState(term=1, vote=""), [])
    await storage.close()
    assert (await reopened(tmp_path)).hard_state == HardState(term=1, vote="")


async def test_open_storage_picks_file_storage_for_a_path(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path))
    assert isinstance(storage, FileStorage)
    assert isinstance(open_storage(":memory:"), MemoryStorage)


async def test_reopen_after_close_on_the_same_object(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(HardState(term=1), make_entries(1, 5, 1))
    await storage.close()
    await storage.save(HardState(term=2), make_entries(6, 6, 2))  # reopens, running recovery
    state = await storage.load()
    assert [e.index for e in state.entries] == [1, 2, 3, 4, 5, 6]
    assert state.hard_state.term == 2
    await storage.close()


async def test_the_directory_is_locked_while_open(tmp_path: Path) -> None:
    first = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await first.load()
    with pytest.raises(StorageInUseError, match="in use"):
        await FileStorage(tmp_path, segment_size=SMALL_SEGMENTS).load()
    await first.close()
    await reopened(tmp_path)


async def test_malformed_batches_are_refused_and_leave_the_storage_usable(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 3, 1))
    with pytest.raises(ValueError, match="contiguous"):
        await storage.save(None, [Entry(1, 4), Entry(1, 6)])
    with pytest.raises(ValueError, match="log ends at 3"):
        await storage.save(None, make_entries(5, 6, 1))
    await storage.save(None, make_entries(4, 4, 1))
    await storage.close()
    assert [e.index for e in (await reopened(tmp_path)).entries] == [1, 2, 3, 4]


async def test_a_batch_larger_than_a_segment(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 2, 1))
    big = [Entry(1, 3, data=b"b" * 3 * SMALL_SEGMENTS)]
    await storage.save(None, big)
    await storage.save(None, make_entries(4, 5, 1))
    await storage.close()
    assert len(segments(tmp_path)) == 3  # the big batch has a segment of its own
    assert (await reopened(tmp_path)).entries == (*make_entries(1, 2, 1), *big, *make_entries(4, 5, 1))


async def test_after_a_failed_fsync_the_storage_refuses_until_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 2, 1))

    def failing_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(file_storage, "_sync_file", failing_sync)
    with pytest.raises(OSError, match="Input/output"):
        await storage.save(None, make_entries(3, 3, 1))
    monkeypatch.undo()
    # The kernel may have dropped the pages that failed: a retried fsync could succeed and lie.
    with pytest.raises(RuntimeError, match="earlier write failed"):
        await storage.save(None, make_entries(3, 3, 1))
    await storage.close()
    assert [e.index for e in (await storage.load()).entries] in ([1, 2], [1, 2, 3])
    await storage.close()


# --- truncation ---------------------------------------------------------------------------------------


async def test_a_batch_replaces_the_conflicting_suffix(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 10, 1))
    await storage.save(None, make_entries(6, 8, 2))
    expected = (*make_entries(1, 5, 1), *make_entries(6, 8, 2))
    assert (await storage.load()).entries == expected
    await storage.close()
    assert (await reopened(tmp_path)).entries == expected


async def test_truncation_reaching_back_into_earlier_segments(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    for first in range(1, 300, 10):
        await storage.save(None, make_entries(first, first + 9, 1))
    assert len(segments(tmp_path)) > 3
    await storage.save(HardState(term=2), make_entries(15, 20, 2))
    await storage.save(None, make_entries(21, 22, 2))
    await storage.close()
    state = await reopened(tmp_path)
    assert state.entries == (*make_entries(1, 14, 1), *make_entries(15, 22, 2))


# --- snapshots and compaction ----------------------------------------------------------------------


async def test_snapshot_drops_covered_entries_and_whole_segments(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    for first in range(1, 300, 10):
        await storage.save(HardState(term=1, commit=first), make_entries(first, first + 9, 1))
    before = segments(tmp_path)
    snapshot = Snapshot(SnapshotMeta(250, 1, Membership.of([Member("n1", "a")])), b"state at 250")
    await storage.save_snapshot(snapshot, discard_log=False)
    after = segments(tmp_path)
    assert after == before[-len(after) :] and len(after) < len(before) / 2
    await storage.save(None, make_entries(301, 305, 1))
    await storage.close()
    state = await reopened(tmp_path)
    assert state.snapshot == snapshot
    assert state.entries == tuple(make_entries(251, 305, 1))
    assert state.hard_state == HardState(term=1, commit=291)  # outlived the segments that held it
    assert [p.name for p in tmp_path.glob("snapshot-*")] == ["snapshot-0000000000000001.snap"]


async def test_snapshot_with_discard_log_drops_every_entry(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(HardState(term=3, vote="n2"), make_entries(1, 80, 1))
    snapshot = Snapshot(SnapshotMeta(50, 2), b"leader's state")  # conflicts with our entry 50
    await storage.save_snapshot(snapshot, discard_log=True)
    assert len(segments(tmp_path)) == 1
    assert await storage.load() == PersistentState(HardState(term=3, vote="n2"), snapshot, ())
    await storage.save(None, make_entries(51, 52, 3))
    await storage.close()
    assert await reopened(tmp_path) == PersistentState(
        HardState(term=3, vote="n2"), snapshot, tuple(make_entries(51, 52, 3))
    )


async def test_snapshot_ahead_of_the_log_then_appending_after_it(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 10, 1))
    await storage.save_snapshot(Snapshot(SnapshotMeta(40, 2), b"s1"), discard_log=False)
    await storage.save(None, make_entries(41, 60, 2))
    # A second snapshot replaces the first, whose position in the log is then forgotten: replay must
    # still get from entries 1..10 to 41.. (across the gap the first snapshot explained).
    await storage.save_snapshot(Snapshot(SnapshotMeta(45, 2), b"s2"), discard_log=False)
    await storage.close()
    state = await reopened(tmp_path)
    assert state.snapshot == Snapshot(SnapshotMeta(45, 2), b"s2")
    assert state.entries == tuple(make_entries(46, 60, 2))


async def test_an_older_snapshot_needs_discard_log(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 10, 1))
    await storage.save_snapshot(Snapshot(SnapshotMeta(8, 1), b""), discard_log=False)
    with pytest.raises(ValueError, match="older"):
        await storage.save_snapshot(Snapshot(SnapshotMeta(5, 1), b""), discard_log=False)
    await storage.save_snapshot(Snapshot(SnapshotMeta(5, 1), b"old"), discard_log=True)
    await storage.close()
    assert await reopened(tmp_path) == PersistentState(snapshot=Snapshot(SnapshotMeta(5, 1), b"old"))


async def test_leftovers_of_an_interrupted_snapshot_are_cleaned_up(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 10, 1))
    await storage.save_snapshot(Snapshot(SnapshotMeta(5, 1), b"kept"), discard_log=False)
    await storage.close()
    (tmp_path / "snapshot-0000000000000002.snap.tmp").write_bytes(b"half a snapsh")
    (tmp_path / "log-0000000000000002.seg.tmp").write_bytes(b"half a segm")
    state = await reopened(tmp_path)
    assert state.snapshot == Snapshot(SnapshotMeta(5, 1), b"kept")
    assert state.entries == tuple(make_entries(6, 10, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "LOCK",
        "log-0000000000000001.seg",
        "snapshot-0000000000000001.snap",
    ]


# --- torn tails -----------------------------------------------------------------------------------


async def write_batches(path: Path, count: int, *, sync: bool = True) -> list[int]:
    """Write `count` batches of 3 entries; return where the last segment's records end after each."""
    sizes = []
    storage = FileStorage(path, segment_size=SMALL_SEGMENTS)
    for batch in range(count):
        await storage.save(
            HardState(term=1, commit=3 * batch), make_entries(3 * batch + 1, 3 * batch + 3, 1), sync=sync
        )
        sizes.append(log_end(storage)[1])
    await storage.close()
    return sizes


@pytest.mark.parametrize("chop", [1, 10, 40, "all but one"])
async def test_torn_tail_chopped_loses_only_the_last_batch(tmp_path: Path, chop: int | str) -> None:
    sizes = await write_batches(tmp_path, 5)
    last_segment = segments(tmp_path)[-1]
    keep = sizes[3] + 1 if chop == "all but one" else sizes[4] - int(chop)
    os.truncate(last_segment, keep)
    state = await reopened(tmp_path)
    assert state.entries == tuple(make_entries(1, 12, 1))
    assert state.hard_state == HardState(term=1, commit=9)
    assert last_segment.read_bytes()[sizes[3] :].strip(b"\0") == b""  # the tail was cleared for good
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(13, 14, 2))
    await storage.close()
    assert (await reopened(tmp_path)).entries == (*make_entries(1, 12, 1), *make_entries(13, 14, 2))


@pytest.mark.parametrize("where", ["header", "payload", "last byte"])
async def test_torn_tail_garbled_loses_only_the_last_batch(tmp_path: Path, where: str) -> None:
    sizes = await write_batches(tmp_path, 5)
    offset = {"header": sizes[3] + 2, "payload": sizes[3] + 40, "last byte": sizes[4] - 1}[where]
    flip_byte(segments(tmp_path)[-1], offset)
    assert (await reopened(tmp_path)).entries == tuple(make_entries(1, 12, 1))


async def test_torn_tail_of_a_fresh_segment(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    last = 0
    while len(segments(tmp_path)) < 2:  # until a batch begins the second segment
        await storage.save(None, make_entries(last + 1, last + 3, 1))
        last += 3
    last_segment, end = log_end(storage)
    await storage.close()
    assert last_segment == segments(tmp_path)[1]
    os.truncate(last_segment, end - 5)
    state = await reopened(tmp_path)
    assert state.entries == tuple(make_entries(1, last - 3, 1))


async def test_unsynced_batches_after_a_torn_one_are_dropped_with_it(tmp_path: Path) -> None:
    """After power loss, pages written back out of order can leave intact unsynced batches after a torn one."""
    sizes = await write_batches(tmp_path, 6, sync=False)
    flip_byte(segments(tmp_path)[-1], sizes[2] + 40)  # batch 4 of 6 torn, batches 5 and 6 intact
    assert (await reopened(tmp_path)).entries == tuple(make_entries(1, 9, 1))


# --- corruption -----------------------------------------------------------------------------------


def offset_in(error: pytest.ExceptionInfo[CorruptStorageError]) -> tuple[str, int]:
    match = re.search(r"^(\S+): .*? at byte offset (\d+)", str(error.value))
    assert match, str(error.value)
    return match[1], int(match[2])


@pytest.mark.parametrize("where", [2, 20, 40])
async def test_corruption_before_the_tail_refuses_to_start(tmp_path: Path, where: int) -> None:
    sizes = await write_batches(tmp_path, 5)
    segment = segments(tmp_path)[-1]
    flip_byte(segment, sizes[1] + where)  # inside batch 3, which batches 4 and 5 followed after its fsync
    damaged = segment.read_bytes()
    with pytest.raises(CorruptStorageError) as error:
        await reopened(tmp_path)
    assert offset_in(error) == (str(segment), sizes[1])
    assert segment.read_bytes() == damaged  # nothing was cut


async def test_corruption_in_an_earlier_segment_refuses_to_start(tmp_path: Path) -> None:
    await write_batches(tmp_path, 40)
    first = segments(tmp_path)[0]
    flip_byte(first, first.stat().st_size - 1)  # its last byte: a tail, but not of the last segment
    with pytest.raises(CorruptStorageError) as error:
        await reopened(tmp_path)
    assert offset_in(error)[0] == str(first)


async def test_corruption_of_the_only_synced_record_the_snapshot_vouches_for(tmp_path: Path) -> None:
    sizes = await write_batches(tmp_path, 3)
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save_snapshot(Snapshot(SnapshotMeta(2, 1), b"s"), discard_log=False)
    await storage.close()
    flip_byte(segments(tmp_path)[-1], sizes[2] - 1)  # the last record, fsynced before the snapshot
    with pytest.raises(CorruptStorageError, match=f"at byte offset {sizes[1]}"):
        await reopened(tmp_path)


async def test_missing_segment_refuses_to_start(tmp_path: Path) -> None:
    await write_batches(tmp_path, 100)
    assert len(segments(tmp_path)) > 2
    missing = segments(tmp_path)[1]
    missing.unlink()
    with pytest.raises(CorruptStorageError, match=re.escape(str(missing))):
        await reopened(tmp_path)


@pytest.mark.parametrize("where", [3, 60, -1])
async def test_corrupt_snapshot_refuses_to_start(tmp_path: Path, where: int) -> None:
    storage = FileStorage(tmp_path, segment_size=SMALL_SEGMENTS)
    await storage.save(None, make_entries(1, 10, 1))
    await storage.save_snapshot(Snapshot(SnapshotMeta(5, 1), b"x" * 100), discard_log=False)
    await storage.close()
    snapshot = next(tmp_path.glob("snapshot-*"))
    flip_byte(snapshot, where % snapshot.stat().st_size)
    with pytest.raises(CorruptStorageError) as error:
        await reopened(tmp_path)
    assert offset_in(error)[0] == str(snapshot)


# --- the crash model, checked by hypothesis --------------------------------------------------------


def run(function: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await function()

    return trio.run(main)


def last_index(state: PersistentState) -> int:
    if state.entries:
        return state.entries[-1].index
    return state.snapshot.meta.index if state.snapshot else 0


class FileStorageMachine(RuleBasedStateMachine):
    """FileStorage against MemoryStorage (the reference crash model), through crashes and torn writes."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        root.mkdir(exist_ok=True)
        self.path = root / f"machine-{len(list(root.iterdir()))}"
        self.model = MemoryStorage()
        self.storage = FileStorage(self.path, segment_size=TINY_SEGMENTS)
        self.synced_tail: tuple[Path, int] | None = None  # the last segment and its size, when all was synced

    @initialize(count=st.integers(0, 60), size=st.sampled_from([10, 300, 1500]))
    def open(self, count: int, size: int) -> None:
        """Start from a log of `count` entries, often spread over several segments."""
        assert run(self.storage.load) == PersistentState()
        entries = [Entry(1, i, data=b"i" * size) for i in range(1, count + 1)]
        self.both(lambda storage: storage.save(HardState(term=1), entries))
        self.synced_tail = self.tail()

    def tail(self) -> tuple[Path, int]:
        return log_end(self.storage)

    def after_write(self, synced: bool) -> None:
        if synced:
            self.synced_tail = self.tail()
        elif self.synced_tail is not None and self.tail()[0] != self.synced_tail[0]:
            # A new segment began (which fsynced the old one); what is unsynced in it is unknown here.
            self.synced_tail = None

    def both(self, call: Callable[[Any], Awaitable[None]]) -> None:
        run(functools.partial(call, self.storage))
        run(functools.partial(call, self.model))

    @rule(
        back=st.integers(0, 6),
        count=st.integers(0, 8),
        term=st.integers(1, 4),
        size=st.sampled_from([0, 20, 300, 1500]),
        hard_state=st.none()
        | st.builds(HardState, st.integers(0, 9), st.sampled_from([None, "n1"]), st.integers(0, 50)),
        sync=st.booleans(),
    )
    def save(self, back: int, count: int, term: int, size: int, hard_state: HardState | None, sync: bool) -> None:
        first = max(1, last_index(run(self.model.load)) + 1 - back)
        entries = [Entry(term, i, data=bytes([i % 256]) * size) for i in range(first, first + count)]
        self.both(lambda storage: storage.save(hard_state, entries, sync=sync))
        self.after_write(sync)

    @rule(back=st.integers(0, 30), ahead=st.integers(0, 3), discard_log=st.sampled_from([False, False, True]))
    def snapshot(self, back: int, ahead: int, discard_log: bool) -> None:
        state = run(self.model.load)
        stored = state.snapshot.meta.index if state.snapshot else 0
        index = max(0 if discard_log else stored, last_index(state) - back) + ahead
        snapshot = Snapshot(SnapshotMeta(index, 1, Membership.of([Member("n1", "a")])), b"%d" % index)
        self.both(lambda storage: storage.save_snapshot(snapshot, discard_log=discard_log))
        self.after_write(True)

    @rule(tear=st.none() | st.tuples(st.sampled_from(["cut", "flip"]), st.integers(0, 10**6)))
    def crash(self, tear: tuple[str, int] | None) -> None:
        """Stop without another write (kill -9), maybe tearing what was not synced (power loss)."""
        segment_now, size = self.tail()
        run(self.storage.close)
        torn = False
        if tear is not None and self.synced_tail is not None and self.model.pending_writes:
            segment, synced_size = self.synced_tail
            if segment_now == segment and size > synced_size:
                how, where = tear
                offset = synced_size + where % (size - synced_size)
                if how == "cut":
                    os.truncate(segment, offset)
                else:
                    flip_byte(segment, offset)
                torn = True
        self.storage = FileStorage(self.path, segment_size=TINY_SEGMENTS)
        recovered = run(self.storage.load)
        if not torn:
            assert recovered == run(self.model.load)  # a kill loses nothing the kernel was given
        else:
            # Everything synced is there, plus some prefix of the unsynced writes.
            candidates = []
            for kept in range(self.model.pending_writes + 1):
                candidate = copy.deepcopy(self.model)
                candidate.crash(keep_pending=kept)
                candidates.append(candidate)
            matches = [c for c in candidates if run(c.load) == recovered]
            assert matches, f"recovered {recovered} is no prefix of the unsynced writes"
            self.model = matches[-1]
        self.model.crash(keep_pending=self.model.pending_writes)  # now all durable
        self.synced_tail = self.tail()

    def teardown(self) -> None:
        run(self.storage.close)


STATE_MACHINE_SETTINGS = settings(
    max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def machine_in(root: Path) -> type[FileStorageMachine]:
    class Machine(FileStorageMachine):
        def __init__(self) -> None:
            super().__init__(root)

    return Machine


def test_file_storage_matches_the_crash_model(tmp_path: Path) -> None:
    run_state_machine_as_test(machine_in(tmp_path), settings=STATE_MACHINE_SETTINGS)


def test_the_crash_model_check_catches_a_planted_bug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Compaction that deletes one segment too many: live entries (or the hard state) vanish on reopen.
    delete_dead_segments = file_storage._Files._delete_dead_segments

    def delete_too_much(self: file_storage._Files, *, sync_directory: bool = False) -> None:
        delete_dead_segments(self, sync_directory=sync_directory)
        if len(self.segments) > 1:
            os.unlink(self._segment_path(self.segments.pop(0)))

    monkeypatch.setattr(file_storage._Files, "_delete_dead_segments", delete_too_much)
    with pytest.raises((AssertionError, CorruptStorageError)):
        run_state_machine_as_test(
            machine_in(tmp_path),
            settings=settings(
                STATE_MACHINE_SETTINGS, max_examples=200, phases=[Phase.generate], database=None, derandomize=True
            ),
        )


# --- kill -9 ------------------------------------------------------------------------------------------

WRITER = """
import sys, trio
from graft_trio.raft.file_storage import FileStorage
from graft_trio.raft.messages import Entry, HardState, Snapshot, SnapshotMeta
from graft_trio.raft import codec, file_storage
from tests.test_file_storage import data_of

def announced_sync(fd, sync=file_storage._sync_file):
    print("F", flush=True)
    sync(fd)

file_storage._sync_file = announced_sync

async def main(path, round_number):
    storage = FileStorage(path, segment_size=8192)
    state = await storage.load()
    snapshot_index = state.snapshot.meta.index if state.snapshot else 0
    last = state.entries[-1].index if state.entries else snapshot_index
    batch = 0
    while True:
        batch += 1
        term = round_number * 1000 + batch
        if batch % 25 == 0 and last - 5 > snapshot_index:
            snapshot_index = last - 5
            print(f"S {snapshot_index} {term}", flush=True)
            snapshot = Snapshot(SnapshotMeta(snapshot_index, term), data_of(snapshot_index, term))
            await storage.save_snapshot(snapshot, discard_log=False)
        else:
            first = max(snapshot_index + 1, last - 2) if batch % 5 == 0 else last + 1
            last = first + batch % 8
            print(f"W {first} {last} {term}", flush=True)
            entries = [Entry(term, i, data=data_of(i, term)) for i in range(first, last + 1)]
            await storage.save(HardState(term=term, vote="n1", commit=first - 1), entries)
        print("A", flush=True)

trio.run(main, sys.argv[1], int(sys.argv[2]))
"""


class KillModel:
    """What the writer has been told is durable: entry index -> term, the snapshot and the last term."""

    def __init__(self) -> None:
        self.terms: dict[int, int] = {}
        self.snapshot: tuple[int, int] | None = None
        self.hard_term = 0

    def apply(self, operation: list[str]) -> KillModel:
        after = copy.deepcopy(self)
        if operation[0] == "W":
            first, last, term = map(int, operation[1:])
            after.terms = {i: t for i, t in self.terms.items() if i < first} | dict.fromkeys(
                range(first, last + 1), term
            )
            after.hard_term = term
        else:
            index, term = map(int, operation[1:])
            after.terms = {i: t for i, t in self.terms.items() if i > index}
            after.snapshot = (index, term)
        return after

    def matches(self, state: PersistentState) -> bool:
        snapshot = None
        if state.snapshot is not None:
            meta = state.snapshot.meta
            assert state.snapshot.data == data_of(meta.index, meta.term)
            snapshot = (meta.index, meta.term)
        for entry in state.entries:
            assert entry.data == data_of(entry.index, entry.term)
        terms = {entry.index: entry.term for entry in state.entries}
        return (terms, snapshot, state.hard_state.term) == (self.terms, self.snapshot, self.hard_term)


async def lines_of(stream: trio.abc.ReceiveStream) -> AsyncIterator[str]:
    buffer = b""
    while chunk := await stream.receive_some():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode()


async def aenumerate(iterator: AsyncIterator[T], start: int) -> AsyncIterator[tuple[int, T]]:
    number = start
    async for item in iterator:
        yield number, item
        number += 1


async def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    root = Path(__file__).resolve().parent.parent
    acknowledged = KillModel()
    with trio.fail_after(60):
        for round_number in range(1, 6):
            stderr = (tmp_path / f"stderr-{round_number}").open("wb")
            process = await trio.lowlevel.open_process(
                [sys.executable, "-c", WRITER, str(data), str(round_number)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                cwd=root,
            )
            assert process.stdout is not None
            pending: list[str] | None = None
            # Kill after an fsync started (the write is in the page cache), after an acknowledgement,
            # or after a write was announced (it is usually still on its way to the worker thread).
            kill_on = "FAWFA"[round_number - 1]
            async for line_number, line in aenumerate(lines_of(process.stdout), start=1):
                if line == "A":
                    assert pending is not None
                    acknowledged, pending = acknowledged.apply(pending), None
                elif line != "F":
                    pending = line.split()
                if line_number >= 30 * round_number and line.split()[0] == kill_on and process.returncode is None:
                    process.send_signal(signal.SIGKILL)  # and read on: acks already in the pipe count
                    await process.wait()
            await process.wait()
            stderr.close()
            assert process.returncode == -signal.SIGKILL, (tmp_path / f"stderr-{round_number}").read_text()
            state = await reopened(data)
            allowed = [acknowledged] if pending is None else [acknowledged, acknowledged.apply(pending)]
            assert any(model.matches(state) for model in allowed), (pending, state)
            if pending is not None and allowed[1].matches(state):
                acknowledged = allowed[1]
