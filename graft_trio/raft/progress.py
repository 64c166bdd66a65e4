"""What the leader knows about each follower's log, and the flow control of replication to it.

A follower is in one of three states. PROBE: the leader does not know where the logs match, and sends one
AppendEntries at a time until a reply tells it. REPLICATE: the logs match up to `match_index`; the leader
streams entries optimistically, bounded by a window of in-flight messages and bytes. SNAPSHOT: the
follower needs entries that were compacted away and is being sent a snapshot, chunk by chunk.
"""

from __future__ import annotations

import enum
from collections import deque

import attrs

from .messages import Snapshot


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


@attrs.define
class Inflights:
    """Messages sent and not yet acknowledged: (last index in the message, its size in bytes)."""

    max_messages: int
    max_bytes: int
    items: deque[tuple[int, int]] = attrs.Factory(deque)
    total_bytes: int = 0

    def add(self, last_index: int, size: int) -> None:
        self.items.append((last_index, size))
        self.total_bytes += size

    def free_to(self, index: int) -> None:
        while self.items and self.items[0][0] <= index:
            _, size = self.items.popleft()
            self.total_bytes -= size

    def reset(self) -> None:
        self.items.clear()
        self.total_bytes = 0

    def full(self) -> bool:
        return len(self.items) >= self.max_messages or self.total_bytes >= self.max_bytes


@attrs.define
class Progress:
    match_index: int
    next_index: int
    inflights: Inflights
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False  # in PROBE, one message at a time
    recent_active: bool = False  # heard from since the last CheckQuorum round
    # In SNAPSHOT: the snapshot being sent. Kept until the transfer ends even if the leader takes a newer
    # one meanwhile: restarting from offset 0 at every new snapshot starved a follower whose transfer
    # takes longer than the leader's snapshot interval.
    snapshot: Snapshot | None = None
    snapshot_offset: int = 0  # in SNAPSHOT: the next byte the follower asked for
    snapshot_sent: bool = False  # in SNAPSHOT: a chunk is awaiting its reply
    heartbeat_match: int = 0  # match_index at the previous stall check (once per election timeout)
    # The commit index this follower can know from what was sent it in REPLICATE: an AppendEntries's commit
    # up to its last entry, or a CommitNotice's. Reset when probing (what was sent may not have landed).
    commit_sent: int = 0

    @property
    def snapshot_index(self) -> int:
        """In SNAPSHOT: the index of the snapshot being sent (0 otherwise)."""
        return self.snapshot.meta.index if self.snapshot is not None else 0

    def is_paused(self) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            self.next_index = max(self.match_index + 1, self.snapshot_index + 1)
        else:
            self.next_index = self.match_index + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.snapshot = None
        self.commit_sent = 0
        self.inflights.reset()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self.inflights.reset()

    def become_snapshot(self, snapshot: Snapshot) -> None:
        self.state = ProgressState.SNAPSHOT
        self.snapshot = snapshot
        self.snapshot_offset = 0
        self.snapshot_sent = False
        self.inflights.reset()

    def maybe_update(self, index: int) -> bool:
        """A success reply up to `index`. True if it moved `match_index`."""
        updated = False
        if index > self.match_index:
            self.match_index = index
            self.probe_sent = False
            updated = True
        self.next_index = max(self.next_index, index + 1)
        return updated

    def sent_entries(self, last_index: int, size: int) -> None:
        if self.state is ProgressState.REPLICATE:
            self.next_index = last_index + 1
            self.inflights.add(last_index, size)
        elif self.state is ProgressState.PROBE:
            self.probe_sent = True

    def maybe_decrease_to(self, rejected: int, next_probe: int) -> bool:
        """A rejection of the message whose prev_log_index was `rejected`. False if the reply is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match_index:
                return False
            self.next_index = self.match_index + 1
            return True
        if self.next_index - 1 != rejected:
            return False
        self.next_index = max(min(rejected, next_probe + 1), self.match_index + 1)
        self.probe_sent = False
        return True
