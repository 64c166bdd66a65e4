"""Durable Raft storage on local disk: one member's hard state, log and snapshot, in one directory.

The directory holds a segmented append-only log and at most one snapshot file (docs/STORAGE.md has the
byte layout, every crash point and the measurement that chose this design over SQLite):

* ``log-<seq>.seg``: segments of about `segment_size` bytes. A segment is a checksummed header and a
  sequence of records; a record is a checksummed header and a payload, one `save` call each (a batch of
  an optional hard state and entries, encoded by `graft_trio.raft.codec`), so a batch is all or nothing
  and costs one write and one fsync. The segment being written is preallocated (zeros after its last
  record); the others end at their last record. The hard state lives in the log too: every segment
  starts with a record of the hard state at its creation, so deleting older segments never loses it.
* ``snapshot-<generation>.snap``: written to a temporary file, fsynced and renamed into place. It records
  the log position at which it was installed, so that recovery applies it at exactly that point of the
  log (dropping entries it covers, or all of them when the log was discarded).

Recovery reads every file and verifies every checksum. The only damage it repairs is a torn tail: the
unfinished end of the last segment, which it cuts off. Damage anywhere else is data that was durable and
raises `CorruptStorageError` naming the file and byte offset. It tells the two apart because each record
carries the offset up to which its segment had been fsynced when it was written: damage before an offset
that a later record (or the snapshot) vouches for was durable is corruption, not a torn write.

POSIX only: the directory is locked with flock while open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import sys
import zlib
from collections.abc import Callable, Sequence

import attrs
import trio

from graft_trio.raft import codec
from graft_trio.raft.messages import Entry, HardState, Snapshot
from graft_trio.raft.storage import CorruptStorageError, PersistentState, Storage, StorageInUseError

SEGMENT_SIZE = 64 * 1024 * 1024

_FILE_VERSION = 1
_SEGMENT_MAGIC = b"GRAFTLOG"
_SNAPSHOT_MAGIC = b"GRAFTSNP"
# Chosen to be unlikely in entry data: recovery searches for it to resynchronise after a damaged record.
_RECORD_MAGIC = b"\x8bGRc"
_RECORD_BATCH = 1

_SEGMENT_HEADER = struct.Struct("<8sHHQ")  # magic, version, reserved, seq; then crc32 of these
# magic, type, 3 reserved bytes, payload length, synced_through, payload crc32; then a crc32 of these
# bytes and of the record's own position, so that a copy of a record found anywhere else is not valid.
_RECORD_HEADER = struct.Struct("<4sB3xIQI")
# magic, version, flags, generation, marker segment, marker offset, metadata length, data length;
# then crc32 of these; then metadata, data, and the crc32 of metadata and data.
_SNAPSHOT_HEADER = struct.Struct("<8sHHQQQIQ")
_CRC = struct.Struct("<I")
_POSITION = struct.Struct("<QQ")

_SEGMENT_HEADER_SIZE = _SEGMENT_HEADER.size + _CRC.size
_RECORD_HEADER_SIZE = _RECORD_HEADER.size + _CRC.size
_SNAPSHOT_HEADER_SIZE = _SNAPSHOT_HEADER.size + _CRC.size
_SNAPSHOT_DISCARDS_LOG = 0x01
_MAX_PAYLOAD = 0xFFFF_FFFF

_SEGMENT_NAME = re.compile(r"log-([0-9a-f]{16})\.seg")
_SNAPSHOT_NAME = re.compile(r"snapshot-([0-9a-f]{16})\.snap")
_LOCK_NAME = "LOCK"


def _segment_name(seq: int) -> str:
    return f"log-{seq:016x}.seg"


def _snapshot_name(generation: int) -> str:
    return f"snapshot-{generation:016x}.snap"


class FileStorage(Storage):
    """`Storage` in the directory `path` (created if missing), durable across kill -9 and power loss.

    Every call makes one hop to a worker thread, so the event loop never waits on the disk. A call that
    is cancelled while its thread runs still completes its write before the cancellation is delivered,
    so the files and this object never disagree. If a write or fsync fails, the storage refuses every
    later call (the kernel may have dropped the dirty pages, so retrying the fsync would lie); recover by
    reopening. `close` does not fsync: only ``sync=True`` writes and snapshots are promised durable.

    One process at a time: the directory is locked while open.
    """

    def __init__(self, path: str | os.PathLike[str], *, segment_size: int = SEGMENT_SIZE) -> None:
        if segment_size <= 0:
            raise ValueError("segment_size must be positive")
        self.path = os.fspath(path)
        self._segment_size = segment_size
        self._files: _Files | None = None
        self._lock = trio.Lock()

    async def load(self) -> PersistentState:
        async with self._lock:
            if self._files is None:
                files = _Files(self.path, self._segment_size)
                state = await trio.to_thread.run_sync(files.open)
                self._files = files
                return state
            return await trio.to_thread.run_sync(_scan_state, self.path)

    async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
        async with self._lock:
            files = await self._opened()
            await trio.to_thread.run_sync(files.save, hard_state, entries, sync)

    async def save_snapshot(self, snapshot: Snapshot, *, discard_log: bool) -> None:
        async with self._lock:
            files = await self._opened()
            await trio.to_thread.run_sync(files.save_snapshot, snapshot, discard_log)

    async def close(self) -> None:
        """Close the files and release the directory; a later call opens it again (running recovery)."""
        async with self._lock:
            if self._files is not None:
                files, self._files = self._files, None
                await trio.to_thread.run_sync(files.close)

    async def _opened(self) -> _Files:
        if self._files is None:
            files = _Files(self.path, self._segment_size)
            await trio.to_thread.run_sync(files.open)
            self._files = files
        return self._files


# --- the blocking part: everything below runs in a worker thread -------------------------------------


@attrs.define
class _Run:
    """Consecutive live entries stored in one segment (the log is ordered by index and by position)."""

    segment: int
    first: int
    last: int


class _Files:
    """The open directory: the segment being appended to and what the live log looks like on disk."""

    def __init__(self, path: str, segment_size: int) -> None:
        self.path = path
        self.segment_size = segment_size
        self.directory_fd = -1
        self.lock_fd = -1
        self.segment_fd = -1
        self.segments: list[int] = []  # sequence numbers, oldest first, contiguous
        self.size = 0  # bytes in the last segment
        self.synced_through = 0  # bytes of the last segment known durable
        self.head_end = 0  # end of the last segment's first record (the hard state it was created with)
        self.hard_state = HardState()
        self.snapshot_index = 0
        self.snapshot_generation = 0
        self.runs: list[_Run] = []  # where each live entry (after the snapshot) is stored
        self.failure: BaseException | None = None

    # -- opening ---------------------------------------------------------------------------------------

    def open(self) -> PersistentState:
        try:
            _make_directory(self.path)
            self.directory_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            self.lock_fd = os.open(os.path.join(self.path, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StorageInUseError(f"{self.path} is in use by another FileStorage (another member?)") from None
            scan = _scan(self.path)
            self._repair(scan)
        except BaseException:
            self.close()
            raise
        snapshot = scan.snapshot
        return PersistentState(scan.hard_state, snapshot, tuple(scan.entries))

    def _repair(self, scan: _Scan) -> None:
        """Finish what a crash interrupted, then adopt the scanned state."""
        for name in scan.stale_files:
            # Unfinished temporary files and snapshots superseded by a newer one.
            os.unlink(os.path.join(self.path, name))
        self.hard_state = scan.hard_state
        self.snapshot_index = scan.snapshot.meta.index if scan.snapshot else 0
        self.snapshot_generation = scan.snapshot_generation
        self.runs = _runs_of(scan.entries, scan.sources)
        if not scan.segments:
            self._start_segment(1)
            return
        self.segments = list(scan.segments)
        self.segment_fd = os.open(self._segment_path(self.segments[-1]), os.O_RDWR)
        if scan.torn_at is not None:
            # Clear the torn tail before appending after it: left in place, it would sit after records
            # that later syncs vouch for, and read as corruption.
            os.ftruncate(self.segment_fd, scan.torn_at)
            _preallocate(self.segment_fd, self.segment_size)
        # After a kill -9, what was read may still be only in the page cache (as may the renames of the
        # last moments). It is about to be reported as the state and vouched for by the next records,
        # so make it durable now.
        _sync_file(self.segment_fd)
        _sync_directory(self.directory_fd)
        self.size = self.synced_through = scan.last_segment_size
        self.head_end = scan.last_head_end
        self._delete_dead_segments()

    # -- writing ---------------------------------------------------------------------------------------

    def save(self, hard_state: HardState | None, entries: Sequence[Entry], sync: bool) -> None:
        self._check_usable()
        if entries:
            self._check_batch(entries)
        elif hard_state is None:
            if sync:
                self._guarded(self._sync)
            return
        payload = codec.encode_batch(hard_state, entries)
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"a batch of {len(payload)} bytes is larger than a record can hold")

        def write() -> None:
            record_size = _RECORD_HEADER_SIZE + len(payload)
            if self.size > self.head_end and self.size + record_size > self.segment_size:
                self._start_segment(self.segments[-1] + 1)
            self._append_record(payload)
            if hard_state is not None:
                self.hard_state = hard_state
            if entries:
                self._track_entries(entries[0].index, entries[-1].index)
            if sync:
                self._sync()

        self._guarded(write)

    def save_snapshot(self, snapshot: Snapshot, discard_log: bool) -> None:
        self._check_usable()
        if not discard_log and snapshot.meta.index < self.snapshot_index:
            # The log after the stored snapshot would no longer follow the new one.
            raise ValueError(
                f"snapshot at index {snapshot.meta.index} is older than the stored one at "
                f"{self.snapshot_index}; install it with discard_log=True"
            )

        def write() -> None:
            if discard_log:
                # Start a fresh segment: the snapshot applies at its start, and every older segment
                # becomes dead at once (they still hold the hard state until this one is written).
                self._start_segment(self.segments[-1] + 1)
            else:
                # The snapshot vouches for the log up to its marker, so that must be durable first.
                self._sync()
            generation = self.snapshot_generation + 1
            self._write_snapshot_file(snapshot, generation, discard_log)
            old_generation, self.snapshot_generation = self.snapshot_generation, generation
            self.snapshot_index = snapshot.meta.index
            if discard_log:
                self.runs = []
            else:
                self._drop_entries_through(snapshot.meta.index)
            if old_generation:
                os.unlink(os.path.join(self.path, _snapshot_name(old_generation)))
            self._delete_dead_segments(sync_directory=old_generation > 0)

        self._guarded(write)

    def close(self) -> None:
        for fd in (self.segment_fd, self.directory_fd, self.lock_fd):
            if fd >= 0:
                os.close(fd)  # closing the lock file releases the lock
        self.segment_fd = self.directory_fd = self.lock_fd = -1

    def _check_usable(self) -> None:
        if self.failure is not None:
            raise RuntimeError(
                f"{self.path}: an earlier write failed ({self.failure!r}); reopen the storage to recover"
            ) from self.failure
        if self.segment_fd < 0:
            raise RuntimeError(f"{self.path}: storage is closed")

    def _guarded(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as exc:
            # What reached the disk is unknown now; only recovery can tell.
            self.failure = exc
            raise

    def _check_batch(self, entries: Sequence[Entry]) -> None:
        first = entries[0].index
        for offset, entry in enumerate(entries):
            if entry.index != first + offset:
                raise ValueError(f"entries are not contiguous: index {entry.index} at position {offset}")
        last_index = self.runs[-1].last if self.runs else self.snapshot_index
        if not 1 <= first <= last_index + 1:
            raise ValueError(f"entries start at {first}, but the log ends at {last_index}")

    def _append_record(self, payload: bytes) -> None:
        header = _RECORD_HEADER.pack(
            _RECORD_MAGIC, _RECORD_BATCH, len(payload), self.synced_through, zlib.crc32(payload)
        )
        record = b"".join((header, _CRC.pack(_header_crc(header, self.segments[-1], self.size)), payload))
        _write_all(self.segment_fd, record, self.size)
        self.size += len(record)

    def _sync(self) -> None:
        if self.size > self.synced_through:
            _sync_file(self.segment_fd)
            self.synced_through = self.size

    def _start_segment(self, seq: int) -> None:
        """Make segment `seq` the one appended to, creating it whole (header and hard state) or not at all."""
        if self.segment_fd >= 0:
            # Only the last segment may have a torn tail (or a preallocated, unwritten one), so the
            # others end exactly after their last record and are durable before the next one exists.
            os.ftruncate(self.segment_fd, self.size)
            _sync_file(self.segment_fd)
            os.close(self.segment_fd)
            self.segment_fd = -1
        path = self._segment_path(seq)
        temporary = path + ".tmp"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            header = _SEGMENT_HEADER.pack(_SEGMENT_MAGIC, _FILE_VERSION, 0, seq)
            _write_all(fd, header + _CRC.pack(zlib.crc32(header)), 0)
            self.segment_fd, self.size, self.synced_through = fd, _SEGMENT_HEADER_SIZE, _SEGMENT_HEADER_SIZE
            self.segments.append(seq)
            self._append_record(codec.encode_batch(self.hard_state, ()))
            # Appends to a preallocated file change no metadata, so each fsync is one device flush
            # instead of a journal commit too (docs/STORAGE.md has the measurement).
            _preallocate(fd, self.segment_size)
            os.fsync(fd)
            os.replace(temporary, path)
            _sync_directory(self.directory_fd)
        except BaseException:
            if self.segment_fd != fd:
                os.close(fd)
            raise
        self.synced_through = self.head_end = self.size

    def _write_snapshot_file(self, snapshot: Snapshot, generation: int, discard_log: bool) -> None:
        meta = codec.encode_snapshot_meta(snapshot.meta)
        header = _SNAPSHOT_HEADER.pack(
            _SNAPSHOT_MAGIC,
            _FILE_VERSION,
            _SNAPSHOT_DISCARDS_LOG if discard_log else 0,
            generation,
            self.segments[-1],
            self.size,
            len(meta),
            len(snapshot.data),
        )
        path = os.path.join(self.path, _snapshot_name(generation))
        temporary = path + ".tmp"
        with open(temporary, "wb") as file:
            file.write(header)
            file.write(_CRC.pack(zlib.crc32(header)))
            file.write(meta)
            file.write(snapshot.data)
            file.write(_CRC.pack(zlib.crc32(snapshot.data, zlib.crc32(meta))))
            file.flush()
            _sync_file(file.fileno())
        os.replace(temporary, path)
        _sync_directory(self.directory_fd)

    # -- which segments still matter ---------------------------------------------------------------------

    def _track_entries(self, first: int, last: int) -> None:
        """Mirror what replay does with a batch: truncate at `first`, append, drop what a snapshot covers."""
        while self.runs and self.runs[-1].first >= first:
            self.runs.pop()
        if self.runs and self.runs[-1].last >= first:
            self.runs[-1].last = first - 1
        segment = self.segments[-1]
        if self.runs and self.runs[-1].segment == segment:
            self.runs[-1].last = last
        else:
            self.runs.append(_Run(segment, first, last))
        self._drop_entries_through(self.snapshot_index)

    def _drop_entries_through(self, index: int) -> None:
        while self.runs and self.runs[0].last <= index:
            self.runs.pop(0)
        if self.runs and self.runs[0].first <= index:
            self.runs[0].first = index + 1

    def _delete_dead_segments(self, *, sync_directory: bool = False) -> None:
        """Delete the oldest segments that hold no live entry (their hard state is superseded too)."""
        keep_from = self.runs[0].segment if self.runs else self.segments[-1]
        while self.segments[0] < keep_from:
            # Oldest first: a crash part-way leaves a contiguous suffix, which replays the same log.
            os.unlink(self._segment_path(self.segments.pop(0)))
            sync_directory = True
        if sync_directory:
            _sync_directory(self.directory_fd)

    def _segment_path(self, seq: int) -> str:
        return os.path.join(self.path, _segment_name(seq))


def _runs_of(entries: list[Entry], sources: list[int]) -> list[_Run]:
    runs: list[_Run] = []
    for entry, segment in zip(entries, sources, strict=True):
        if runs and runs[-1].segment == segment:
            runs[-1].last = entry.index
        else:
            runs.append(_Run(segment, entry.index, entry.index))
    return runs


# --- reading and verifying a directory ------------------------------------------------------------------


@attrs.define
class _Scan:
    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    snapshot_generation: int = 0
    entries: list[Entry] = attrs.Factory(list)
    sources: list[int] = attrs.Factory(list)  # the segment each entry was read from
    segments: list[int] = attrs.Factory(list)
    last_segment_size: int = 0  # where the last segment's records end (the rest is torn, or zeros)
    last_head_end: int = 0
    torn_at: int | None = None
    stale_files: list[str] = attrs.Factory(list)


@attrs.frozen
class _Record:
    kind: int
    payload: memoryview
    synced_through: int
    end: int


@attrs.frozen
class _SnapshotFile:
    snapshot: Snapshot
    marker: tuple[int, int]  # (segment, offset) of the log position where it was installed
    discards_log: bool


def _scan_state(path: str) -> PersistentState:
    scan = _scan(path)
    return PersistentState(scan.hard_state, scan.snapshot, tuple(scan.entries))


def _scan(path: str) -> _Scan:
    """Read and verify the directory, without changing it."""
    scan = _Scan()
    snapshots: list[int] = []
    for name in os.listdir(path):
        if match := _SEGMENT_NAME.fullmatch(name):
            scan.segments.append(int(match[1], 16))
        elif match := _SNAPSHOT_NAME.fullmatch(name):
            snapshots.append(int(match[1], 16))
        elif name.endswith(".tmp"):
            scan.stale_files.append(name)
    scan.segments.sort()
    snapshots.sort()

    snapshot_file = None
    if snapshots:
        scan.snapshot_generation = snapshots[-1]
        snapshot_file = _read_snapshot(os.path.join(path, _snapshot_name(snapshots[-1])), snapshots[-1])
        scan.snapshot = snapshot_file.snapshot
        scan.stale_files += [_snapshot_name(generation) for generation in snapshots[:-1]]
    if not scan.segments:
        if snapshot_file is not None:
            raise CorruptStorageError(f"{path}: a snapshot but no log segment (the hard state is lost)")
        return scan
    for previous, seq in zip(scan.segments, scan.segments[1:], strict=False):
        if seq != previous + 1:
            raise CorruptStorageError(f"{os.path.join(path, _segment_name(previous + 1))}: segment is missing")
    if snapshot_file is not None and snapshot_file.marker[0] > scan.segments[-1]:
        missing = os.path.join(path, _segment_name(snapshot_file.marker[0]))
        raise CorruptStorageError(f"{missing}: segment named by the snapshot is missing")

    replay = _Replay(snapshot_file)
    for seq in scan.segments:
        segment_path = os.path.join(path, _segment_name(seq))
        is_last = seq == scan.segments[-1]
        with open(segment_path, "rb") as file:
            data = file.read()
        _check_segment_header(segment_path, data, seq)
        offset = _SEGMENT_HEADER_SIZE
        while offset < len(data):
            record = _parse_record(data, offset, seq)
            if isinstance(record, str):
                if not is_last:
                    raise CorruptStorageError(f"{segment_path}: {record} at byte offset {offset}")
                if len(data.rstrip(b"\0")) <= offset:
                    break  # only zeros: the preallocated rest of the segment, never written
                floor = 0
                if snapshot_file is not None and snapshot_file.marker[0] == seq:
                    floor = snapshot_file.marker[1]
                _check_torn_tail(segment_path, data, seq, offset, record, floor)
                scan.torn_at = offset
                break
            if offset == _SEGMENT_HEADER_SIZE:
                scan.last_head_end = record.end
            replay.at((seq, offset))
            try:
                if record.kind != _RECORD_BATCH:
                    raise codec.CodecError(f"unknown record type {record.kind}")
                hard_state, entries = codec.decode_batch(record.payload)
                replay.apply(hard_state, entries, seq, f"{segment_path} at byte offset {offset}")
            except codec.CodecError as exc:
                raise CorruptStorageError(f"{segment_path}: {exc} at byte offset {offset}") from None
            offset = record.end
        scan.last_segment_size = offset
    scan.hard_state, scan.entries, scan.sources = replay.finish(path)
    return scan


def _check_segment_header(path: str, data: bytes, seq: int) -> None:
    # Segments are created whole (written, fsynced, then renamed), so a bad header is never a torn write.
    if len(data) < _SEGMENT_HEADER_SIZE:
        raise CorruptStorageError(f"{path}: segment header cut short at byte offset {len(data)}")
    magic, version, _, stored_seq = _SEGMENT_HEADER.unpack_from(data)
    (crc,) = _CRC.unpack_from(data, _SEGMENT_HEADER.size)
    if magic != _SEGMENT_MAGIC or crc != zlib.crc32(data[: _SEGMENT_HEADER.size]):
        raise CorruptStorageError(f"{path}: bad segment header at byte offset 0")
    if version != _FILE_VERSION:
        raise CorruptStorageError(f"{path}: segment format version {version} at byte offset 0 is unknown")
    if stored_seq != seq:
        raise CorruptStorageError(f"{path}: header names segment {stored_seq} at byte offset 0")


def _header_crc(header: bytes | memoryview, seq: int, offset: int) -> int:
    return zlib.crc32(header, zlib.crc32(_POSITION.pack(seq, offset)))


def _parse_record(data: bytes, offset: int, seq: int) -> _Record | str:
    """The valid record at `offset`, or why there is none."""
    if len(data) - offset < _RECORD_HEADER_SIZE:
        return "record header cut short"
    magic, kind, length, synced_through, payload_crc = _RECORD_HEADER.unpack_from(data, offset)
    (header_crc,) = _CRC.unpack_from(data, offset + _RECORD_HEADER.size)
    view = memoryview(data)
    if magic != _RECORD_MAGIC or header_crc != _header_crc(view[offset : offset + _RECORD_HEADER.size], seq, offset):
        return "bad record header"
    start = offset + _RECORD_HEADER_SIZE
    end = start + length
    if end > len(data):
        return "record cut short"
    payload = view[start:end]
    if zlib.crc32(payload) != payload_crc:
        return "bad record checksum"
    return _Record(kind, payload, synced_through, end)


def _check_torn_tail(path: str, data: bytes, seq: int, offset: int, reason: str, floor: int) -> None:
    """Raise unless the damage from `offset` on is an unfinished write, which recovery may cut off.

    It is unfinished if nothing says it had been made durable: neither the snapshot (whose marker
    `floor` is a position the log had been fsynced to) nor any valid record after it (each carries the
    offset its segment had been fsynced to when it was written; records after a torn one exist when the
    kernel wrote back unsynced pages out of order).
    """
    if offset == _SEGMENT_HEADER_SIZE:
        raise CorruptStorageError(f"{path}: {reason} at byte offset {offset} (a segment's first record)")
    if floor > offset:
        raise CorruptStorageError(f"{path}: {reason} at byte offset {offset}, before the snapshot's position")
    position = offset + 1
    while (position := data.find(_RECORD_MAGIC, position)) >= 0:
        record = _parse_record(data, position, seq)
        if isinstance(record, str):
            position += 1
            continue
        if record.synced_through > offset:
            raise CorruptStorageError(
                f"{path}: {reason} at byte offset {offset}, in data made durable before the record at "
                f"byte offset {position}"
            )
        position = record.end


class _Replay:
    """Rebuilds the log from its records in order, applying the snapshot at the position it was taken."""

    def __init__(self, snapshot_file: _SnapshotFile | None) -> None:
        self.snapshot_file = snapshot_file
        self.snapshot_pending = snapshot_file is not None
        self.hard_state = HardState()
        self.entries: list[Entry] = []
        self.sources: list[int] = []
        self.start = "the first record"  # where the current run of entries began, for errors

    def at(self, position: tuple[int, int]) -> None:
        if self.snapshot_file is not None and self.snapshot_pending and position >= self.snapshot_file.marker:
            self._apply_snapshot(self.snapshot_file)

    def apply(self, hard_state: HardState | None, entries: list[Entry], seq: int, where: str) -> None:
        if hard_state is not None:
            self.hard_state = hard_state
        if not entries:
            return
        first = entries[0].index
        for offset, entry in enumerate(entries):
            if entry.index != first + offset:
                raise codec.CodecError(f"entries not contiguous (index {entry.index} after {first})")
        if self.entries and self.entries[0].index <= first <= self.entries[-1].index + 1:
            cut = first - self.entries[0].index
            del self.entries[cut:]
            del self.sources[cut:]
        else:
            # Before the log or past its end: the records in between were compacted away after a
            # snapshot (whose own marker went with them), so the log starts over here. `finish`
            # checks that what remains follows the current snapshot.
            self.entries.clear()
            self.sources.clear()
            self.start = where
        self.entries.extend(entries)
        self.sources.extend([seq] * len(entries))

    def _apply_snapshot(self, snapshot_file: _SnapshotFile) -> None:
        self.snapshot_pending = False
        if snapshot_file.discards_log:
            self.entries.clear()
            self.sources.clear()
        else:
            self._drop_through(snapshot_file.snapshot.meta.index)

    def _drop_through(self, index: int) -> None:
        if self.entries and self.entries[0].index <= index:
            count = min(index - self.entries[0].index + 1, len(self.entries))
            del self.entries[:count]
            del self.sources[:count]

    def finish(self, path: str) -> tuple[HardState, list[Entry], list[int]]:
        expected_first = 1
        if self.snapshot_file is not None:
            if self.snapshot_pending:
                self._apply_snapshot(self.snapshot_file)
            expected_first = self.snapshot_file.snapshot.meta.index + 1
            self._drop_through(expected_first - 1)
        if self.entries and self.entries[0].index != expected_first:
            raise CorruptStorageError(
                f"{path}: the log starts at index {self.entries[0].index} ({self.start}), "
                f"not {expected_first}: entries are missing"
            )
        return self.hard_state, self.entries, self.sources


def _read_snapshot(path: str, generation: int) -> _SnapshotFile:
    # Snapshot files are renamed into place once complete, so any damage is corruption.
    with open(path, "rb") as file:
        data = file.read()
    if len(data) < _SNAPSHOT_HEADER_SIZE:
        raise CorruptStorageError(f"{path}: snapshot header cut short at byte offset {len(data)}")
    magic, version, flags, stored_generation, marker_seq, marker_offset, meta_length, data_length = (
        _SNAPSHOT_HEADER.unpack_from(data)
    )
    (crc,) = _CRC.unpack_from(data, _SNAPSHOT_HEADER.size)
    if magic != _SNAPSHOT_MAGIC or crc != zlib.crc32(data[: _SNAPSHOT_HEADER.size]):
        raise CorruptStorageError(f"{path}: bad snapshot header at byte offset 0")
    if version != _FILE_VERSION or flags & ~_SNAPSHOT_DISCARDS_LOG or stored_generation != generation:
        raise CorruptStorageError(f"{path}: unknown snapshot format at byte offset 0")
    meta_end = _SNAPSHOT_HEADER_SIZE + meta_length
    data_end = meta_end + data_length
    if len(data) != data_end + _CRC.size:
        raise CorruptStorageError(
            f"{path}: snapshot is {len(data)} bytes, not {data_end + _CRC.size}, "
            f"at byte offset {min(len(data), data_end + _CRC.size)}"
        )
    view = memoryview(data)
    (body_crc,) = _CRC.unpack_from(data, data_end)
    if body_crc != zlib.crc32(view[meta_end:data_end], zlib.crc32(view[_SNAPSHOT_HEADER_SIZE:meta_end])):
        raise CorruptStorageError(f"{path}: bad snapshot checksum at byte offset {_SNAPSHOT_HEADER_SIZE}")
    try:
        meta = codec.decode_snapshot_meta(view[_SNAPSHOT_HEADER_SIZE:meta_end])
    except codec.CodecError as exc:
        raise CorruptStorageError(f"{path}: {exc} at byte offset {_SNAPSHOT_HEADER_SIZE}") from None
    return _SnapshotFile(
        snapshot=Snapshot(meta=meta, data=bytes(view[meta_end:data_end])),
        marker=(marker_seq, marker_offset),
        discards_log=bool(flags & _SNAPSHOT_DISCARDS_LOG),
    )


# --- system calls -----------------------------------------------------------------------------------------


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _sync_file(fd: int) -> None:
    if sys.platform == "darwin":
        # fsync on macOS leaves the data in the drive's cache; F_FULLFSYNC flushes it.
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        # The data and the size (which fdatasync includes); timestamps are not needed to read it back.
        os.fdatasync(fd)


def _preallocate(fd: int, length: int) -> None:
    if sys.platform == "darwin":
        return  # no posix_fallocate; appends then cost a metadata update each
    try:
        os.posix_fallocate(fd, 0, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def _sync_directory(fd: int) -> None:
    os.fsync(fd)


def _make_directory(path: str) -> None:
    """Create `path` and any missing parents, each made durable in its parent directory."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    _make_directory(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _sync_directory(fd)
    finally:
        os.close(fd)
