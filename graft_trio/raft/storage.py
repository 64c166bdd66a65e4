"""Where a member keeps its hard state, log and snapshot, and the in-memory storage that models a crash.

The core keeps its (compacted) log in memory and only writes through `Storage`; it reads storage once,
at start-up, with `load`. Every write is a batch: `save` writes a hard state and/or entries and, unless
the caller asked for a non-durable write, returns only once the batch is durable. The driver sends no
message that depends on a batch before `save` returns, except with ``RaftConfig(durable=False)``: then a
background task makes the (non-durable) saves behind the commit path, in order.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence

import attrs

from graft_trio.raft.messages import Entry, HardState, Snapshot


@attrs.frozen
class PersistentState:
    """What a member recovers at start-up."""

    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: tuple[Entry, ...] = ()  # the log after the snapshot, in index order, contiguous


class StorageInUseError(OSError):
    """The data directory is locked by another open storage (another member, or this one twice)."""


class CorruptStorageError(Exception):
    """Stored data failed its checksum somewhere other than a torn tail; the member refuses to start."""


class Storage(abc.ABC):
    @abc.abstractmethod
    async def load(self) -> PersistentState:
        """The durable state, as of the last completed durable write."""

    @abc.abstractmethod
    async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
        """Write `hard_state` (if given) and `entries` as one batch.

        `entries` are contiguous; any stored entry at or after ``entries[0].index`` is replaced (a
        conflicting suffix is truncated). With `sync`, the batch is durable when this returns.
        """

    @abc.abstractmethod
    async def save_snapshot(self, snapshot: Snapshot, *, discard_log: bool) -> None:
        """Install `snapshot` durably and atomically, dropping entries up to its index.

        With `discard_log`, every stored entry is dropped (the log conflicted with the snapshot).
        """

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and handles."""


def _apply_entries(log: list[Entry], entries: Sequence[Entry], first_index: int) -> None:
    """Append `entries` to `log` (whose first entry has index `first_index`), truncating a conflict."""
    if not entries:
        return
    start = entries[0].index - first_index
    if start < 0:
        # The batch reaches back before the log (it overlapped a snapshot): keep only what follows it.
        entries = entries[-start:]
        start = 0
    del log[start:]
    log.extend(entries)


@attrs.define
class _Durable:
    hard_state: HardState = HardState()
    snapshot: Snapshot | None = None
    entries: list[Entry] = attrs.Factory(list)

    def first_index(self) -> int:
        return (self.snapshot.meta.index if self.snapshot else 0) + 1

    def copy(self) -> _Durable:
        return _Durable(self.hard_state, self.snapshot, list(self.entries))


class MemoryStorage(Storage):
    """Storage in memory, for tests and the simulator, with a crash model.

    A write is first *pending*; it becomes *durable* once its sync completes. `sync_delay`, when given,
    is awaited inside every sync (the simulator passes a disk latency on its virtual clock), so a crash
    can land between a write and its sync. `crash()` then forgets everything that was not durable.
    """

    def __init__(self, sync_delay: Callable[[], Awaitable[None]] | None = None) -> None:
        self._durable = _Durable()
        self._pending: list[tuple[str, object]] = []
        self._sync_delay = sync_delay
        self.syncs = 0

    async def load(self) -> PersistentState:
        state = self._visible()
        return PersistentState(state.hard_state, state.snapshot, tuple(state.entries))

    async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
        if hard_state is not None:
            self._pending.append(("hard_state", hard_state))
        if entries:
            self._pending.append(("entries", tuple(entries)))
        if sync:
            await self._sync()

    async def save_snapshot(self, snapshot: Snapshot, *, discard_log: bool) -> None:
        self._pending.append(("snapshot", (snapshot, discard_log)))
        await self._sync()

    async def _sync(self) -> None:
        batch_end = len(self._pending)
        if self._sync_delay is not None:
            await self._sync_delay()
        self._replay(self._durable, self._pending[:batch_end])
        del self._pending[:batch_end]
        self.syncs += 1

    def _visible(self) -> _Durable:
        return self._replay(self._durable.copy(), self._pending)

    @staticmethod
    def _replay(state: _Durable, ops: list[tuple[str, object]]) -> _Durable:
        for kind, value in ops:
            if kind == "hard_state":
                assert isinstance(value, HardState)
                state.hard_state = value
            elif kind == "entries":
                assert isinstance(value, tuple)
                _apply_entries(state.entries, value, state.first_index())
            else:
                assert isinstance(value, tuple)
                snapshot: Snapshot = value[0]
                discard_log: bool = value[1]
                if discard_log:
                    state.entries = []
                else:
                    state.entries = [e for e in state.entries if e.index > snapshot.meta.index]
                state.snapshot = snapshot
        return state

    def crash(self, keep_pending: int = 0) -> None:
        """Forget writes that were not synced, except the first `keep_pending` (a torn write)."""
        self._durable = self._replay(self._durable, self._pending[:keep_pending])
        self._pending.clear()

    @property
    def pending_writes(self) -> int:
        return len(self._pending)


def open_storage(path: str | None = None) -> Storage:
    """The storage for a member: `MemoryStorage` for ``None`` or ``":memory:"``, else durable files in `path`."""
    if path is None or path == ":memory:":
        return MemoryStorage()
    from graft_trio.raft.file_storage import FileStorage

    return FileStorage(path)
