"""Leader election (Raft §5.2, §5.4.1), PreVote (§9.6) and CheckQuorum (§6.2), on cores driven by hand."""

from __future__ import annotations

import random

import pytest

from graft_trio.raft import CoreConfig, HardState, RaftCore, Role
from graft_trio.raft.log import RaftLog
from graft_trio.raft.messages import (
    AppendEntriesResponse,
    Heartbeat,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
)
from tests.raft_cluster import CoreCluster, SafetyViolation, entries_with_terms, membership_of, role

ABC = ["a", "b", "c"]
NO_PRE_VOTE = CoreConfig(pre_vote=False)
PLAIN = CoreConfig(pre_vote=False, check_quorum=False)


def timeout_ticks(core: RaftCore) -> int:
    return core.randomized_election_timeout


# --- §5.2: a follower that times out campaigns -----------------------------------------------------------


def test_follower_that_times_out_becomes_pre_candidate_without_changing_its_term() -> None:
    c = CoreCluster(["a", "b", "c"])
    a = c["a"]
    for _ in range(timeout_ticks(a) - 1):
        a.tick()
    assert a.role is Role.FOLLOWER
    a.tick()
    assert role(a) is Role.PRE_CANDIDATE
    assert a.term == 1 and a.vote is None
    requests = c.queued(RequestVote, source="a")
    assert sorted(m.target for m in requests) == ["b", "c"]
    assert all(isinstance(m, RequestVote) and m.pre_vote and m.term == 2 for m in requests)


def test_without_pre_vote_a_follower_that_times_out_becomes_candidate_and_votes_for_itself() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    a = c["a"]
    for _ in range(timeout_ticks(a)):
        a.tick()
    assert a.role is Role.CANDIDATE
    assert (a.term, a.vote) == (2, "a")
    requests = c.queued(RequestVote, source="a")
    assert sorted(m.target for m in requests) == ["b", "c"]
    assert all(isinstance(m, RequestVote) and not m.pre_vote and m.term == 2 for m in requests)


def test_candidate_persists_its_term_and_vote_in_the_ready_that_sends_its_requests() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    a = c["a"]
    a.campaign_now()
    ready = a.ready()
    assert ready.hard_state is not None and (ready.hard_state.term, ready.hard_state.vote) == (2, "a")
    assert any(isinstance(m, RequestVote) for m in ready.messages)


def test_voter_persists_its_vote_in_the_ready_that_grants_it() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    b = c["b"]
    b.step(RequestVote("a", "b", 2, 1, 1))
    ready = b.ready()
    assert ready.hard_state is not None and (ready.hard_state.term, ready.hard_state.vote) == (2, "a")
    assert [m for m in ready.messages if isinstance(m, RequestVoteResponse) and m.granted]


@pytest.mark.parametrize("size", [1, 3, 5])
def test_candidate_with_votes_from_a_majority_becomes_leader(size: int) -> None:
    ids = [f"n{i}" for i in range(size)]
    c = CoreCluster(ids)
    # Cut the candidate off from a minority: it still reaches a majority.
    for lost in ids[size // 2 + 1 :]:
        c.cut.add(("n0", lost))
    leader = c.elect("n0")
    assert leader.term == 2
    for node_id in ids[1 : size // 2 + 1]:
        assert c[node_id].vote == "n0"
        assert c[node_id].leader_id == "n0"


def test_candidate_without_a_majority_does_not_become_leader() -> None:
    c = CoreCluster(["a", "b", "c", "d", "e"], config=NO_PRE_VOTE)
    c.partition(["a", "b"], ["c", "d", "e"])
    c["a"].campaign_now()
    c.deliver()
    assert c["a"].role is Role.CANDIDATE
    assert c["b"].vote == "a"
    assert not c.leaders()


def test_candidate_rejected_by_a_majority_returns_to_follower() -> None:
    membership = membership_of(["a", "b", "c"])
    longer = (HardState(3, None, 1), entries_with_terms([3, 3], membership))
    c = CoreCluster(["a", "b", "c"], logs={"b": longer, "c": longer})
    c["a"].campaign_now()
    c.deliver()
    assert c["a"].role is Role.FOLLOWER
    assert c["a"].term == 3  # learned from the rejections


def test_voter_grants_at_most_one_vote_per_term() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    b = c["b"]
    b.step(RequestVote("a", "b", 2, 1, 1))
    b.step(RequestVote("c", "b", 2, 1, 1))
    b.step(RequestVote("a", "b", 2, 1, 1))  # a retry by the same candidate is granted again
    responses = [m for m in c.queued(RequestVoteResponse, source="b") if isinstance(m, RequestVoteResponse)]
    assert [(m.target, m.granted) for m in responses] == [("a", True), ("c", False), ("a", True)]
    assert b.vote == "a"


def test_vote_survives_a_restart() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    c["b"].step(RequestVote("a", "b", 2, 1, 1))
    c.flush("b")
    c.crash("b")
    b = c.restart("b")
    assert (b.term, b.vote) == (2, "a")
    b.step(RequestVote("c", "b", 2, 1, 1))
    responses = [m for m in c.queued(RequestVoteResponse, source="b", target="c")]
    assert len(responses) == 1 and isinstance(responses[0], RequestVoteResponse) and not responses[0].granted


def test_elections_elect_exactly_one_leader_when_everyone_ticks() -> None:
    for seed in range(10):
        c = CoreCluster(["a", "b", "c", "d", "e"], seed=seed)
        c.tick_until(lambda c=c: bool(c.leaders()), max_ticks=200)  # type: ignore[misc]
        assert len(c.leaders()) == 1
        leader = c.leader()
        c.tick(times=3)
        assert all(core.leader_id == leader.id for core in c.cores.values())


def test_at_most_one_leader_per_term_under_message_loss_and_crashes() -> None:
    # The cluster's checker raises SafetyViolation on a second leader in a term, or on two members
    # applying different entries at one index.
    for seed in range(30):
        rng = random.Random(seed)
        ids = ["a", "b", "c", "d", "e"]
        c = CoreCluster(ids, seed=seed, config=CoreConfig(election_ticks=5, heartbeat_ticks=1))
        c.drop = lambda _message, rng=rng: rng.random() < 0.2
        for step in range(150):
            live = list(c.cores)
            c.tick([n for n in live if rng.random() < 0.8])
            if rng.random() < 0.05 and len(live) > 3:
                c.crash(rng.choice(live))
            for down in [n for n in ids if n not in c.cores]:
                if rng.random() < 0.1:
                    c.restart(down)
            for leader in c.leaders():
                if rng.random() < 0.3:
                    c[leader].propose(f"{seed}/{step}".encode(), "")
        assert len({term for term in c.leaders_by_term}) == len(c.leaders_by_term)
        assert c.leaders_by_term  # somebody led at some point


def test_safety_checker_catches_two_leaders_in_one_term(monkeypatch: pytest.MonkeyPatch) -> None:
    # A planted bug: every candidate believes one vote is a majority.
    monkeypatch.setattr(RaftCore, "quorum", lambda self: 1)
    c = CoreCluster(["a", "b", "c"], config=PLAIN)
    c["a"].campaign_now()
    c["b"].campaign_now()
    with pytest.raises(SafetyViolation, match="two leaders in term 2"):
        c.deliver()


def test_randomized_election_timeout_is_in_election_ticks_to_twice_election_ticks() -> None:
    config = CoreConfig(election_ticks=10)
    seen: set[int] = set()
    for seed in range(200):
        c = CoreCluster(["a", "b", "c"], seed=seed, config=config)
        for core in c.cores.values():
            assert 10 <= core.randomized_election_timeout < 20
            seen.add(core.randomized_election_timeout)
    assert seen == set(range(10, 20))


def test_election_timeout_is_randomized_again_at_each_campaign() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    c.isolate("a")
    timeouts = set()
    for _ in range(30):
        c.tick(["a"], times=timeout_ticks(c["a"]))
        assert c["a"].role is Role.CANDIDATE
        timeouts.add(c["a"].randomized_election_timeout)
    assert len(timeouts) > 3


# --- stepping down ---------------------------------------------------------------------------------------


def test_candidate_steps_down_on_a_message_of_a_higher_term() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    a = c["a"]
    a.campaign_now()
    c.flush("a")
    a.step(RequestVoteResponse("b", "a", 7, False))
    assert (a.role, a.term, a.vote) == (Role.FOLLOWER, 7, None)


def test_candidate_steps_down_on_an_append_from_a_leader_of_its_term() -> None:
    c = CoreCluster(["a", "b", "c"], config=NO_PRE_VOTE)
    c["a"].campaign_now()
    c["b"].campaign_now()
    assert c["a"].term == c["b"].term == 2
    c.deliver()  # c hears from a first and votes for it
    assert c["a"].role is Role.LEADER
    assert c["b"].role is Role.FOLLOWER and c["b"].leader_id == "a" and c["b"].term == 2


def test_leader_steps_down_when_a_follower_answers_with_a_higher_term() -> None:
    c = CoreCluster(["a", "b", "c"])
    leader = c.elect("a")
    leader.step(AppendEntriesResponse("b", "a", 9, False, 0))
    assert (leader.role, leader.term, leader.leader_id) == (Role.FOLLOWER, 9, None)


def test_member_with_a_higher_term_rejects_a_stale_leader_and_tells_it_its_term() -> None:
    c = CoreCluster(["a", "b", "c"])
    c.elect("a")
    c.isolate("a")
    c.tick_until(lambda: any(c[n].role is Role.LEADER for n in "bc"))
    c.heal()
    assert c["a"].role is Role.LEADER  # still believes it leads, in the old term
    old_term = c["a"].term
    c.tick(["a"], times=c.config.heartbeat_ticks)
    assert role(c["a"]) is Role.FOLLOWER and c["a"].term > old_term


# --- §5.4.1: the voting restriction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("voter_terms", "candidate_terms", "granted"),
    [
        ([2, 2], [2, 2], True),  # same log
        ([2, 2], [2, 2, 2], True),  # longer, same last term
        ([2, 2], [3], True),  # shorter, but a higher last term
        ([2, 3], [2, 2, 2, 2], False),  # longer, but a lower last term
        ([2, 2, 2], [2, 2], False),  # same last term, shorter
    ],
)
def test_voter_grants_only_a_candidate_whose_log_is_at_least_as_up_to_date(
    voter_terms: list[int], candidate_terms: list[int], granted: bool
) -> None:
    membership = membership_of(["a", "b", "c"])
    c = CoreCluster(
        ["a", "b", "c"],
        config=NO_PRE_VOTE,
        logs={
            "a": (HardState(3, None, 1), entries_with_terms(candidate_terms, membership)),
            "b": (HardState(3, None, 1), entries_with_terms(voter_terms, membership)),
        },
    )
    c.cut.add(("a", "c"))
    c["a"].campaign_now()
    c.deliver()
    responses = [m for m in c.messages_of(RequestVoteResponse, source="b") if isinstance(m, RequestVoteResponse)]
    assert [m.granted for m in responses] == [granted]
    assert (c["a"].role is Role.LEADER) == granted


def test_candidate_with_a_less_up_to_date_log_cannot_win() -> None:
    membership = membership_of(["a", "b", "c", "d", "e"])
    ahead = (HardState(2, None, 1), entries_with_terms([2, 2, 2], membership))
    behind = (HardState(2, None, 1), entries_with_terms([2], membership))
    c = CoreCluster(
        ["a", "b", "c", "d", "e"],
        config=NO_PRE_VOTE,
        logs={"a": behind, "b": behind, "c": ahead, "d": ahead, "e": ahead},
    )
    c["a"].campaign_now()
    c.deliver()
    assert c["a"].role is not Role.LEADER
    assert not c.leaders()
    # One of the up-to-date members can win.
    c.elect("c")


def test_pre_vote_also_applies_the_voting_restriction() -> None:
    membership = membership_of(["a", "b", "c"])
    ahead = (HardState(2, None, 1), entries_with_terms([2, 2], membership))
    c = CoreCluster(["a", "b", "c"], logs={"b": ahead, "c": ahead})
    c["a"].campaign_now()
    c.deliver()
    assert c["a"].role is Role.FOLLOWER and c["a"].term == 2  # never even became a candidate
    assert c["b"].vote is None and c["c"].vote is None


@pytest.mark.parametrize(
    ("last_index", "last_term", "expected"),
    [(5, 3, True), (6, 3, True), (4, 3, False), (1, 4, True), (9, 2, False)],
)
def test_log_is_up_to_date_compares_last_term_then_length(last_index: int, last_term: int, expected: bool) -> None:
    membership = membership_of(["a"])
    log = RaftLog(SnapshotMeta(), entries_with_terms([2, 3, 3, 3], membership), 0)
    assert (log.last_index, log.last_term) == (5, 3)
    assert log.is_up_to_date(last_index, last_term) is expected


# --- PreVote ---------------------------------------------------------------------------------------------


def test_partitioned_member_rejoining_does_not_disrupt_the_term() -> None:
    c = CoreCluster(["a", "b", "c"])
    c.elect("a")
    term = c["a"].term
    c.isolate("c")
    c.tick(times=100)  # c times out again and again, but its pre-votes go nowhere
    assert c["c"].term == term
    c.heal()
    c.tick(times=5)
    assert c["a"].role is Role.LEADER and c["a"].term == term
    assert all(core.term == term and core.leader_id == "a" for core in c.cores.values())


def test_without_pre_vote_or_check_quorum_a_rejoining_member_does_disrupt_the_term() -> None:
    # The counterpart of the test above: the scenario it protects against is real.
    c = CoreCluster(["a", "b", "c"], config=PLAIN)
    c.elect("a")
    term = c["a"].term
    c.isolate("c")
    c.tick(times=100)
    assert c["c"].term > term
    c.heal()
    c.tick(times=5)
    assert c["a"].term > term


def test_pre_candidate_that_wins_the_pre_vote_campaigns_for_real() -> None:
    c = CoreCluster(["a", "b", "c"])
    a = c["a"]
    a.campaign_now()
    assert a.role is Role.PRE_CANDIDATE
    c.deliver()
    assert role(a) is Role.LEADER and a.term == 2
    pre = [m for m in c.messages_of(RequestVote, source="a") if isinstance(m, RequestVote) and m.pre_vote]
    real = [m for m in c.messages_of(RequestVote, source="a") if isinstance(m, RequestVote) and not m.pre_vote]
    assert pre and real


def test_pre_vote_grant_does_not_change_the_voters_term_or_vote() -> None:
    c = CoreCluster(["a", "b", "c"])
    b = c["b"]
    b.step(RequestVote("a", "b", 2, 1, 1, pre_vote=True))
    responses = c.queued(RequestVoteResponse, source="b")
    assert len(responses) == 1 and isinstance(responses[0], RequestVoteResponse) and responses[0].granted
    assert (b.term, b.vote) == (1, None)


# --- CheckQuorum ---------------------------------------------------------------------------------------------


def test_leader_that_loses_contact_with_a_quorum_steps_down_within_an_election_timeout() -> None:
    c = CoreCluster(["a", "b", "c", "d", "e"])
    leader = c.elect("a")
    c.tick(times=7)
    c.partition(["a", "b"], ["c", "d", "e"])
    ticks = c.tick_until(lambda: leader.role is not Role.LEADER, max_ticks=100)
    assert ticks <= 2 * c.config.election_ticks
    assert leader.role is Role.FOLLOWER and leader.leader_id is None


def test_leader_in_contact_with_a_quorum_keeps_leading() -> None:
    c = CoreCluster(["a", "b", "c", "d", "e"])
    leader = c.elect("a")
    term = leader.term
    c.partition(["a", "b", "c"], ["d", "e"])
    c.tick(times=10 * c.config.election_ticks)
    assert leader.role is Role.LEADER and leader.term == term


def test_without_check_quorum_an_isolated_leader_keeps_believing_it_leads() -> None:
    c = CoreCluster(["a", "b", "c"], config=CoreConfig(check_quorum=False))
    leader = c.elect("a")
    c.isolate("a")
    c.tick(["a"], times=10 * c.config.election_ticks)
    assert leader.role is Role.LEADER


def test_follower_that_heard_from_its_leader_recently_ignores_a_higher_term_request_vote() -> None:
    c = CoreCluster(["a", "b", "c"])
    c.elect("a")
    b = c["b"]
    term = b.term
    for pre_vote in (True, False):
        b.step(RequestVote("c", "b", term + 5, 99, term, pre_vote=pre_vote))
        assert (b.term, b.vote, b.leader_id) == (term, "a", "a")
    assert not c.queued(RequestVoteResponse, source="b")


def test_follower_in_lease_still_votes_for_a_leadership_transfer() -> None:
    c = CoreCluster(["a", "b", "c"])
    c.elect("a")
    b = c["b"]
    term = b.term
    b.step(RequestVote("c", "b", term + 1, c["a"].log.last_index, term, transfer=True))
    assert (b.term, b.vote) == (term + 1, "c")
    responses = c.queued(RequestVoteResponse, source="b")
    assert len(responses) == 1 and isinstance(responses[0], RequestVoteResponse) and responses[0].granted


def test_follower_that_has_not_heard_from_a_leader_for_an_election_timeout_accepts_a_higher_term() -> None:
    c = CoreCluster(["a", "b", "c"])
    c.elect("a")
    c.crash("a")
    b = c["b"]
    term = b.term
    for _ in range(c.config.election_ticks):
        b.election_elapsed += 1  # time passes with no word from the leader, short of b's own timeout
    b.step(RequestVote("c", "b", term + 1, 99, term))
    assert (b.term, b.vote) == (term + 1, "c")


def test_member_that_cannot_campaign_answers_votes_once_its_leader_has_been_silent_for_an_election_timeout() -> None:
    # d is a learner (or a voter that has not yet received its promotion): it never campaigns, but once
    # its leader is gone it must stop ignoring vote requests, or elections that need it stall.
    c = CoreCluster(ABC, learners=["d"])
    c.elect("a")
    c.crash("a")
    d = c["d"]
    c.flush("d")
    answered = []
    for _ in range(4 * c.config.election_ticks):
        d.tick()
        d.step(RequestVote("b", "d", d.term + 1, 99, d.term, pre_vote=True))
        ready = d.ready()
        answered.append(any(isinstance(m, RequestVoteResponse) for m in ready.messages))
        d.advance(ready)
    assert all(answered[2 * c.config.election_ticks :]), answered


def test_leader_keeps_its_term_when_a_partitioned_member_campaigns_with_pre_vote_and_check_quorum() -> None:
    # A member that cannot hear the leader but can reach the others (an asymmetric partition) does not
    # unseat a leader the others still hear from.
    c = CoreCluster(["a", "b", "c"])
    c.elect("a")
    term = c["a"].term
    c.cut.add(("a", "c"))
    c.tick(times=5 * c.config.election_ticks)
    assert c["a"].role is Role.LEADER and c["a"].term == term
    assert c["b"].term == term and c["b"].leader_id == "a"


def test_heartbeat_from_the_leader_resets_the_followers_election_timer() -> None:
    c = CoreCluster(["a", "b", "c"])
    c.elect("a")
    b = c["b"]
    b.election_elapsed = 5
    b.step(Heartbeat("a", "b", c["a"].term, 0))
    assert b.election_elapsed == 0
