"""The Raft safety checkers, run continuously while a simulation runs.

Each checker watches every member through the `RaftObserver` hooks of `RaftNode` (and the simulator's
network and crash events) and records a `Violation` the moment a property breaks:

- Election Safety: at most one leader per term (§5.2).
- Vote Safety: a member grants at most one vote per term, across crashes (§5.2, Figure 2's votedFor).
- Leader Append-Only: a leader never overwrites or deletes entries in its own log (§5.3).
- Log Matching: two entries with the same index and term hold the same command and follow the same
  history; checked entry by entry through the term of each entry's predecessor (§5.3).
- Leader Completeness: an entry committed in a term is in the log of every leader of a later term (§5.4).
- State Machine Safety: no two members apply different entries at the same index (§5.4.3).
- Leader Commitment Rule: a leader moves its commit index only onto an entry of its own term (§5.4.2,
  the rule that keeps Figure 8 from happening; its breach is caught here the moment it happens, long
  before the rare schedule that turns it into lost data).
- Acknowledged Durability: an entry a member acknowledged to a leader is still in its durable log after
  a crash, unless a later leader's entries replaced it.

None of them iterate a set, so the order in which they report is part of the deterministic trace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import attrs

from graft_trio.raft.core import RaftCore, Ready, Role
from graft_trio.raft.messages import AppendEntriesResponse, Entry, Message, RequestVoteResponse, Snapshot
from graft_trio.raft.storage import PersistentState


@attrs.frozen
class Violation:
    checker: str
    time: float
    detail: str

    def __str__(self) -> str:
        return f"[{self.time:.6f}] {self.checker}: {self.detail}"


def fingerprint(entry: Entry) -> str:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(bytes([entry.kind]))
    digest.update(entry.data)
    digest.update(entry.request_id.encode())
    if entry.membership is not None:
        digest.update(repr(entry.membership).encode())
    return digest.hexdigest()


class RaftCheckers:
    """All the safety checkers, fed by one simulation. `now` gives the virtual time for reports."""

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self.violations: list[Violation] = []
        self.leaders: dict[int, str] = {}  # term -> leader
        self.votes: dict[tuple[str, int], str] = {}  # (voter, term) -> candidate
        self.leader_logs: dict[str, tuple[int, int]] = {}  # member -> (term it leads, last index seen)
        self.entries: dict[tuple[int, int], tuple[str, int]] = {}  # (index, term) -> (fingerprint, prev term)
        self.committed: dict[int, tuple[int, str]] = {}  # index -> (term, fingerprint)
        self.commit_seen: dict[str, int] = {}  # member -> highest commit index recorded from it
        self.applied_at: dict[int, tuple[int, str, str]] = {}  # index -> (term, fingerprint, first applier)
        self.acknowledged: dict[str, tuple[int, int]] = {}  # member -> (term, match index) of last ack sent
        self._fingerprints: dict[tuple[int, int], tuple[Entry, str]] = {}  # (index, term) -> first entry seen

    def _fingerprint(self, entry: Entry) -> str:
        """`fingerprint(entry)`, computed once per entry object: the simulated network passes entries by
        reference, so the members mostly hold the very same objects. The first entry seen at each (index,
        term) is kept (so that its id cannot be reused); another object there is hashed afresh."""
        key = (entry.index, entry.term)
        known = self._fingerprints.get(key)
        if known is not None and known[0] is entry:
            return known[1]
        fp = fingerprint(entry)
        if known is None:
            self._fingerprints[key] = (entry, fp)
        return fp

    def fail(self, checker: str, detail: str) -> None:
        self.violations.append(Violation(checker, self._now(), detail))

    # --- RaftObserver ------------------------------------------------------------------------------------

    def persisted(self, node_id: str, core: RaftCore, ready: Ready) -> None:
        if ready.entries:
            self._check_entries(node_id, core, ready.entries)
        soft = ready.soft_state
        if soft is not None and soft.role is Role.LEADER:
            self._check_new_leader(node_id, core, soft.term)
        elif core.role is not Role.LEADER:
            self.leader_logs.pop(node_id, None)
        if core.role is Role.LEADER:
            # The furthest the leader's log has reached in its term: it may never append below that again.
            led = self.leader_logs.get(node_id)
            reached = core.log.last_index
            if led is not None and led[0] == core.term:
                reached = max(reached, led[1])
            self.leader_logs[node_id] = (core.term, reached)
            self._check_commit_rule(node_id, core, ready)
        self._record_commits(node_id, core)

    def applied(self, node_id: str, entry: Entry) -> None:
        fp = self._fingerprint(entry)
        seen = self.applied_at.get(entry.index)
        if seen is None:
            self.applied_at[entry.index] = (entry.term, fp, node_id)
        elif seen[:2] != (entry.term, fp):
            self.fail(
                "state-machine-safety",
                f"{node_id} applied index {entry.index} term {entry.term} ({fp}) but {seen[2]} applied "
                f"term {seen[0]} ({seen[1]}) there",
            )

    def restored(self, node_id: str, snapshot: Snapshot) -> None:
        meta = snapshot.meta
        seen = self.applied_at.get(meta.index)
        if seen is not None and seen[0] != meta.term:
            self.fail(
                "state-machine-safety",
                f"{node_id} restored a snapshot at index {meta.index} term {meta.term}, "
                f"but term {seen[0]} was applied there",
            )

    # --- individual properties ---------------------------------------------------------------------------

    def _check_new_leader(self, node_id: str, core: RaftCore, term: int) -> None:
        previous = self.leaders.get(term)
        if previous is not None and previous != node_id:
            self.fail("election-safety", f"two leaders in term {term}: {previous} and {node_id}")
        self.leaders[term] = node_id
        self.leader_logs[node_id] = (term, core.log.last_index)
        # Leader Completeness: every committed entry of an earlier term is in the new leader's log.
        for index in sorted(self.committed):
            committed_term, fp = self.committed[index]
            if committed_term >= term or index <= core.log.offset:
                continue
            if index > core.log.last_index:
                self.fail(
                    "leader-completeness",
                    f"leader {node_id} of term {term} lacks committed index {index} (its log ends at "
                    f"{core.log.last_index})",
                )
                return
            entry = core.log.entry(index)
            if entry.term != committed_term or self._fingerprint(entry) != fp:
                self.fail(
                    "leader-completeness",
                    f"leader {node_id} of term {term} has term {entry.term} at committed index {index} "
                    f"(committed: term {committed_term})",
                )
                return

    def _check_entries(self, node_id: str, core: RaftCore, entries: tuple[Entry, ...]) -> None:
        led = self.leader_logs.get(node_id)
        if led is not None and led[0] == core.term and core.role is Role.LEADER and entries[0].index <= led[1]:
            self.fail(
                "leader-append-only",
                f"leader {node_id} of term {core.term} rewrote its log from index {entries[0].index} "
                f"(it ended at {led[1]})",
            )
        for entry in entries:
            prev_term = core.log.term(entry.index - 1)
            if prev_term is None:
                continue
            key = (entry.index, entry.term)
            value = (self._fingerprint(entry), prev_term)
            seen = self.entries.get(key)
            if seen is None:
                self.entries[key] = value
            elif seen != value:
                self.fail(
                    "log-matching",
                    f"{node_id} holds index {entry.index} term {entry.term} as {value}, another member as {seen}",
                )

    def _check_commit_rule(self, node_id: str, core: RaftCore, ready: Ready) -> None:
        hard_state = ready.hard_state
        if hard_state is None or ready.soft_state is not None:
            return
        previous = self.commit_seen.get(node_id, 0)
        if hard_state.commit > previous:
            term = core.log.term(hard_state.commit)
            if term is not None and term != core.term:
                self.fail(
                    "leader-commit-rule",
                    f"leader {node_id} of term {core.term} committed index {hard_state.commit} of term {term} "
                    "by counting replicas",
                )

    def _record_commits(self, node_id: str, core: RaftCore) -> None:
        start = max(self.commit_seen.get(node_id, 0), core.log.offset) + 1
        for index in range(start, core.log.committed + 1):
            entry = core.log.entry(index)
            fp = self._fingerprint(entry)
            seen = self.committed.get(index)
            if seen is None:
                self.committed[index] = (entry.term, fp)
            elif seen != (entry.term, fp):
                self.fail(
                    "state-machine-safety",
                    f"{node_id} committed index {index} as term {entry.term}, another member as term {seen[0]}",
                )
        self.commit_seen[node_id] = max(self.commit_seen.get(node_id, 0), core.log.committed)

    # --- the network and crashes ---------------------------------------------------------------------------

    def message_sent(self, message: Message) -> None:
        if isinstance(message, RequestVoteResponse) and message.granted and not message.pre_vote:
            key = (message.source, message.term)
            previous = self.votes.get(key)
            if previous is not None and previous != message.target:
                self.fail(
                    "vote-safety",
                    f"{message.source} voted for {previous} and for {message.target} in term {message.term}",
                )
            self.votes[key] = message.target
        elif isinstance(message, AppendEntriesResponse) and message.success:
            self.acknowledged[message.source] = (message.term, message.match_index)

    def crashed(self, node_id: str, durable: PersistentState) -> None:
        """Called with what a member's storage still holds after it crashed."""
        acked = self.acknowledged.pop(node_id, None)
        self.leader_logs.pop(node_id, None)
        if acked is None:
            return
        term, match = acked
        snapshot_index = durable.snapshot.meta.index if durable.snapshot is not None else 0
        last_index = durable.entries[-1].index if durable.entries else snapshot_index
        last_term = (
            durable.entries[-1].term
            if durable.entries
            else (durable.snapshot.meta.term if durable.snapshot is not None else 0)
        )
        if last_index < match and last_term <= term:
            self.fail(
                "acknowledged-durability",
                f"{node_id} acknowledged index {match} in term {term} but after its crash its durable log "
                f"ends at {last_index} (term {last_term})",
            )
        if durable.hard_state.term < term:
            self.fail(
                "acknowledged-durability",
                f"{node_id} answered in term {term} but its durable term is {durable.hard_state.term}",
            )
