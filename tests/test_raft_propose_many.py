"""Batches of commands (`RaftNode.propose_many`, `EntryKind.BATCH`) and the limits on an entry's size."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from graft_trio.raft import CoreConfig, EntryKind, ProposalTooLarge, RaftNode
from graft_trio.raft.codec import decode_commands, encode_commands
from graft_trio.raft.messages import ForwardBatch, ForwardProposal
from tests.kv import append, put
from tests.raft_cluster import CoreCluster, NodeCluster, TimeLog, node_config, open_node_cluster
from transports.memory import MemoryNetwork, MemoryTransport

ABC = ["a", "b", "c"]


def batch_entries(node: RaftNode) -> list[list[bytes]]:
    """The commands of each BATCH entry in the member's log, oldest first."""
    assert node.core is not None
    return [decode_commands(e.data) for e in node.core.log.entries if e.kind is EntryKind.BATCH]


def machine_data(cluster: NodeCluster) -> list[dict[str, str]]:
    return [cluster.machines[node_id].data for node_id in sorted(cluster.machines)]


# --- the driver ---------------------------------------------------------------------------------------


async def test_a_batch_is_one_entry_applied_in_order_on_every_member(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        commands = [append("k", "a"), append("k", "b"), put("j", "x"), append("k", "c")]
        results = await follower.propose_many(commands)  # forwarded to the leader
        assert results == [b"a", b"ab", b"x", b"abc"]
        assert await leader.propose_many([append("k", "d")]) == [b"abcd"]
        assert await leader.propose(append("k", "e")) == b"abcde"
        await cluster.converged()
        assert machine_data(cluster) == [{"k": "abcde", "j": "x"}] * 3
        for node in cluster.nodes.values():
            assert batch_entries(node) == [commands, [append("k", "d")]]


async def test_an_empty_batch_proposes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        before = leader.status().commit_index
        assert await leader.propose_many([]) == []
        assert leader.status().commit_index == before


async def test_a_retried_batch_is_applied_once(autojump_clock: trio.testing.MockClock) -> None:
    async with open_node_cluster(ABC) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        commands = [append("k", "a"), append("k", "b")]
        first = await follower.propose_many(commands, request_id="batch-1")
        await cluster.converged()
        again = await leader.propose_many(commands, request_id="batch-1")
        assert first == again == [b"a", b"ab"]
        await cluster.converged()
        assert machine_data(cluster) == [{"k": "ab"}] * 3
        assert len(batch_entries(leader)) == 1


async def test_batches_survive_a_crash_and_reach_a_member_through_a_snapshot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = node_config(snapshot_threshold=10, snapshot_trailing=2, snapshot_chunk_bytes=256)
    async with open_node_cluster(ABC, config=config) as cluster:
        leader = await cluster.leader()
        lagging = next(n for n in ABC if n != leader.node_id)
        await cluster.crash(lagging)
        for round_ in range(30):
            values = [str(round_ * 3 + i) for i in range(3)]
            await leader.propose_many([append("k", f"{v},") for v in values])
        assert leader.core is not None and leader.core.snapshot is not None  # the log was compacted
        await cluster.start(lagging, ABC)
        await cluster.converged()
        expected = "".join(f"{i}," for i in range(90))
        assert machine_data(cluster) == [{"k": expected}] * 3
        restarted = cluster.nodes[lagging]
        assert restarted.core is not None and restarted.core.snapshot is not None  # it caught up by one


async def test_an_entry_over_max_entry_bytes_is_refused_and_harms_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_node_cluster(ABC, config=node_config(max_entry_bytes=1000)) as cluster:
        leader = await cluster.leader()
        follower = next(n for n in cluster.nodes.values() if n is not leader)
        for node in (leader, follower):
            with pytest.raises(ProposalTooLarge):
                await node.propose(put("k", "x" * 1000))
            with pytest.raises(ValueError, match="max_entry_bytes"):
                await node.propose_many([put("k", "x" * 60)] * 20)
        assert await follower.propose_many([put("k", "x" * 60)] * 5) == [b"x" * 60] * 5
        assert await follower.propose(put("k", "y")) == b"y"


async def test_snapshots_follow_the_bytes_applied_as_well_as_the_entries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def compaction(**limits: int) -> tuple[int, int]:
        """(snapshot index, entries kept behind it) after 40 commands of 1 KiB on a one-member cluster."""
        async with open_node_cluster(["solo"], config=node_config(**limits)) as cluster:
            node = cluster.nodes["solo"]
            await node.wait_for_leader()
            for i in range(40):
                await node.propose(put(f"k{i}", "x" * 1024))
            assert node.core is not None
            if node.core.snapshot is None:
                return 0, 0
            return node.core.snapshot.meta.index, node.core.snapshot.meta.index - node.core.log.offset

    assert await compaction() == (0, 0)  # 42 entries are far from the 8,192 that take a snapshot by default
    # 8 KiB of commands since the last snapshot take one, with all its entries behind it (up to 1,024) ...
    index, behind = await compaction(snapshot_threshold_bytes=8 * 1024)
    assert index > 8 and behind == index
    # ... or only as many as fit in 3 KiB.
    index, behind = await compaction(snapshot_threshold_bytes=8 * 1024, snapshot_trailing_bytes=3 * 1024)
    assert index > 8 and behind == 2


# --- the core ---------------------------------------------------------------------------------------------


def test_the_core_stamps_each_command_of_a_batch_and_appends_forwarded_batches() -> None:
    def stamp(command: bytes) -> bytes:
        return command + b"@leader"

    c = CoreCluster(ABC)
    a = c.elect("a")
    a._stamp = stamp  # as a driver whose state machine stamps commands would have built it
    a.propose(encode_commands([b"one", b"two"]), "local", EntryKind.BATCH)
    a.step(ForwardBatch("b", "a", a.term, encode_commands([b"three"]), "forwarded"))
    a.step(ForwardProposal("b", "a", a.term, b"four", "single"))
    batches = [(e.kind, e.data) for e in a.log.entries[-3:]]
    assert batches == [
        (EntryKind.BATCH, encode_commands([b"one@leader", b"two@leader"])),
        (EntryKind.BATCH, encode_commands([b"three@leader"])),
        (EntryKind.NORMAL, b"four@leader"),
    ]


def test_the_leader_drops_forwarded_proposals_it_cannot_append() -> None:
    c = CoreCluster(ABC, config=CoreConfig(max_entry_bytes=200))
    a = c.elect("a")
    before = a.log.last_index
    a.step(ForwardProposal("b", "a", a.term, b"x" * 500, "too-large"))
    a.step(ForwardBatch("b", "a", a.term, b"\xff\xff\xff\xff not a batch", "malformed"))
    assert a.log.last_index == before
    a.step(ForwardBatch("b", "a", a.term, encode_commands([b"fine"]), "ok"))
    assert a.log.last_index == before + 1


def test_the_core_proposes_only_commands_and_batches_within_max_entry_bytes() -> None:
    solo = CoreCluster(["solo"], config=CoreConfig(max_entry_bytes=100)).elect("solo")
    with pytest.raises(ValueError, match="MEMBERSHIP"):
        solo.propose(b"", "", EntryKind.MEMBERSHIP)
    with pytest.raises(ProposalTooLarge):
        solo.propose(b"x" * 100, "")
    assert solo.propose(b"x" * 50, "") is not None


async def test_a_proposal_at_the_limit_is_not_refused_for_what_the_leaders_stamp_adds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`max_entry_bytes` bounds a proposal as made. Checked after the leader's `stamp` (which writes a longer
    time into these commands), a proposal the proposer had let through raised inside the leader's loop and
    stopped it, or was dropped from a follower until its proposer timed out."""
    network = MemoryNetwork()
    ids = ["a", "b", "c"]
    config = node_config(max_entry_bytes=1000)
    nodes = {
        node_id: RaftNode(
            node_id,
            node_id,
            {p: p for p in ids if p != node_id},
            state_machine=TimeLog(),
            transport=MemoryTransport(network),
            config=config,
            rng=random.Random(index),
        )
        for index, node_id in enumerate(ids)
    }
    async with nodes["a"], nodes["b"], nodes["c"]:
        leader_id = await nodes["a"].wait_for_leader()
        await trio.sleep(100)  # "100.x" is longer than the "-1.0" each command is proposed with
        for node in (nodes[leader_id], *(n for n in nodes.values() if n.node_id != leader_id)):
            request_id = f"r-{node.node_id}"
            single = b"-1.0|" + b"x" * (1000 - 24 - len(request_id) - len(b"-1.0|"))
            assert len(single) + len(request_id) + 24 == 1000  # exactly at the limit
            result = await node.propose(single, request_id=request_id, timeout=5)
            assert result.startswith(b"100") and result.endswith(b"x")
            batch = [b"-1.0|" + b"x" * 9] * 40  # 40 x (14 + 4) + 4 + the request id: under 1000 before stamping
            assert len(await node.propose_many(batch, timeout=5)) == 40
        with pytest.raises(ProposalTooLarge):
            await nodes[leader_id].propose(single + b"x", request_id="r-z")
        assert all(node.status().role in ("leader", "follower") for node in nodes.values())
