"""Append throughput of the two designs considered for durable Raft storage, measured on this machine.

(a) SQLite (stdlib sqlite3, WAL journal, synchronous=FULL): `SqliteStorage` below, kept here only as the
    baseline it lost to; (b) the segmented append-only log that `graft_trio.raft.file_storage.FileStorage`
    implements. Both are driven through the same async `Storage` API, so each batch costs the same thread
    hop, and every batch is durable (fsynced) before the next starts: the figure is what a Raft member
    could persist per second with group commit at that batch size.

    python -m benchmarks.storage [--batches 1000] [--repeat 5] [--dir PATH]

docs/STORAGE.md records a run and what was decided from it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import unittest.mock
from collections.abc import Callable, Sequence

import trio

from graft_trio.raft import codec, file_storage
from graft_trio.raft.file_storage import FileStorage
from graft_trio.raft.messages import Entry, HardState, Snapshot
from graft_trio.raft.storage import PersistentState, Storage

BATCH_SIZES = (1, 10, 100)
ENTRY_BYTES = 100


class SqliteStorage(Storage):
    """Design (a): one SQLite database; a batch is one transaction, made durable by one WAL fsync."""

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        # Every call runs in some worker thread, one at a time (the lock), so sharing is safe.
        self._connection = sqlite3.connect(
            os.path.join(path, "raft.sqlite3"), isolation_level=None, check_same_thread=False
        )
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=FULL")
        self._synchronous = True
        with self._transaction():
            self._connection.execute("CREATE TABLE IF NOT EXISTS hard_state (id INTEGER PRIMARY KEY, record BLOB)")
            self._connection.execute("CREATE TABLE IF NOT EXISTS log (log_index INTEGER PRIMARY KEY, record BLOB)")
            self._connection.execute(
                "CREATE TABLE IF NOT EXISTS snapshot (id INTEGER PRIMARY KEY, meta BLOB, data BLOB)"
            )
        self._lock = trio.Lock()

    async def load(self) -> PersistentState:
        async with self._lock:
            return await trio.to_thread.run_sync(self._load)

    async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._save, hard_state, entries, sync)

    async def save_snapshot(self, snapshot: Snapshot, *, discard_log: bool) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._save_snapshot, snapshot, discard_log)

    async def close(self) -> None:
        async with self._lock:
            await trio.to_thread.run_sync(self._connection.close)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._connection)

    def _load(self) -> PersistentState:
        row = self._connection.execute("SELECT record FROM hard_state WHERE id = 0").fetchone()
        hard_state = (codec.decode_batch(row[0])[0] if row else None) or HardState()
        snapshot = None
        row = self._connection.execute("SELECT meta, data FROM snapshot WHERE id = 0").fetchone()
        if row:
            snapshot = Snapshot(codec.decode_snapshot_meta(row[0]), row[1])
        after = snapshot.meta.index if snapshot else 0
        rows = self._connection.execute("SELECT record FROM log WHERE log_index > ? ORDER BY log_index", (after,))
        entries = tuple(entry for (record,) in rows for entry in codec.decode_batch(record)[1])
        return PersistentState(hard_state, snapshot, entries)

    def _save(self, hard_state: HardState | None, entries: Sequence[Entry], sync: bool) -> None:
        if sync != self._synchronous:
            self._connection.execute(f"PRAGMA synchronous={'FULL' if sync else 'OFF'}")
            self._synchronous = sync
        with self._transaction():
            if hard_state is not None:
                self._connection.execute(
                    "INSERT OR REPLACE INTO hard_state VALUES (0, ?)", (codec.encode_batch(hard_state, ()),)
                )
            if entries:
                self._connection.execute("DELETE FROM log WHERE log_index >= ?", (entries[0].index,))
                self._connection.executemany(
                    "INSERT INTO log VALUES (?, ?)", [(e.index, codec.encode_batch(None, (e,))) for e in entries]
                )

    def _save_snapshot(self, snapshot: Snapshot, discard_log: bool) -> None:
        if not self._synchronous:
            self._connection.execute("PRAGMA synchronous=FULL")
            self._synchronous = True
        with self._transaction():
            self._connection.execute(
                "INSERT OR REPLACE INTO snapshot VALUES (0, ?, ?)",
                (codec.encode_snapshot_meta(snapshot.meta), snapshot.data),
            )
            if discard_log:
                self._connection.execute("DELETE FROM log")
            else:
                self._connection.execute("DELETE FROM log WHERE log_index <= ?", (snapshot.meta.index,))


class _Transaction:
    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    def __enter__(self) -> None:
        self._connection.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        self._connection.execute("COMMIT" if exc_type is None else "ROLLBACK")


DESIGNS: dict[str, Callable[[str], Storage]] = {
    "segmented log": FileStorage,
    "sqlite wal": SqliteStorage,
    # Not a contender: the segmented log appending to files that grow, to show what preallocation buys.
    "log, no prealloc": FileStorage,
}


def _conditions(name: str) -> contextlib.AbstractContextManager[object]:
    if name == "log, no prealloc":
        return unittest.mock.patch.object(file_storage, "_preallocate", lambda fd, length: None)
    return contextlib.nullcontext()


async def appends_per_second(make: Callable[[str], Storage], directory: str, batch_size: int, batches: int) -> float:
    """Entries per second over `batches` durable batches of `batch_size` entries of ENTRY_BYTES each."""
    storage = make(directory)
    await storage.load()
    payload = bytes(range(ENTRY_BYTES))
    index = 0
    started = time.perf_counter()
    for _ in range(batches):
        entries = [Entry(1, index + offset, data=payload) for offset in range(1, batch_size + 1)]
        # A leader's batch carries its commit index too, so every batch writes a hard state.
        await storage.save(HardState(term=1, vote="n1", commit=index), entries, sync=True)
        index += batch_size
    elapsed = time.perf_counter() - started
    await storage.close()
    return batches * batch_size / elapsed


async def measure(root: str, batches: int, repeat: int) -> dict[tuple[str, int], float]:
    runs: dict[tuple[str, int], list[float]] = {}
    # Designs take turns, so that a slow spell of the (often virtual) disk hits both alike.
    for attempt in range(repeat):
        for batch_size in BATCH_SIZES:
            for name, make in DESIGNS.items():
                directory = os.path.join(root, f"{name.replace(' ', '-')}-{batch_size}-{attempt}")
                with _conditions(name):
                    figure = await appends_per_second(make, directory, batch_size, batches)
                runs.setdefault((name, batch_size), []).append(figure)
                shutil.rmtree(directory)
    return {key: statistics.median(figures) for key, figures in runs.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage", description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000, help="durable batches per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="measurements per figure (the median is shown)")
    parser.add_argument("--dir", help="where to write (default: a temporary directory); pick the disk to test")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="graft-storage-bench-", dir=args.dir)
    try:
        results = trio.run(measure, root, args.batches, args.repeat)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{platform.platform()}, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}")
    print(
        f"{args.batches} fsynced batches of {ENTRY_BYTES}-byte entries per figure, median of {args.repeat}, in {root}"
    )
    print("entries appended per second:")
    names = list(DESIGNS)
    print(f"{'batch':>6} | " + " | ".join(f"{name:>16}" for name in names) + " | segmented / sqlite")
    for batch_size in BATCH_SIZES:
        figures = [results[name, batch_size] for name in names]
        row = " | ".join(f"{figure:>16,.0f}" for figure in figures)
        print(f"{batch_size:>6} | {row} | {figures[0] / figures[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
