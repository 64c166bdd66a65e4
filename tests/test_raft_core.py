"""The core's contract with its driver (Ready/advance, restart, determinism), ReadIndex (§6.4) and
leadership transfer (§3.10), on cores driven by hand."""

from __future__ import annotations

import random

import pytest

from graft_trio.raft import (
    CoreConfig,
    EntryKind,
    HardState,
    MembershipChangeError,
    NotLeaderError,
    RaftCore,
    ReadState,
    Role,
)
from graft_trio.raft.messages import (
    AppendEntries,
    ForwardProposal,
    Heartbeat,
    HeartbeatResponse,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    TimeoutNow,
)
from tests.raft_cluster import CoreCluster, membership_of

ABC = ["a", "b", "c"]


# --- Ready and advance ------------------------------------------------------------------------------------


def test_config_requires_heartbeat_shorter_than_election_timeout() -> None:
    with pytest.raises(ValueError):
        CoreConfig(election_ticks=2, heartbeat_ticks=2)
    with pytest.raises(ValueError):
        CoreConfig(heartbeat_ticks=0)


def test_founding_members_bootstrap_the_identical_first_entry() -> None:
    membership = membership_of(ABC)
    first = RaftCore.bootstrap_entries(membership)
    assert first == RaftCore.bootstrap_entries(membership_of(list(reversed(ABC))))
    hard_state, entries = first
    assert hard_state.commit == 1 and entries[0].index == 1 and entries[0].membership == membership


def test_idle_core_has_no_ready_after_the_first_one() -> None:
    c = CoreCluster(ABC)
    a = c["a"]
    c.flush("a")
    assert not a.has_ready()


def test_ready_carries_the_entries_to_persist_with_the_messages_that_depend_on_them() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    a.propose(b"x", "")
    ready = a.ready()
    assert [e.data for e in ready.entries] == [b"x"]
    appends = [m for m in ready.messages if isinstance(m, AppendEntries)]
    assert {m.target for m in appends} == {"b", "c"}
    a.advance(ready)
    assert not a.ready().entries  # persisted entries are not handed out again


def test_committed_entries_are_handed_out_once_in_order() -> None:
    c = CoreCluster(ABC)
    c.elect("a")
    for i in range(4):
        c.propose("a", f"x{i}".encode())
    indexes = [e.index for e in c.applied_entries["b"]]
    assert indexes == list(range(1, c["b"].log.committed + 1))


def test_soft_state_is_reported_when_role_leader_or_term_change() -> None:
    c = CoreCluster(ABC)
    a = c["a"]
    c.flush_all()
    a.campaign_now()
    ready = a.ready()
    assert ready.soft_state is not None and ready.soft_state.role is Role.PRE_CANDIDATE
    a.advance(ready)
    assert a.ready().soft_state is None


def test_core_ignores_messages_addressed_to_another_member() -> None:
    c = CoreCluster(ABC)
    b = c["b"]
    c.flush("b")
    b.step(RequestVote("a", "c", 5, 1, 1))
    assert b.term == 1 and not b.has_ready()


def test_restarted_member_replays_committed_entries_and_keeps_its_term_and_vote() -> None:
    c = CoreCluster(ABC)
    c.elect("a")
    for i in range(3):
        c.propose("a", f"x{i}".encode())
    c.tick(times=c.config.heartbeat_ticks)
    term, vote, committed = c["b"].term, c["b"].vote, c["b"].log.committed
    c.crash("b")
    b = c.restart("b")
    assert (b.term, b.vote, b.log.committed) == (term, vote, committed)
    c.flush("b")
    assert c.applied["b"] == [b"x0", b"x1", b"x2"]


def test_same_seed_gives_the_same_run() -> None:
    def run(seed: int) -> list[object]:
        c = CoreCluster(["a", "b", "c", "d", "e"], seed=seed)
        rng = random.Random(seed)
        c.drop = lambda _m: rng.random() < 0.1
        for step in range(120):
            c.tick()
            for leader in c.leaders():
                c[leader].propose(str(step).encode(), "")
        return list(c.delivered)

    assert run(3) == run(3)
    assert run(3) != run(4)


# --- ReadIndex -------------------------------------------------------------------------------------------


def test_leader_releases_a_read_only_after_a_quorum_confirms_its_leadership() -> None:
    c = CoreCluster(["a", "b", "c", "d", "e"])
    a = c.elect("a")
    c.tick(times=c.config.heartbeat_ticks)
    a.read_index(7)
    c.flush("a")
    rounds = [m for m in c.queue if isinstance(m, Heartbeat) and m.read_context]
    assert {m.target for m in rounds} == {"b", "c", "d", "e"}
    c.deliver_matching(lambda m: isinstance(m, Heartbeat) and m.target == "b")
    c.deliver_matching(lambda m: isinstance(m, HeartbeatResponse) and m.source == "b")
    assert c.read_states["a"] == []  # a and b are two of five
    c.deliver_matching(lambda m: isinstance(m, Heartbeat) and m.target == "c")
    c.deliver_matching(lambda m: isinstance(m, HeartbeatResponse) and m.source == "c")
    assert c.read_states["a"] == [ReadState(7, a.log.committed)]
    c.deliver()
    assert c.read_states["a"] == [ReadState(7, a.log.committed)]  # released once


def test_read_index_is_the_commit_index_when_the_read_was_asked() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    c.propose("a", b"x")
    asked_at = a.log.committed
    a.read_index(1)
    a.propose(b"later", "")  # commits while the read is being confirmed
    c.deliver()
    assert c.read_states["a"] == [ReadState(1, asked_at)]


def test_new_leader_serves_reads_only_after_committing_an_entry_of_its_term() -> None:
    c = CoreCluster(ABC)
    a = c["a"]
    a.campaign_now()
    while a.role is not Role.LEADER:
        assert c.deliver_one() is not None
    a.read_index(1)
    assert a.log.committed < a.log.last_index  # the no-op is not committed yet
    c.flush("a")
    assert not [m for m in c.queue if isinstance(m, Heartbeat) and m.read_context]
    c.deliver()
    assert c.read_states["a"] == [ReadState(1, a.log.last_index)]


def test_isolated_old_leader_never_releases_a_read() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    c.isolate("a")
    a.read_index(1)
    c.tick(times=5 * c.config.election_ticks)
    assert c.read_states["a"] == []
    assert any(c[n].role is Role.LEADER for n in "bc")
    c.heal()
    c.tick(times=5)
    assert c.read_states["a"] == []
    assert a.role is Role.FOLLOWER


def test_leader_in_a_minority_partition_never_releases_a_read() -> None:
    c = CoreCluster(["a", "b", "c", "d", "e"], config=CoreConfig(check_quorum=False))
    a = c.elect("a")
    c.partition(["a", "b"], ["c", "d", "e"])
    a.read_index(1)
    c.tick(["a", "b"], times=5 * c.config.election_ticks)
    assert a.role is Role.LEADER  # without CheckQuorum it keeps believing it leads
    assert c.read_states["a"] == []


def test_a_later_confirmed_round_releases_earlier_reads_in_order() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    c.tick(times=c.config.heartbeat_ticks)
    c.drop = lambda m: isinstance(m, HeartbeatResponse) and m.read_context == 1  # round 1 answers are lost
    a.read_index(10)
    c.deliver()
    assert c.read_states["a"] == []
    c.drop = None
    a.read_index(11)
    c.deliver()
    assert [r.context for r in c.read_states["a"]] == [10, 11]


def test_follower_read_is_confirmed_by_the_leader_and_carries_its_commit_index() -> None:
    c = CoreCluster(ABC)
    c.elect("a")
    c.propose("a", b"x")
    b = c["b"]
    b.read_index(42)
    assert c.queued(ReadIndexRequest, source="b", target="a")
    c.deliver()
    assert c.read_states["b"] == [ReadState(42, c["a"].log.committed)]
    assert c.messages_of(ReadIndexResponse, source="a", target="b")


def test_read_index_with_no_known_leader_raises_not_leader() -> None:
    c = CoreCluster(ABC)
    with pytest.raises(NotLeaderError):
        c["a"].read_index(1)


def test_single_voter_leader_serves_a_read_at_once() -> None:
    c = CoreCluster(["a"])
    a = c.elect("a")
    a.read_index(3)
    c.flush("a")
    assert c.read_states["a"] == [ReadState(3, a.log.committed)]


# --- leadership transfer ------------------------------------------------------------------------------------


def test_transfer_to_an_up_to_date_follower_sends_timeout_now_and_it_wins_at_once() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    term = a.term
    c.tick(times=1)  # within the followers' lease: only a transfer vote is granted now
    a.transfer_leadership("b")
    assert c.queued(TimeoutNow, source="a", target="b")
    c.deliver()
    assert c["b"].role is Role.LEADER and c["b"].term == term + 1
    assert a.role is Role.FOLLOWER and a.leader_id == "b"
    votes = [m for m in c.messages_of(RequestVote, source="b") if isinstance(m, RequestVote)]
    assert votes and all(m.transfer and not m.pre_vote for m in votes)


def test_transfer_to_a_lagging_follower_first_brings_it_up_to_date() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    c.isolate("b")
    for i in range(5):
        c.propose("a", f"x{i}".encode())
    c.heal()
    a.transfer_leadership("b")
    assert not c.queued(TimeoutNow)
    c.tick(times=c.config.heartbeat_ticks)
    assert c["b"].role is Role.LEADER
    assert c.applied["b"][:5] == [f"x{i}".encode() for i in range(5)]


def test_leader_refuses_proposals_while_a_transfer_is_under_way() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    c.isolate("b")  # the transfer cannot finish
    a.transfer_leadership("b")
    with pytest.raises(NotLeaderError) as info:
        a.propose(b"x", "")
    assert info.value.leader_id == "b"
    with pytest.raises(NotLeaderError):
        a.propose_membership(membership_of(ABC), "")
    before = a.log.last_index
    a.step(ForwardProposal("c", "a", a.term, b"forwarded", "rid"))
    assert a.log.last_index == before


def test_transfer_that_does_not_finish_in_an_election_timeout_is_abandoned() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    c.isolate("b")
    a.transfer_leadership("b")
    c.tick(["a", "c"], times=c.config.election_ticks)
    assert a.role is Role.LEADER and a.transfer_target is None
    assert a.propose(b"x", "") is not None


def test_transfer_needs_a_voter_target_and_the_leader() -> None:
    c = CoreCluster(ABC, learners=["d"])
    a = c.elect("a")
    with pytest.raises(MembershipChangeError):
        a.transfer_leadership("d")
    with pytest.raises(MembershipChangeError):
        a.transfer_leadership("zz")
    a.transfer_leadership("a")  # to itself: nothing to do
    assert a.transfer_target is None and a.role is Role.LEADER
    with pytest.raises(NotLeaderError) as info:
        c["b"].transfer_leadership("c")
    assert info.value.leader_id == "a"


def test_timeout_now_makes_a_follower_campaign_without_pre_vote() -> None:
    c = CoreCluster(ABC)
    c.elect("a")
    b = c["b"]
    term = b.term
    b.step(TimeoutNow("a", "b", term))
    assert b.role is Role.CANDIDATE and b.term == term + 1


def test_new_leader_after_transfer_has_every_committed_entry() -> None:
    c = CoreCluster(ABC)
    c.elect("a")
    for i in range(3):
        c.propose("a", f"x{i}".encode())
    c["a"].transfer_leadership("c")
    c.deliver()
    c.propose("c", b"after")
    kinds = [e.kind for e in c["c"].log.entries]
    assert kinds.count(EntryKind.NOOP) == 2
    assert all(c.applied[n] == [b"x0", b"x1", b"x2", b"after"] for n in ABC)


def test_hard_state_restart_does_not_lose_the_term() -> None:
    c = CoreCluster(ABC, logs={"a": (HardState(5, "b", 1), RaftCore.bootstrap_entries(membership_of(ABC))[1])})
    assert c["a"].term == 5 and c["a"].vote == "b"
