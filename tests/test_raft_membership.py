"""Single-server membership changes (dissertation §4.1-4.2) and learners, on cores driven by hand."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio
import trio.testing

from graft_trio.raft import (
    Member,
    Membership,
    MembershipChangeError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    RaftNode,
    Role,
)
from graft_trio.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    MembershipRequest,
    Message,
    RequestVote,
    TimeoutNow,
)
from tests.kv import put
from tests.raft_cluster import CoreCluster, NodeCluster, membership_of, open_node_cluster, role

ABC = ["a", "b", "c"]


def with_member(membership: Membership, node_id: str, voter: bool = True) -> Membership:
    return membership.with_member(Member(node_id, f"addr-{node_id}", voter))


def elected(ids: list[str] = ABC, **kwargs: object) -> CoreCluster:
    c = CoreCluster(ids, **kwargs)  # type: ignore[arg-type]
    c.elect(ids[0])
    c.tick(times=c.config.heartbeat_ticks)  # everyone has committed the new leader's no-op
    return c


# --- the rules of a change ---------------------------------------------------------------------------------


def test_membership_change_takes_effect_on_the_leader_when_appended() -> None:
    c = elected(extra=["d"])
    a = c["a"]
    new = with_member(a.membership, "d", voter=False)
    index = a.propose_membership(new, "")
    assert a.membership == new and a.log.committed < index
    assert "d" in a.progress  # replication to the new member starts at once


def test_follower_adopts_a_membership_when_it_appends_it_before_it_is_committed() -> None:
    c = elected(extra=["d"])
    a = c["a"]
    new = with_member(a.membership, "d", voter=False)
    c.drop = lambda m: isinstance(m, AppendEntriesResponse)  # nothing can commit
    a.propose_membership(new, "")
    c.deliver()
    assert c["b"].membership == new and c["b"].log.committed < c["b"].log.membership_index


def test_only_one_membership_change_may_be_pending() -> None:
    c = elected(extra=["d", "e"])
    a = c["a"]
    c.isolate("a")  # the first change cannot commit
    a.propose_membership(with_member(a.membership, "d", voter=False), "")
    with pytest.raises(MembershipChangeError) as info:
        a.propose_membership(with_member(a.membership, "e", voter=False), "")
    assert info.value.retryable
    c.heal()
    c.tick(times=c.config.heartbeat_ticks)
    a.propose_membership(with_member(a.membership, "e", voter=False), "")  # now it may go
    c.deliver()
    assert set(a.membership.ids) == {"a", "b", "c", "d", "e"}


def test_membership_change_must_touch_exactly_one_member() -> None:
    c = elected()
    a = c["a"]
    two = with_member(with_member(a.membership, "d"), "e")
    with pytest.raises(MembershipChangeError) as info:
        a.propose_membership(two, "")
    assert not info.value.retryable
    with pytest.raises(MembershipChangeError):
        a.propose_membership(a.membership, "")  # no change at all


def test_membership_needs_a_voter() -> None:
    c = elected(["a"])
    a = c["a"]
    with pytest.raises(MembershipChangeError):
        a.propose_membership(Membership(), "")


def test_new_leader_must_commit_an_entry_of_its_term_before_changing_membership() -> None:
    c = CoreCluster(ABC, extra=["d"])
    a = c["a"]
    a.campaign_now()
    while a.role is not Role.LEADER:
        assert c.deliver_one() is not None
    with pytest.raises(MembershipChangeError) as info:
        a.propose_membership(with_member(a.membership, "d", voter=False), "")
    assert info.value.retryable
    c.deliver()
    a.propose_membership(with_member(a.membership, "d", voter=False), "")


def test_membership_change_is_made_on_the_leader() -> None:
    c = elected()
    with pytest.raises(NotLeaderError) as info:
        c["b"].propose_membership(with_member(c["b"].membership, "d"), "")
    assert info.value.leader_id == "a"


# --- adding members and learners -----------------------------------------------------------------------------


def test_new_member_with_an_empty_log_is_brought_up_to_date_as_a_learner() -> None:
    c = elected(extra=["d"])
    for i in range(5):
        c.propose("a", f"x{i}".encode())
    a = c["a"]
    a.propose_membership(with_member(a.membership, "d", voter=False), "")
    c.deliver()
    c.tick(times=c.config.heartbeat_ticks)
    assert c.log_ids("d") == c.log_ids("a")
    assert c.applied["d"] == [f"x{i}".encode() for i in range(5)]
    assert c["d"].membership.learners == ("d",)


def test_learner_does_not_campaign() -> None:
    c = elected(learners=["d"])
    c.isolate("d")
    c.tick(["d"], times=10 * c.config.election_ticks)
    assert c["d"].role is Role.FOLLOWER
    assert not c.queued(RequestVote, source="d")


def test_learner_does_not_campaign_on_timeout_now() -> None:
    c = elected(learners=["d"])
    c["d"].step(TimeoutNow("a", "d", c["a"].term))
    assert c["d"].role is Role.FOLLOWER


def test_votes_of_learners_do_not_count() -> None:
    c = CoreCluster(ABC, learners=["d", "e"])
    c.cut.update({("a", "b"), ("a", "c")})
    a = c["a"]
    a.campaign_now()
    c.deliver()
    # d and e would grant, but only b and c can make a majority of the voters {a, b, c}.
    assert a.role is not Role.LEADER


def test_learner_acks_do_not_count_towards_commitment() -> None:
    c = elected(learners=["d", "e"])
    c.isolate("b")
    c.isolate("c")
    c.cut.difference_update({("a", "d"), ("d", "a"), ("a", "e"), ("e", "a")})
    index = c.propose("a", b"x")
    assert c["d"].log.last_index == index
    assert index is not None and c["a"].log.committed < index


def test_promoted_learner_counts_towards_the_quorum() -> None:
    c = elected(learners=["d"])
    a = c["a"]
    a.propose_membership(with_member(a.membership, "d", voter=True), "")
    c.deliver()
    assert a.membership.voters == ("a", "b", "c", "d") and a.quorum() == 3
    c.isolate("b")
    c.isolate("c")
    c.cut.difference_update({("a", "d"), ("d", "a")})
    index = c.propose("a", b"x")
    assert index is not None and a.log.committed < index  # a and d are two of four
    c.cut.difference_update({("a", "b"), ("b", "a")})
    c.tick(times=c.config.heartbeat_ticks)
    c.propose("a", b"y")
    assert a.log.committed == a.log.last_index


def test_adding_a_voter_directly_is_a_single_server_change() -> None:
    c = elected(extra=["d"])
    a = c["a"]
    a.propose_membership(with_member(a.membership, "d", voter=True), "")
    c.deliver()
    c.tick(times=c.config.heartbeat_ticks)
    assert c["d"].membership.voters == ("a", "b", "c", "d")


def test_voter_can_be_demoted_to_learner() -> None:
    c = elected()
    a = c["a"]
    a.propose_membership(with_member(a.membership, "c", voter=False), "")
    c.deliver()
    assert a.membership.voters == ("a", "b") and a.membership.learners == ("c",)
    c.isolate("c")
    c.tick(["c"], times=10 * c.config.election_ticks)
    assert c["c"].role is Role.FOLLOWER


# --- removing members -----------------------------------------------------------------------------------------


def test_removed_follower_is_no_longer_replicated_to_and_no_longer_counts() -> None:
    c = elected()
    a = c["a"]
    a.propose_membership(a.membership.without("c"), "")
    c.deliver()
    assert "c" not in a.progress and a.membership.voters == ("a", "b")
    c.isolate("b")
    index = c.propose("a", b"x")
    assert index is not None and a.log.committed < index  # a alone is one of two
    before = len(c.messages_of(AppendEntries, target="c"))
    c.heal()
    c.tick(times=c.config.heartbeat_ticks)
    c.propose("a", b"y")
    assert len(c.messages_of(AppendEntries, target="c")) == before


def test_removed_leader_keeps_leading_until_its_removal_commits_then_steps_down() -> None:
    c = elected()
    a = c["a"]
    c.held.add(("a", "c"))  # the new configuration {b, c} needs both b and c
    index = a.propose_membership(a.membership.without("a"), "")
    c.deliver()
    assert a.role is Role.LEADER and a.log.committed < index  # b alone is not a majority of {b, c}
    c.held.clear()
    c.deliver()
    assert a.log.committed >= index
    assert role(a) is Role.FOLLOWER
    # The remaining members elect a leader among themselves; a never campaigns again.
    votes_asked = len(c.messages_of(RequestVote, source="a"))
    c.tick_until(lambda: any(c[n].role is Role.LEADER for n in "bc"))
    c.tick(times=5 * c.config.election_ticks)
    assert role(a) is Role.FOLLOWER
    assert len(c.messages_of(RequestVote, source="a")) == votes_asked
    new_leader = c.leader()
    assert new_leader.id in ("b", "c") and new_leader.membership.voters == ("b", "c")


def test_two_voter_cluster_survives_a_leader_that_removed_itself_and_lost_quorum() -> None:
    c = elected(["a", "b"])
    a = c["a"]
    c.isolate("b")
    index = a.propose_membership(a.membership.without("a"), "")
    c.tick(["a"], times=3 * c.config.election_ticks)  # CheckQuorum: b is silent, a steps down
    assert role(a) is Role.FOLLOWER and a.log.committed < index
    c.heal()
    c.tick(times=20 * c.config.election_ticks)
    # Only a holds the latest entry, so b cannot win without a; a must be able to finish the change.
    assert c.leaders() == ["b"]
    assert c["b"].membership.voters == ("b",) and c["b"].log.committed >= index


def test_removed_leader_does_not_count_its_own_log_towards_commitment() -> None:
    c = elected()
    a = c["a"]
    a.propose_membership(a.membership.without("a"), "")
    c.held.add(("a", "c"))
    c.deliver()
    # Both b and a hold the entry, but a is not in the configuration {b, c}: it must wait for c.
    assert c["b"].log.last_index == a.log.last_index
    assert a.log.committed < a.log.last_index


def test_truncating_an_uncommitted_membership_entry_restores_the_previous_membership() -> None:
    c = elected(extra=["d"])
    a = c["a"]
    old = a.membership
    c.isolate("a")
    a.propose_membership(with_member(old, "d"), "")
    c.flush("a")
    assert a.membership != old
    c.tick_until(lambda: any(c[n].role is Role.LEADER for n in "bc"))
    c.heal()
    c.tick(times=c.config.heartbeat_ticks * 2)
    assert a.role is Role.FOLLOWER and a.membership == old


def test_cluster_keeps_working_through_a_sequence_of_changes() -> None:
    c = elected(extra=["d", "e"])
    steps: list[Callable[[Membership], Membership]] = [
        lambda m: with_member(m, "d", voter=False),
        lambda m: with_member(m, "d", voter=True),
        lambda m: m.without("b"),
        lambda m: with_member(m, "e", voter=False),
        lambda m: with_member(m, "e", voter=True),
        lambda m: m.without("a"),
    ]
    for number, step in enumerate(steps):
        leader = c.leader()
        leader.propose_membership(step(leader.membership), "")
        c.deliver()
        c.tick_until(lambda: bool(c.leaders()) and c.leader().log.membership_index <= c.leader().log.committed)
        c.tick(times=c.config.heartbeat_ticks)
        c.propose(c.leader().id, f"after-{number}".encode())
    leader = c.leader()
    assert leader.membership.voters == ("c", "d", "e")
    for node_id in ["c", "d", "e"]:
        assert c.applied[node_id] == c.applied[leader.id]
        assert c.applied[node_id][-1] == b"after-5"


def test_membership_of_is_sorted_and_compares_equal() -> None:
    assert membership_of(["b", "a"]) == membership_of(["a", "b"])
    assert membership_of(["a"], ["b"]).learners == ("b",)


# --- changes asked for on any member (RaftNode), and joining -------------------------------------------------


def voters(node: RaftNode) -> dict[str, bool]:
    return {m.node_id: m.voter for m in node.status().members}


def recorder(into: list[Message], wanted: Callable[[Message], bool]) -> Callable[[Message], bool]:
    """A `ControlledNetwork.hold` that holds nothing back and records the messages `wanted` accepts."""

    def hold(message: Message) -> bool:
        if wanted(message):
            into.append(message)
        return False

    return hold


async def test_a_joining_member_asks_a_follower_which_forwards_to_the_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        await leader.propose(put("k", "v"))
        follower = next(n for n in ABC if n != leader.node_id)
        requests: list[Message] = []
        cluster.network.hold = recorder(requests, lambda m: isinstance(m, MembershipRequest))
        joiner = await cluster.start("d", [follower], join=True)  # knows only a follower
        with trio.fail_after(60):
            await joiner.join_cluster()
        assert voters(leader) == {"a": True, "b": True, "c": True, "d": True}
        assert [(r.source, r.target, r.origin) for r in requests if isinstance(r, MembershipRequest)] == [
            ("d", follower, "d"),
            (follower, leader.node_id, "d"),
        ]
        assert await joiner.read(b"k") == b"v"
        await joiner.join_cluster()  # a member already: returns at once, asking nobody
        assert len(requests) == 2


async def test_request_add_and_remove_member_work_on_a_follower(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = cluster.nodes[next(n for n in ABC if n != leader.node_id)]
        await cluster.start("d", (), join=True)
        await follower.request_add_member("d", cluster.address("d"), voter=False)
        assert voters(leader)["d"] is False
        await follower.request_add_member("d", cluster.address("d"))  # promoted
        assert voters(leader)["d"] is True
        with pytest.raises(MembershipChangeError, match="a member already"):
            await follower.request_add_member("d", "mem://elsewhere")
        await follower.request_remove_member(leader.node_id)  # the leader itself
        assert "d" in voters(follower) and leader.node_id not in voters(follower)
        survivors = [n for n in [*ABC, "d"] if n != leader.node_id]
        new_leader = await cluster.leader(survivors)
        assert new_leader.node_id != leader.node_id


async def test_a_change_asked_for_without_a_quorum_fails_within_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        others = [n for n in ABC if n != leader.node_id]
        await cluster.stop(leader.node_id)
        await cluster.stop(others[0])
        lonely = cluster.nodes[others[1]]
        started = trio.current_time()
        with pytest.raises((NoQuorumError, ProposalTimeout)):
            await lonely.request_remove_member(others[0], timeout=3.0)
        assert trio.current_time() - started <= 3.0 + 1e-6


async def test_a_request_meant_for_another_member_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        cluster = NodeCluster(nursery)
        for node_id in ABC:
            await cluster.start(node_id, ABC)
        leader = await cluster.leader()
        stray = await cluster.start("x", (), join=True)
        sent: list[Message] = []
        cluster.network.hold = recorder(sent, lambda m: m.source == "x")
        # The stray believes "zz" listens at the leader's address: the leader drops what is not for it.
        stray.peers["zz"] = cluster.address(leader.node_id)
        with trio.move_on_after(30):
            await stray.join_cluster()
        assert sent and all(m.target == "zz" for m in sent)
        await leader.propose(put("k", "v"))
        assert "x" not in voters(leader) and stray.status().members == ()
        nursery.cancel_scope.cancel()

