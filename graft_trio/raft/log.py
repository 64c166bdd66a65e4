"""The in-memory Raft log: entries after the compaction point, commit and apply positions, memberships.

The log holds every entry after `offset` (the last compacted index). Entries up to `stable_index` are
known durable; later ones are waiting for the driver to persist them. Membership takes effect when its
entry is appended (the dissertation's rule), so the log also tracks where each membership entry is and
falls back to the earlier one when a conflicting suffix is truncated.
"""

from __future__ import annotations

from collections.abc import Sequence

from graft_trio.raft.messages import Entry, Membership, SnapshotMeta


class RaftLog:
    def __init__(self, snapshot: SnapshotMeta, entries: Sequence[Entry], commit: int) -> None:
        self.offset = snapshot.index  # entries at or below this index are compacted away
        self.offset_term = snapshot.term
        self.entries: list[Entry] = list(entries)
        self.committed = max(commit, snapshot.index)
        self.committed = min(self.committed, self.last_index)
        self.applied = snapshot.index
        self.stable_index = self.last_index  # what was loaded from storage is durable
        # (index, membership) for each membership entry in `entries`, oldest first; `base_membership` is
        # the membership in force at `offset`.
        self.base_membership = snapshot.membership
        self.memberships: list[tuple[int, Membership]] = [
            (e.index, e.membership) for e in self.entries if e.membership is not None
        ]

    # --- positions -----------------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        return self.offset + 1

    @property
    def last_index(self) -> int:
        return self.offset + len(self.entries)

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`; None when it is compacted away or beyond the end."""
        if index == self.offset:
            return self.offset_term
        if index < self.offset or index > self.last_index:
            return None
        return self.entries[index - self.offset - 1].term

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.offset - 1]

    def matches(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Whether a candidate whose log ends at (last_index, last_term) is at least as up to date (§5.4.1)."""
        return last_term > self.last_term or (last_term == self.last_term and last_index >= self.last_index)

    # --- membership -----------------------------------------------------------------------------------

    @property
    def membership(self) -> Membership:
        return self.memberships[-1][1] if self.memberships else self.base_membership

    @property
    def membership_index(self) -> int:
        """The index of the entry that set the current membership (the offset if it predates the log)."""
        return self.memberships[-1][0] if self.memberships else self.offset

    def membership_at(self, index: int) -> Membership:
        found = self.base_membership
        for entry_index, membership in self.memberships:
            if entry_index > index:
                break
            found = membership
        return found

    # --- changes ---------------------------------------------------------------------------------------

    def slice(self, low: int, high: int, max_bytes: int) -> list[Entry]:
        """Entries [low, high), at least one if any, stopping once `max_bytes` is exceeded."""
        out: list[Entry] = []
        size = 0
        start = low - self.offset - 1
        for entry in self.entries[start : high - self.offset - 1]:
            size += entry.size()
            if out and size > max_bytes:
                break
            out.append(entry)
        return out

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries whose first index is at most last_index + 1, replacing everything after it."""
        if not entries:
            return
        first = entries[0].index
        last_index = self.offset + len(self.entries)
        assert self.offset < first <= last_index + 1, (first, self.offset, last_index)
        if first <= last_index:
            assert first > self.committed, f"truncating committed entry {first} (commit {self.committed})"
            del self.entries[first - self.offset - 1 :]
            self.stable_index = min(self.stable_index, first - 1)
            while self.memberships and self.memberships[-1][0] >= first:
                self.memberships.pop()
        self.entries.extend(entries)
        for entry in entries:
            if entry.membership is not None:
                self.memberships.append((entry.index, entry.membership))

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """The index of the first entry that is absent or has another term here; 0 if all match."""
        for entry in entries:
            if not self.matches(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term`, with that term (fast backtracking)."""
        index = min(index, self.last_index)
        while index > self.offset:
            entry_term = self.entry(index).term
            if entry_term <= term:
                return index, entry_term
            index -= 1
        return self.offset, self.offset_term

    def maybe_append(
        self, prev_index: int, prev_term: int, leader_commit: int, entries: Sequence[Entry]
    ) -> int | None:
        """AppendEntries on a follower: None if (prev_index, prev_term) does not match, else the last new index."""
        if prev_index < self.offset:
            # The leader is behind our compaction point; everything up to the offset is committed here.
            skip = self.offset - prev_index
            if len(entries) <= skip:
                return prev_index + len(entries)
            entries = entries[skip:]
            prev_index, prev_term = self.offset, self.offset_term
        if not self.matches(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            self.append(entries[conflict - prev_index - 1 :])
        self.commit_to(min(leader_commit, last_new))
        return last_new

    def commit_to(self, index: int) -> bool:
        if index > self.committed:
            assert index <= self.last_index, (index, self.last_index)
            self.committed = index
            return True
        return False

    def stable_to(self, index: int, term: int) -> None:
        if self.matches(index, term) and index > self.stable_index:
            self.stable_index = index

    def unstable_entries(self) -> list[Entry]:
        return self.entries[self.stable_index - self.offset :]

    def has_unstable_entries(self) -> bool:
        return bool(self.entries) and self.stable_index < self.last_index

    def restore(self, meta: SnapshotMeta) -> bool:
        """Reset the log to a snapshot. True if the suffix after it was kept (it matched the snapshot)."""
        keep = self.matches(meta.index, meta.term)
        if keep:
            self.entries = self.entries[meta.index - self.offset :]
            self.memberships = [(i, m) for i, m in self.memberships if i > meta.index]
        else:
            self.entries = []
            self.memberships = []
        self.stable_index = max(meta.index, self.stable_index) if keep else meta.index
        self.offset, self.offset_term = meta.index, meta.term
        self.base_membership = meta.membership
        self.committed = max(self.committed, meta.index)
        self.applied = max(self.applied, meta.index)
        return keep

    def compact(self, index: int) -> None:
        """Drop entries up to `index` (already applied and covered by a snapshot)."""
        if index <= self.offset:
            return
        assert index <= self.applied, (index, self.applied)
        term = self.term(index)
        assert term is not None
        self.base_membership = self.membership_at(index)
        self.entries = self.entries[index - self.offset :]
        self.memberships = [(i, m) for i, m in self.memberships if i > index]
        self.offset, self.offset_term = index, term

