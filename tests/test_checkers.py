"""The simulator's Raft safety checkers (`sims.checkers.RaftCheckers`), fed by hand.

For every checker: a legal sequence of observer events that must not be flagged, and the same kind of
sequence with the bug planted, which must be flagged under that checker's name and no other. The events are
built from real `RaftCore`s (their role, term, log and commit index set by hand) and real `Ready` batches,
the way `RaftNode` reports them: `persisted` sees the core after the Ready's entries were appended to it.

Tests marked xfail(strict=True) plant a bug the checker is meant to catch but does not; each reason says why.
"""

from __future__ import annotations

import random

import pytest

from graft_trio.raft.core import CoreConfig, RaftCore, Ready, Role, SoftState
from graft_trio.raft.messages import (
    AppendEntriesResponse,
    Entry,
    EntryKind,
    HardState,
    Message,
    RequestVoteResponse,
    Snapshot,
    SnapshotMeta,
)
from graft_trio.raft.storage import PersistentState
from sims.checkers import RaftCheckers

# --- builders --------------------------------------------------------------------------------------------


def checkers() -> RaftCheckers:
    return RaftCheckers(now=lambda: 1.0)


def entry(index: int, term: int, data: bytes | None = None) -> Entry:
    return Entry(term, index, EntryKind.NORMAL, f"{index}@{term}".encode() if data is None else data)


def log_of(*terms: int) -> list[Entry]:
    """Entries 1..n with the given terms and default commands."""
    return [entry(index, term) for index, term in enumerate(terms, start=1)]


def core(node_id: str, entries: list[Entry], term: int, role: Role = Role.FOLLOWER, commit: int = 0) -> RaftCore:
    c = RaftCore(node_id, CoreConfig(), random.Random(0), HardState(term, None, commit), None, entries)
    c.role = role
    c.leader_id = node_id if role is Role.LEADER else None
    return c


def ready(
    *,
    hard_state: HardState | None = None,
    entries: tuple[Entry, ...] = (),
    messages: tuple[Message, ...] = (),
    soft_state: SoftState | None = None,
) -> Ready:
    return Ready(
        hard_state=hard_state,
        entries=entries,
        snapshot=None,
        discard_log=False,
        messages=messages,
        committed_entries=(),
        read_states=(),
        soft_state=soft_state,
    )


def elect(chk: RaftCheckers, c: RaftCore, noop: bool = True) -> None:
    """Make `c` leader of its term and report the election Ready, with the leader's no-op when `noop`."""
    c.role, c.leader_id = Role.LEADER, c.id
    entries: tuple[Entry, ...] = ()
    if noop:
        entries = (Entry(c.term, c.log.last_index + 1, EntryKind.NOOP),)
        c.log.append(entries)
    hard = HardState(c.term, c.id, c.log.committed)
    chk.persisted(c.id, c, ready(hard_state=hard, entries=entries, soft_state=SoftState(Role.LEADER, c.id, c.term)))


def append(chk: RaftCheckers, c: RaftCore, *entries: Entry) -> None:
    """Append `entries` to `c`'s log and report them persisted."""
    c.log.append(entries)
    chk.persisted(c.id, c, ready(entries=entries))


def commit(chk: RaftCheckers, c: RaftCore, index: int) -> None:
    """Move `c`'s commit index to `index` and report the new hard state persisted."""
    c.log.commit_to(index)
    chk.persisted(c.id, c, ready(hard_state=HardState(c.term, c.vote, c.log.committed)))


def vote(voter: str, candidate: str, term: int, granted: bool = True, pre_vote: bool = False) -> RequestVoteResponse:
    return RequestVoteResponse(voter, candidate, term, granted, pre_vote)


def ack(follower: str, leader: str, term: int, match_index: int) -> AppendEntriesResponse:
    return AppendEntriesResponse(follower, leader, term, True, match_index)


def snapshot_at(index: int, term: int) -> Snapshot:
    return Snapshot(SnapshotMeta(index, term), b"state")


def names(chk: RaftCheckers) -> set[str]:
    return {v.checker for v in chk.violations}


# --- election safety -------------------------------------------------------------------------------------


def test_election_safety_allows_one_leader_per_term() -> None:
    chk = checkers()
    a = core("a", log_of(1), term=2)
    elect(chk, a)
    b = core("b", [*log_of(1), Entry(2, 2, EntryKind.NOOP)], term=3)
    elect(chk, b)
    assert chk.violations == []
    assert chk.leaders == {2: "a", 3: "b"}


def test_election_safety_flags_two_leaders_in_one_term() -> None:
    chk = checkers()
    elect(chk, core("a", log_of(1), term=2), noop=False)
    elect(chk, core("b", log_of(1), term=2), noop=False)
    assert names(chk) == {"election-safety"}


# --- vote safety -----------------------------------------------------------------------------------------


def test_vote_safety_allows_one_vote_per_term_and_ignores_pre_votes_and_refusals() -> None:
    chk = checkers()
    chk.message_sent(vote("c", "a", 2, pre_vote=True))
    chk.message_sent(vote("c", "b", 2, pre_vote=True))  # pre-votes are not votes
    chk.message_sent(vote("c", "a", 2))
    chk.message_sent(vote("c", "a", 2))  # the same vote, sent again
    chk.message_sent(vote("c", "b", 2, granted=False))
    chk.message_sent(vote("c", "b", 3))  # a new term, a new vote
    assert chk.violations == []


def test_vote_safety_flags_two_votes_in_one_term() -> None:
    chk = checkers()
    chk.message_sent(vote("c", "a", 2))
    chk.message_sent(vote("c", "b", 2))
    assert names(chk) == {"vote-safety"}


# --- leader append-only ----------------------------------------------------------------------------------


def test_leader_append_only_allows_a_leader_to_append() -> None:
    chk = checkers()
    a = core("a", log_of(1, 1), term=2)
    elect(chk, a)
    append(chk, a, entry(4, 2), entry(5, 2))
    append(chk, a, entry(6, 2))
    assert chk.violations == []


def test_leader_append_only_allows_a_new_leader_to_have_its_log_overwritten_as_follower() -> None:
    chk = checkers()
    a = core("a", log_of(1, 1), term=2)
    elect(chk, a)
    a.role, a.term = Role.FOLLOWER, 3  # deposed; the leader of term 3 replaces a's entry 3
    append(chk, a, entry(3, 3))
    assert chk.violations == []


def test_leader_append_only_flags_a_leader_overwriting_its_own_entries() -> None:
    chk = checkers()
    a = core("a", log_of(1, 1, 1), term=3)  # entries 2 and 3 of term 1 are not committed
    elect(chk, a, noop=False)
    append(chk, a, entry(2, 3))  # the leader replaces its own entries 2 and 3
    assert names(chk) == {"leader-append-only"}


def test_leader_append_only_flags_a_leader_deleting_entries_across_two_readies() -> None:
    chk = checkers()
    a = core("a", log_of(1, 1, 1), term=3)
    elect(chk, a, noop=False)
    del a.log.entries[1:]  # the leader drops its entries 2 and 3 ...
    chk.persisted("a", a, ready())  # ... reports an empty Ready (every Ready cycle calls persisted) ...
    append(chk, a, entry(2, 3))  # ... and then appends over where they were
    assert names(chk) == {"leader-append-only"}


# --- log matching ----------------------------------------------------------------------------------------


def test_log_matching_allows_identical_entries_on_two_members() -> None:
    chk = checkers()
    append(chk, core("a", [], term=2), *log_of(1, 2))
    append(chk, core("b", [], term=2), *log_of(1, 2))
    append(chk, core("c", [], term=2), *log_of(1, 1))  # a different entry at index 2 is another term's entry
    assert chk.violations == []


def test_log_matching_flags_two_commands_at_the_same_index_and_term() -> None:
    chk = checkers()
    append(chk, core("a", [], term=2), entry(1, 1), entry(2, 2, b"x"))
    append(chk, core("b", [], term=2), entry(1, 1), entry(2, 2, b"y"))
    assert names(chk) == {"log-matching"}


def test_log_matching_flags_the_same_entry_after_different_histories() -> None:
    chk = checkers()
    append(chk, core("a", [], term=3), entry(1, 1), entry(2, 3, b"x"))
    append(chk, core("b", [], term=3), entry(1, 2), entry(2, 3, b"x"))  # same entry 2, predecessor of term 2
    assert names(chk) == {"log-matching"}


# --- leader completeness ---------------------------------------------------------------------------------


def committed_in_term_2(chk: RaftCheckers) -> None:
    """Leader a of term 2 commits its no-op at index 2."""
    a = core("a", log_of(1), term=2)
    elect(chk, a)
    commit(chk, a, 2)


def test_leader_completeness_allows_a_later_leader_holding_every_committed_entry() -> None:
    chk = checkers()
    committed_in_term_2(chk)
    elect(chk, core("b", [entry(1, 1), Entry(2, 2, EntryKind.NOOP)], term=3))
    assert chk.violations == []


def test_leader_completeness_flags_a_later_leader_missing_a_committed_entry() -> None:
    chk = checkers()
    committed_in_term_2(chk)
    elect(chk, core("b", log_of(1), term=3), noop=False)
    assert names(chk) == {"leader-completeness"}


def test_leader_completeness_flags_a_later_leader_with_another_entry_at_a_committed_index() -> None:
    chk = checkers()
    committed_in_term_2(chk)
    elect(chk, core("b", log_of(1, 1), term=3), noop=False)
    assert names(chk) == {"leader-completeness"}


# --- state machine safety --------------------------------------------------------------------------------


def test_state_machine_safety_allows_members_applying_the_same_entries() -> None:
    chk = checkers()
    for node_id in ("a", "b", "c"):
        for e in log_of(1, 2):
            chk.applied(node_id, e)
    assert chk.violations == []


def test_state_machine_safety_flags_different_entries_applied_at_one_index() -> None:
    chk = checkers()
    chk.applied("a", entry(1, 1))
    chk.applied("b", entry(1, 2))
    assert names(chk) == {"state-machine-safety"}


def test_state_machine_safety_flags_different_commands_of_one_term_applied_at_one_index() -> None:
    chk = checkers()
    chk.applied("a", entry(1, 1, b"x"))
    chk.applied("b", entry(1, 1, b"y"))
    assert names(chk) == {"state-machine-safety"}


def test_state_machine_safety_allows_restoring_a_snapshot_of_what_was_applied() -> None:
    chk = checkers()
    for e in log_of(1, 2):
        chk.applied("a", e)
    chk.restored("b", snapshot_at(2, 2))
    chk.restored("c", snapshot_at(3, 2))  # beyond anything applied yet
    assert chk.violations == []


def test_state_machine_safety_flags_restoring_a_snapshot_of_another_history() -> None:
    chk = checkers()
    for e in log_of(1, 2):
        chk.applied("a", e)
    chk.restored("b", snapshot_at(2, 1))
    assert names(chk) == {"state-machine-safety"}


@pytest.mark.xfail(
    strict=True,
    reason="restored() only compares a snapshot with applied_at and never records it there, so an entry applied "
    "after the snapshot was restored is not compared with it",
)
def test_state_machine_safety_flags_applying_against_an_earlier_restored_snapshot() -> None:
    chk = checkers()
    chk.restored("b", snapshot_at(2, 2))
    chk.applied("a", entry(1, 1))
    chk.applied("a", entry(2, 1))  # index 2 is term 2 in b's state machine
    assert names(chk) == {"state-machine-safety"}


def test_state_machine_safety_flags_two_members_committing_different_entries() -> None:
    chk = checkers()
    committed_in_term_2(chk)
    b = core("b", [], term=3)
    append(chk, b, *log_of(1, 1))
    commit(chk, b, 2)  # b commits term 1 at index 2, where a committed its term-2 no-op
    assert names(chk) == {"state-machine-safety"}


# --- leader commitment rule ------------------------------------------------------------------------------


def test_leader_commit_rule_allows_committing_an_earlier_term_through_an_own_entry() -> None:
    chk = checkers()
    a = core("a", log_of(1, 2), term=3)
    elect(chk, a)  # the no-op of term 3 at index 3
    commit(chk, a, 3)  # commits index 2 (term 2) along with it
    assert chk.violations == []


def test_leader_commit_rule_flags_committing_an_earlier_terms_entry_by_counting_replicas() -> None:
    chk = checkers()
    a = core("a", log_of(1, 2), term=3)
    elect(chk, a)
    commit(chk, a, 2)  # Figure 8: index 2 is of term 2
    assert names(chk) == {"leader-commit-rule"}


@pytest.mark.xfail(
    strict=True,
    reason="_check_commit_rule returns early for any Ready with a soft_state, and _record_commits then raises "
    "commit_seen past the index, so a commit made in the same Ready that reports the election is never checked",
)
def test_leader_commit_rule_flags_an_earlier_terms_commit_in_the_election_ready() -> None:
    chk = checkers()
    a = core("a", log_of(1, 2), term=3)
    a.role, a.leader_id = Role.LEADER, "a"
    a.log.commit_to(2)  # committed on election, before any entry of term 3 exists
    election = ready(hard_state=HardState(3, "a", 2), soft_state=SoftState(Role.LEADER, "a", 3))
    chk.persisted("a", a, election)
    assert names(chk) == {"leader-commit-rule"}


# --- acknowledged durability -----------------------------------------------------------------------------


def test_acknowledged_durability_allows_a_crash_that_keeps_acknowledged_entries() -> None:
    chk = checkers()
    chk.message_sent(ack("b", "a", 2, 3))
    chk.crashed("b", PersistentState(HardState(2, "a", 1), None, tuple(log_of(1, 2, 2))))
    assert chk.violations == []


def test_acknowledged_durability_allows_a_later_leader_replacing_acknowledged_entries() -> None:
    chk = checkers()
    chk.message_sent(ack("b", "a", 2, 3))
    chk.crashed("b", PersistentState(HardState(3, "c", 1), None, tuple(log_of(1, 3))))
    assert chk.violations == []


def test_acknowledged_durability_allows_acknowledged_entries_compacted_into_a_snapshot() -> None:
    chk = checkers()
    chk.message_sent(ack("b", "a", 2, 3))
    chk.crashed("b", PersistentState(HardState(2, "a", 3), snapshot_at(3, 2), ()))
    assert chk.violations == []


def test_acknowledged_durability_flags_a_crash_losing_acknowledged_entries() -> None:
    chk = checkers()
    chk.message_sent(ack("b", "a", 2, 3))
    chk.crashed("b", PersistentState(HardState(2, "a", 1), None, tuple(log_of(1, 2))))
    assert names(chk) == {"acknowledged-durability"}


def test_acknowledged_durability_flags_a_crash_losing_the_acknowledged_term() -> None:
    chk = checkers()
    chk.message_sent(ack("b", "a", 2, 3))
    chk.crashed("b", PersistentState(HardState(1, None, 1), None, tuple(log_of(1, 2, 2))))
    assert names(chk) == {"acknowledged-durability"}


@pytest.mark.xfail(
    strict=True,
    reason="crashed() compares only the durable log's length and last term with the acknowledgement, not the "
    "term at the acknowledged index, so a crash that reverts to an older, longer log of stale entries is missed",
)
def test_acknowledged_durability_flags_a_crash_reverting_to_an_older_longer_log() -> None:
    chk = checkers()
    # b held 1@1 2@1 3@1 4@1 from the leader of term 1; the leader of term 2 replaced them from index 2 and
    # b acknowledged index 3 in term 2. The crash loses that write: the old entries of term 1 are back.
    chk.message_sent(ack("b", "a", 2, 3))
    chk.crashed("b", PersistentState(HardState(2, "a", 1), None, tuple(log_of(1, 1, 1, 1))))
    assert names(chk) == {"acknowledged-durability"}
