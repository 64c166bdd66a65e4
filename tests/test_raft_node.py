"""RaftNode, the trio driver: clusters of real members on a private MemoryNetwork, on the autojump clock."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Sequence

import pytest
import trio
import trio.testing

from graft_trio.raft import (
    EntryKind,
    MemoryStorage,
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    PersistentState,
    ProposalTimeout,
    RaftError,
    RaftNode,
)
from graft_trio.raft.messages import AppendEntries, Entry, HardState, ReadIndexResponse
from tests.kv import KeyValue, append, put
from tests.raft_cluster import NodeCluster, OffsetClock, TimeLog, node_config, open_node_cluster
from transports.memory import MemoryNetwork, MemoryTransport

ABC = ["a", "b", "c"]
FIVE = ["a", "b", "c", "d", "e"]
SNAPSHOTTING = node_config(snapshot_threshold=20, snapshot_trailing=5, snapshot_chunk_bytes=64)


def membership_history(node: RaftNode) -> list[dict[str, bool]]:
    """Each membership entry in the member's log, as {member: is_voter}."""
    assert node.core is not None
    return [
        {m.node_id: m.voter for m in e.membership.members}
        for e in node.core.log.entries
        if e.kind is EntryKind.MEMBERSHIP and e.membership is not None
    ]


# --- elections --------------------------------------------------------------------------------------


async def test_one_member_cluster_elects_itself_and_serves_proposals_and_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(["solo"]) as cluster:
        node = cluster.nodes["solo"]
        assert await node.wait_for_leader() == "solo"
        assert await node.propose(put("k", "v")) == b"v"
        assert await node.read(b"k") == b"v"
        assert node.status().role == "leader"


@pytest.mark.parametrize("ids", [ABC, FIVE], ids=["3", "5"])
async def test_founding_members_elect_one_leader_they_all_follow(
    autojump_clock: trio.testing.MockClock, ids: list[str]
) -> None:
    async with open_node_cluster(ids, seed=len(ids)) as cluster:
        leader = await cluster.leader()
        statuses = [node.status() for node in cluster.nodes.values()]
        assert {s.leader_id for s in statuses} == {leader.node_id}
        assert len({s.term for s in statuses}) == 1
        assert sum(1 for s in statuses if s.role == "leader") == 1


# --- proposals and reads ---------------------------------------------------------------------------------


async def test_proposal_on_the_leader_returns_what_apply_returned(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        assert await leader.propose(append("k", "x")) == b"x"
        assert await leader.propose(append("k", "y")) == b"xy"


async def test_proposal_on_a_follower_is_forwarded_and_returns_what_apply_returned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        assert await follower.propose(append("k", "x")) == b"x"
        assert await follower.propose(append("k", "y")) == b"xy"
        await cluster.converged()
        assert all(m.data == {"k": "xy"} for m in cluster.machines.values())


async def test_concurrent_proposals_from_every_member_are_all_applied_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        await cluster.leader()
        results: dict[str, bytes] = {}

        async def propose(node: RaftNode, value: str) -> None:
            results[value] = await node.propose(append("k", value))

        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(propose, cluster.nodes[ABC[i % 3]], f"<{i}>")
        await cluster.converged()
        final = cluster.machines["a"].data["k"]
        assert sorted(final.replace(">", ">\n").split()) == sorted(f"<{i}>" for i in range(30))
        for value, result in results.items():
            assert final.startswith(result.decode()) and result.decode().endswith(value)
        assert all(m.data == {"k": final} for m in cluster.machines.values())


async def test_read_after_a_completed_write_sees_it_on_every_member(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        await cluster.leader()
        for round_number, writer in enumerate(ABC * 2):
            value = f"v{round_number}"
            await cluster.nodes[writer].propose(put("k", value))
            for reader in ABC:
                assert await cluster.nodes[reader].read(b"k") == value.encode(), (writer, reader)


async def test_read_on_a_lagging_follower_waits_until_it_has_applied_the_read_point(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        lagging = next(n for n in ABC if n != leader.node_id)
        cluster.network.hold = lambda m: isinstance(m, AppendEntries) and m.target == lagging
        await leader.propose(put("k", "new"))  # committed by the leader and the other follower
        result: list[bytes] = []

        async def read() -> None:
            result.append(await cluster.nodes[lagging].read(b"k"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.sleep(1.0)
            assert result == []  # confirmed by the leader, but not applied here yet
            cluster.network.hold = None
            cluster.network.release(lambda m: True)
        assert result == [b"new"]


async def test_partitioned_old_leader_does_not_serve_a_stale_read(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        old = await cluster.leader()
        await old.propose(put("k", "old"))
        cluster.network.isolate(old.node_id, ABC)
        rest = [n for n in ABC if n != old.node_id]
        new = await cluster.leader(rest)
        await new.propose(put("k", "new"))
        with pytest.raises((ProposalTimeout, NoQuorumError)):
            await old.read(b"k", timeout=2.0)


# --- failures ----------------------------------------------------------------------------------------------


async def test_killing_the_leader_elects_a_new_one_and_proposals_resume(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC, seed=7) as cluster:
        old = await cluster.leader()
        await old.propose(put("k", "1"))
        await cluster.stop(old.node_id)
        rest = [n for n in ABC if n != old.node_id]
        new = await cluster.leader(rest)
        assert new.node_id != old.node_id and new.status().term > old.status().term
        first, second = rest
        assert await cluster.nodes[first].propose(append("k", first)) == f"1{first}".encode()
        assert await cluster.nodes[second].propose(append("k", second)) == f"1{first}{second}".encode()
        assert await cluster.nodes[first].read(b"k") == f"1{first}{second}".encode()


async def test_five_members_tolerate_the_loss_of_two(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(FIVE, seed=3) as cluster:
        leader = await cluster.leader()
        await leader.propose(put("k", "1"))
        victims = [leader.node_id, next(n for n in FIVE if n != leader.node_id)]
        for victim in victims:
            await cluster.stop(victim)
        rest = [n for n in FIVE if n not in victims]
        new = await cluster.leader(rest)
        assert await new.propose(append("k", "2")) == b"12"
        for node_id in rest:
            assert await cluster.nodes[node_id].read(b"k") == b"12"


async def test_restarted_member_catches_up_from_its_storage(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in ABC if n != leader.node_id)
        for i in range(5):
            await leader.propose(append("k", str(i)))
        await cluster.converged()
        await cluster.crash(follower)
        for i in range(5, 10):
            await leader.propose(append("k", str(i)))
        cluster.network.isolate(follower, ABC)
        restarted = await cluster.start(follower, ABC)
        # Replayed from its own log, up to the commit index it last wrote: a change of the commit index
        # alone is not written (it is volatile), so the stored one may lag the last entry a little.
        await cluster.wait_for(lambda: restarted.status().applied_index >= 6)
        assert cluster.machines[follower].data["k"] in ("0123", "01234")
        cluster.network.cut.clear()
        await cluster.converged()
        assert cluster.machines[follower].data == {"k": "0123456789"}
        assert await restarted.read(b"k") == b"0123456789"


async def test_whole_cluster_restart_keeps_every_committed_write(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        for i in range(5):
            await leader.propose(append("k", str(i)))
        for node_id in ABC:
            await cluster.crash(node_id)
        for node_id in ABC:
            await cluster.start(node_id, ABC)
        leader = await cluster.leader()
        assert await leader.read(b"k") == b"01234"
        assert await leader.propose(append("k", "5")) == b"012345"


async def test_propose_with_no_quorum_raises_within_its_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in ABC if n != leader.node_id)
        for node_id in ABC:
            if node_id != follower:
                await cluster.stop(node_id)
        survivor = cluster.nodes[follower]
        for operation in (survivor.propose(put("k", "v"), timeout=2.0), survivor.read(b"k", timeout=2.0)):
            started = trio.current_time()
            with pytest.raises((NoQuorumError, ProposalTimeout)):
                await operation
            assert trio.current_time() - started <= 2.0 + 0.2


async def test_propose_on_a_leader_that_lost_its_quorum_raises_within_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        cluster.network.isolate(leader.node_id, ABC)
        started = trio.current_time()
        with pytest.raises((NoQuorumError, ProposalTimeout)):
            await leader.propose(put("k", "v"), timeout=3.0)
        assert trio.current_time() - started <= 3.0 + 0.2


async def test_with_no_leader_ever_propose_raises_no_quorum(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        cluster = NodeCluster(nursery)
        lonely = await cluster.start("a", ABC)  # b and c never start
        with pytest.raises(NoQuorumError):
            await lonely.propose(put("k", "v"), timeout=2.0)
        nursery.cancel_scope.cancel()


# --- exactly once ----------------------------------------------------------------------------------------------


async def test_proposal_retried_with_the_same_request_id_is_applied_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        assert await leader.propose(append("k", "x"), request_id="req-1") == b"x"
        assert await leader.propose(append("k", "x"), request_id="req-1") == b"x"
        assert await follower.propose(append("k", "x"), request_id="req-1") == b"x"
        assert await follower.propose(append("k", "y"), request_id="req-2") == b"xy"
        await cluster.converged()
        assert all(m.data == {"k": "xy"} for m in cluster.machines.values())


async def test_proposal_that_timed_out_and_is_retried_is_applied_once(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC, seed=11) as cluster:
        leader = await cluster.leader()
        await leader.propose(append("k", "a"))
        others = [n for n in ABC if n != leader.node_id]
        # The proposal reaches the followers, but no acknowledgement gets back: it times out.
        cluster.network.cut.update({(n, leader.node_id) for n in others})
        with pytest.raises((ProposalTimeout, NoQuorumError)):
            await leader.propose(append("k", "b"), timeout=1.0, request_id="retry-me")
        cluster.network.cut.clear()
        new = await cluster.leader()
        assert await new.propose(append("k", "b"), request_id="retry-me") == b"ab"
        await cluster.converged()
        assert all(m.data == {"k": "ab"} for m in cluster.machines.values())


async def test_retried_request_id_is_remembered_across_a_snapshot_and_a_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC, config=SNAPSHOTTING) as cluster:
        leader = await cluster.leader()
        assert await leader.propose(append("k", "once"), request_id="early") == b"once"
        for i in range(30):
            await leader.propose(put(f"filler{i}", "x"))
        await cluster.converged()
        assert all(n.status().snapshot_index > 0 for n in cluster.nodes.values())
        for node_id in ABC:
            await cluster.crash(node_id)
        for node_id in ABC:
            await cluster.start(node_id, ABC)
        leader = await cluster.leader()
        assert await leader.propose(append("k", "once"), request_id="early") == b"once"
        await cluster.converged()
        assert all(m.data["k"] == "once" for m in cluster.machines.values())


# --- membership ------------------------------------------------------------------------------------------------


async def test_added_member_joins_as_a_learner_then_becomes_a_voter(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        for i in range(5):
            await leader.propose(append("k", str(i)))
        joiner = await cluster.start("d", (), join=True)
        assert joiner.status().members == () and joiner.status().role == "follower"
        await leader.add_member("d", cluster.address("d"))
        history = membership_history(leader)
        assert history[-2:] == [
            {"a": True, "b": True, "c": True, "d": False},
            {"a": True, "b": True, "c": True, "d": True},
        ]
        await cluster.converged()
        assert cluster.machines["d"].data == {"k": "01234"}
        assert any(m.node_id == "d" and m.voter for m in joiner.status().members)
        assert await joiner.read(b"k") == b"01234"
        # d now counts: with two of the four members down there is no quorum.
        assert leader.core is not None and leader.core.quorum() == 3


async def test_a_member_that_starts_with_join_holds_no_election(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        cluster = NodeCluster(nursery)
        joiner = await cluster.start("d", (), join=True)
        await trio.sleep(10 * cluster.config.election_timeout)
        assert joiner.status().role == "follower" and joiner.status().term == 0
        with pytest.raises(NoQuorumError):
            await joiner.propose(put("k", "v"), timeout=1.0)
        nursery.cancel_scope.cancel()


async def test_add_member_on_a_follower_raises_not_leader(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        with pytest.raises(NotLeaderError) as info:
            await follower.add_member("d", cluster.address("d"))
        assert info.value.leader_id == leader.node_id


async def test_removed_follower_leaves_and_the_rest_keep_working(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        removed = next(n for n in ABC if n != leader.node_id)
        await leader.remove_member(removed)
        assert removed not in [m.node_id for m in leader.status().members]
        await cluster.stop(removed)
        rest = [n for n in ABC if n != removed]
        assert await leader.propose(put("k", "v")) == b"v"
        # Two members now: losing either one stops progress, so both must be acknowledging.
        await cluster.applied_everywhere(leader.status().commit_index, rest)


async def test_removed_leader_steps_down_and_the_rest_elect_a_new_one(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        old = await cluster.leader()
        await old.propose(put("k", "before"))
        await old.remove_member(old.node_id)
        rest = [n for n in ABC if n != old.node_id]
        new = await cluster.leader(rest)
        assert old.status().role == "follower"
        assert await new.propose(put("k", "after")) == b"after"
        assert [m.node_id for m in new.status().members] == rest
        await trio.sleep(5 * cluster.config.election_timeout)
        assert old.status().role == "follower"  # it never campaigns again
        assert new.is_leader


async def test_adding_a_member_that_never_starts_times_out_and_leaves_it_a_learner(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        started = trio.current_time()
        with pytest.raises(ProposalTimeout):
            await leader.add_member("ghost", cluster.address("ghost"), timeout=3.0)
        assert trio.current_time() - started <= 3.0 + 0.2
        members = {m.node_id: m.voter for m in leader.status().members}
        assert members == {"a": True, "b": True, "c": True, "ghost": False}  # a learner: not in any quorum


async def test_one_member_cluster_keeps_working_when_the_member_it_adds_never_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(["solo"]) as cluster:
        node = cluster.nodes["solo"]
        await node.wait_for_leader()
        with pytest.raises(ProposalTimeout):
            await node.add_member("ghost", cluster.address("ghost"), timeout=3.0)
        # Promoting the silent member would make it half of a two-voter quorum: the cluster would stop.
        assert await node.propose(put("k", "v"), timeout=3.0) == b"v"


async def test_remove_member_on_a_follower_raises_not_leader(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        with pytest.raises(NotLeaderError):
            await follower.remove_member(leader.node_id)


# --- leadership transfer -------------------------------------------------------------------------------------


async def test_transfer_leadership_to_a_chosen_member(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        old = await cluster.leader()
        await old.propose(put("k", "v"))
        target = next(n for n in ABC if n != old.node_id)
        term = old.status().term
        assert await old.transfer_leadership(target) == target
        new = await cluster.leader()
        assert new.node_id == target and new.status().term > term
        assert await old.propose(append("k", "w")) == b"vw"  # now forwarded


async def test_transfer_leadership_without_a_target_picks_an_up_to_date_voter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(FIVE) as cluster:
        old = await cluster.leader()
        new_id = await old.transfer_leadership()
        assert new_id != old.node_id
        assert (await cluster.leader()).node_id == new_id


async def test_transfer_to_an_unreachable_member_gives_up_within_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        target = next(n for n in ABC if n != leader.node_id)
        await cluster.stop(target)
        started = trio.current_time()
        with pytest.raises(ProposalTimeout):
            await leader.transfer_leadership(target, timeout=2.0)
        assert trio.current_time() - started <= 2.0 + 0.2
        assert leader.is_leader
        assert await leader.propose(put("k", "v")) == b"v"  # the abandoned transfer no longer blocks it


async def test_transfer_leadership_on_a_follower_raises_not_leader(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        with pytest.raises(NotLeaderError):
            await follower.transfer_leadership()


# --- snapshots --------------------------------------------------------------------------------------------------


async def test_members_snapshot_and_compact_their_logs(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC, config=SNAPSHOTTING) as cluster:
        leader = await cluster.leader()
        for i in range(50):
            await leader.propose(put(f"k{i}", str(i)))
        await cluster.converged()
        for node_id, node in cluster.nodes.items():
            status = node.status()
            assert status.snapshot_index >= 20
            assert (
                node.core is not None and node.core.log.offset >= status.snapshot_index - SNAPSHOTTING.snapshot_trailing
            )
            stored = await cluster.storages[node_id].load()
            assert stored.snapshot is not None and stored.snapshot.meta.index == status.snapshot_index


async def test_member_that_restarts_behind_the_compaction_point_catches_up_by_install_snapshot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC, config=SNAPSHOTTING) as cluster:
        leader = await cluster.leader()
        late = next(n for n in ABC if n != leader.node_id)
        await cluster.stop(late)
        for i in range(60):
            await leader.propose(put(f"k{i}", str(i)))
        assert leader.core is not None and leader.core.log.offset > 10
        await cluster.start(late, ABC)
        await cluster.converged()
        assert cluster.machines[late].data == cluster.machines[leader.node_id].data
        stored = await cluster.storages[late].load()
        assert stored.snapshot is not None and stored.snapshot.meta.index > 10
        assert await cluster.nodes[late].read(b"k59") == b"59"


async def test_member_that_joins_late_catches_up_by_install_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC, config=SNAPSHOTTING) as cluster:
        leader = await cluster.leader()
        for i in range(60):
            await leader.propose(put(f"k{i}", str(i)))
        joiner = await cluster.start("d", (), join=True)
        await leader.add_member("d", cluster.address("d"))
        await cluster.converged()
        assert cluster.machines["d"].data == cluster.machines[leader.node_id].data
        assert joiner.status().snapshot_index > 0
        assert await joiner.read(b"k0") == b"0"


# --- status and lifecycle ------------------------------------------------------------------------------------


async def test_status_reports_role_term_leader_positions_and_members(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        await leader.propose(put("k", "v"))
        await cluster.converged()
        for node_id, node in cluster.nodes.items():
            status = node.status()
            assert status.node_id == node_id
            assert status.role == ("leader" if node is leader else "follower")
            assert status.leader_id == leader.node_id
            assert status.term == leader.status().term >= 2
            assert status.commit_index == status.applied_index == status.last_index == 3
            assert status.snapshot_index == 0
            assert [(m.node_id, m.address, m.voter) for m in status.members] == [
                (n, cluster.address(n), True) for n in ABC
            ]


async def test_a_stopped_member_refuses_calls(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        await cluster.stop(leader.node_id)
        with pytest.raises(NodeStoppedError):
            await leader.propose(put("k", "v"))
        with pytest.raises(NodeStoppedError):
            await leader.read(b"k")


async def test_pending_proposal_fails_with_node_stopped_when_the_member_stops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        cluster.network.isolate(leader.node_id, ABC)
        errors: list[BaseException] = []

        async def propose() -> None:
            try:
                await leader.propose(put("k", "v"), timeout=30.0)
            except NodeStoppedError as exc:
                errors.append(exc)

        cluster.nursery.start_soon(propose)
        await trio.sleep(0.2)
        await cluster.stop(leader.node_id)
        await trio.sleep(0.2)
        assert len(errors) == 1


async def test_node_used_as_an_async_context_manager(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    node = RaftNode(
        "n1",
        "mem://n1",
        {},
        state_machine=KeyValue(),
        storage=MemoryStorage(),
        transport=MemoryTransport(network),
        rng=random.Random(1),
    )
    async with node:
        assert await node.propose(put("k", "v")) == b"v"
        assert json.loads(node.state_machine.snapshot()) == {"k": "v"}
    assert not network.endpoints  # the endpoint was closed on exit


# --- everything at once ------------------------------------------------------------------------------------


async def run_clients_under_faults(cluster: NodeCluster, ids: list[str], rng: random.Random) -> None:
    """Clients append unique values (retrying with one request id) and read, while members crash, restart
    and are partitioned. Then: every member converges, nothing is applied twice, nothing acknowledged is
    lost, each result is a prefix of the final value, and each read saw every write acknowledged before it."""
    acknowledged: dict[str, bytes] = {}
    attempted: set[str] = set()
    reads: list[tuple[set[str], str]] = []

    async def writer(client: int) -> None:
        for number in range(10):
            value = f"<{client}.{number}>"
            attempted.add(value)
            for _ in range(8):
                running = cluster.running()
                node = rng.choice(running)
                try:
                    result = await node.propose(append("k", value), request_id=f"{client}/{number}", timeout=2.0)
                except RaftError:
                    await trio.sleep(0.1)
                    continue
                acknowledged[value] = result
                break
            await trio.sleep(rng.random() * 0.3)

    async def reader() -> None:
        for _ in range(15):
            node = rng.choice(cluster.running())
            must_see = set(acknowledged)
            with contextlib.suppress(RaftError):
                reads.append((must_see, (await node.read(b"k", timeout=2.0)).decode()))
            await trio.sleep(rng.random() * 0.4)

    async def chaos() -> None:
        for _ in range(10):
            await trio.sleep(rng.random() * 1.5)
            running = [n.node_id for n in cluster.running()]
            down = [i for i in ids if i not in running]
            roll = rng.random()
            if roll < 0.3 and len(running) > len(ids) // 2 + 1:
                await cluster.crash(rng.choice(running))
            elif roll < 0.5 and down:
                await cluster.start(rng.choice(down), ids)
            elif roll < 0.7:
                cluster.network.isolate(rng.choice(ids), ids)
            else:
                cluster.network.cut.clear()
        cluster.network.cut.clear()
        for node_id in ids:
            if node_id not in [n.node_id for n in cluster.running()]:
                await cluster.start(node_id, ids)

    async with trio.open_nursery() as nursery:
        for client in range(3):
            nursery.start_soon(writer, client)
        nursery.start_soon(reader)
        nursery.start_soon(chaos)
    await cluster.converged()
    final = cluster.machines[ids[0]].data.get("k", "")
    assert all(cluster.machines[i].data.get("k", "") == final for i in ids)
    assert all(final.count(value) <= 1 for value in attempted), "a value was applied twice"
    assert acknowledged, "nothing was acknowledged at all"
    for value, result in acknowledged.items():
        assert final.count(value) == 1, f"{value} was acknowledged, then lost"
        assert final.startswith(result.decode()) and result.decode().endswith(value)
    for must_see, seen in reads:
        assert final.startswith(seen)
        assert all(value in seen for value in must_see), f"stale read {seen!r}"


@pytest.mark.parametrize("seed", range(1, 9))
async def test_acknowledged_writes_survive_crashes_and_partitions_and_are_applied_once(
    autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    rng = random.Random(seed)
    ids = FIVE if seed % 2 else ABC
    config = node_config(snapshot_threshold=rng.choice([10, 8192]), snapshot_trailing=3, snapshot_chunk_bytes=32)
    async with open_node_cluster(ids, seed=seed, config=config) as cluster:
        await run_clients_under_faults(cluster, ids, rng)


# --- a linearizability hazard across restarts ---------------------------------------------------------------


async def test_a_read_answer_meant_for_a_previous_incarnation_is_not_used(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        await leader.propose(put("k", "old"))
        await cluster.converged()
        member = next(n for n in ABC if n != leader.node_id)
        # The leader's answer to the member's read is delayed in the network.
        cluster.network.hold = lambda m: isinstance(m, ReadIndexResponse) and m.target == member
        with trio.move_on_after(0.5):
            await cluster.nodes[member].read(b"k")
        assert len(cluster.network.held) == 1
        await cluster.stop(member)
        await leader.propose(put("k", "new"))  # completes before the next read starts
        restarted = await cluster.start(member, ABC)
        result: list[bytes] = []

        async def read() -> None:
            result.append(await restarted.read(b"k"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            cluster.network.release(lambda m: m in [held for _, held in cluster.network.held[:1]])
            await trio.sleep(0.5)
            cluster.network.hold = None
            cluster.network.release(lambda m: True)
        assert result == [b"new"]


# --- the leader's time on every command ------------------------------------------------------------------


async def test_commands_carry_the_leaders_time_whoever_proposed_them(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    offsets = {"a": 0.0, "b": 1000.0, "c": -1000.0}  # clocks far apart: whose time a command got is plain
    machines = {node_id: TimeLog() for node_id in offsets}
    nodes = {
        node_id: RaftNode(
            node_id,
            node_id,
            {p: p for p in offsets if p != node_id},
            state_machine=machines[node_id],
            transport=MemoryTransport(network),
            clock=OffsetClock(offset),
            rng=random.Random(index),
        )
        for index, (node_id, offset) in enumerate(offsets.items())
    }
    async with nodes["a"], nodes["b"], nodes["c"]:
        leader_id = await nodes["a"].wait_for_leader()
        leader_offset = offsets[leader_id]
        for node_id, node in nodes.items():
            before = trio.current_time() + leader_offset
            result = await node.propose(b"%r|from %s" % (-1.0, node_id.encode()))
            stamped = float(result.partition(b"|")[0])
            assert before <= stamped <= trio.current_time() + leader_offset, (node_id, leader_id, result)
            assert result.endswith(b"from " + node_id.encode())
        times = machines[leader_id].times
        assert len(times) == 3 and times == sorted(times)
        for node_id, node in nodes.items():  # every member applied the same times (wait for the followers)
            await node.read(b"")
            assert machines[node_id].times == times, node_id


async def test_a_slow_proposal_is_appended_once_by_the_leader_that_holds_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A proposal still uncommitted after an election timeout is retried, but a leader that already has it in
    its log in this term does not append it again (under overload that would double the log)."""
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        command = put("slow", "v")
        # Followers keep hearing heartbeats (so nobody campaigns) but not the entries, for 3 election timeouts.
        cluster.network.hold = lambda m: isinstance(m, AppendEntries) and any(e.data == command for e in m.entries)
        async with trio.open_nursery() as nursery:

            async def release_later() -> None:
                await trio.sleep(3 * leader.config.election_timeout)
                cluster.network.hold = None
                cluster.network.release(lambda m: True)

            nursery.start_soon(release_later)
            assert await leader.propose(command, timeout=30) == b"v"
        assert leader.is_leader
        core = leader.core
        assert core is not None
        copies = [e.index for e in core.log.entries if e.data == command]
        assert len(copies) == 1, copies


# --- what is written, and when ------------------------------------------------------------------------


class RecordingStorage(MemoryStorage):
    """A MemoryStorage that records every save, and holds saves with entries while `gate` is unset."""

    def __init__(self) -> None:
        super().__init__()
        self.saves: list[tuple[HardState | None, int]] = []
        self.gate: trio.Event | None = None

    async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
        self.saves.append((hard_state, len(entries)))
        if entries and self.gate is not None:
            await self.gate.wait()
        await super().save(hard_state, entries, sync=sync)


async def test_a_change_of_only_the_commit_index_is_not_written(autojump_clock: trio.testing.MockClock) -> None:
    """The commit index is volatile (etcd's MustSync): writing it alone would cost a save, and in durable
    mode an fsync, per write on every member, and the leader would apply only after it."""
    async with trio.open_nursery() as nursery:
        cluster = NodeCluster(nursery)
        storages = {node_id: RecordingStorage() for node_id in ABC}
        cluster.storages.update(storages)
        await cluster.start_all(ABC)
        leader = await cluster.leader()
        await cluster.converged()
        for storage in storages.values():
            storage.saves.clear()
        for i in range(10):
            await leader.propose(put("k", str(i)))
        await cluster.converged()
        for node_id, storage in storages.items():
            assert storage.saves, node_id
            assert all(count > 0 for _, count in storage.saves), (node_id, storage.saves)
        nursery.cancel_scope.cancel()


async def test_the_leader_replicates_entries_while_it_is_still_writing_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Dissertation §10.2.1: the leader's AppendEntries need not wait for its own write."""
    async with trio.open_nursery() as nursery:
        cluster = NodeCluster(nursery)
        storages = {node_id: RecordingStorage() for node_id in ABC}
        cluster.storages.update(storages)
        await cluster.start_all(ABC)
        leader = await cluster.leader()
        await cluster.converged()
        follower = cluster.nodes[next(n for n in ABC if n != leader.node_id)]
        gate = trio.Event()
        storages[leader.node_id].gate = gate
        term = leader.status().term
        command = put("k", "v")
        results: list[bytes] = []

        async def propose() -> None:
            results.append(await leader.propose(command, timeout=30))

        def follower_holds_it() -> bool:
            assert follower.core is not None
            return any(entry.data == command for entry in follower.core.log.entries)

        nursery.start_soon(propose)
        await cluster.wait_for(follower_holds_it, timeout=leader.config.election_timeout / 2)
        # The follower has it from this leader, in its term, while the leader is still writing it.
        assert not results and follower.status().term == term and follower.status().leader_id == leader.node_id
        gate.set()
        await cluster.wait_for(lambda: bool(results))
        assert results == [b"v"]
        nursery.cancel_scope.cancel()


async def test_proposals_beyond_max_pending_wait_for_room_and_then_complete(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC, config=node_config(max_pending_proposals=2)) as cluster:
        leader = await cluster.leader()
        cluster.network.hold = lambda m: isinstance(m, AppendEntries) and bool(m.entries)  # nothing commits
        commands = [put(f"k{i}", "v") for i in range(5)]
        results: list[bytes] = []

        async def propose(command: bytes) -> None:
            results.append(await leader.propose(command, timeout=30))

        def in_log() -> list[bytes]:
            assert leader.core is not None
            return [entry.data for entry in leader.core.log.entries if entry.data in commands]

        async with trio.open_nursery() as nursery:
            for command in commands:
                nursery.start_soon(propose, command)
            await cluster.wait_for(lambda: len(in_log()) == 2)
            await trio.testing.wait_all_tasks_blocked()
            assert len(in_log()) == 2 and not results  # the other three wait for room
            cluster.network.hold = None
            cluster.network.release(lambda m: True)
        assert results == [b"v"] * 5
        assert sorted(in_log()) == sorted(commands)


async def test_a_member_cancelled_while_it_starts_leaves_trio_intact(autojump_clock: trio.testing.MockClock) -> None:
    """`async with node` cancelled before the member serves closes what it opened: trio's cancel-scope stack
    stays sound (it used to be left corrupted, which trio reports as a RuntimeError when the scope exits)."""

    class StuckStorage(MemoryStorage):
        async def load(self) -> PersistentState:
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    transport = MemoryTransport(MemoryNetwork())
    node = RaftNode("a", "mem-a", {}, state_machine=KeyValue(), storage=StuckStorage(), transport=transport)
    with trio.move_on_after(1) as scope:
        async with node:
            raise AssertionError("the member never serves")
    assert scope.cancelled_caught
    await trio.sleep(1)  # trio still schedules normally
