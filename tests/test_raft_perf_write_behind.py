"""The driver's fast paths (issue 3 §4): non-durable writes behind the commit path, durable writes before every
acknowledgement, and first-come first-served room for proposals."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

from graft_trio.raft import MemoryStorage, RaftNode
from graft_trio.raft.file_storage import FileStorage
from graft_trio.raft.messages import AppendEntries, Entry, HardState, Message, RequestVoteResponse
from graft_trio.raft.node import _Batch
from tests.kv import KeyValue, put
from tests.raft_cluster import NodeCluster, node_config, open_node_cluster

ABC = ["a", "b", "c"]


class GatedStorage(MemoryStorage):
    """A MemoryStorage whose saves of entries wait while `gate` is unset, and which counts them."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None
        self.saves: list[int] = []  # the number of entries in each save, once it is written

    async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
        if entries and self.gate is not None:
            await self.gate.wait()
        await super().save(hard_state, entries, sync=sync)
        if entries:
            self.saves.append(len(entries))


async def gated_cluster(nursery: trio.Nursery, *, durable: bool) -> tuple[NodeCluster, RaftNode, trio.Event]:
    """Three members on GatedStorage, with a leader and converged; then every save of entries waits for the
    returned gate."""
    cluster = NodeCluster(nursery, config=node_config(durable=durable))
    storages = {node_id: GatedStorage() for node_id in ABC}
    cluster.storages.update(storages)
    await cluster.start_all(ABC)
    leader = await cluster.leader()
    await cluster.converged()
    gate = trio.Event()
    for storage in storages.values():
        storage.gate = gate
    return cluster, leader, gate


async def test_a_non_durable_cluster_commits_while_every_disk_write_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """durable=False: nothing on the commit path waits for the disk; the writes happen behind it."""
    async with trio.open_nursery() as nursery:
        cluster, leader, gate = await gated_cluster(nursery, durable=False)
        with trio.fail_after(1):
            assert await leader.propose(put("k", "v")) == b"v"
        await cluster.converged()
        assert all(machine.data == {"k": "v"} for machine in cluster.machines.values())
        gate.set()
        nursery.cancel_scope.cancel()


async def test_a_durable_cluster_commits_only_once_a_quorum_has_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """durable=True: no member acknowledges an entry (nor the leader counts its own) before its save returns."""
    async with trio.open_nursery() as nursery:
        cluster, leader, gate = await gated_cluster(nursery, durable=True)
        results: list[bytes] = []

        async def propose() -> None:
            results.append(await leader.propose(put("k", "v"), timeout=30))

        nursery.start_soon(propose)
        await trio.sleep(5)
        assert not results and leader.status().commit_index < leader.status().last_index
        gate.set()
        await cluster.wait_for(lambda: bool(results))
        assert results == [b"v"]
        nursery.cancel_scope.cancel()


async def test_a_non_durable_member_writes_everything_it_was_handed_when_it_stops_cleanly(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The writes behind the commit path are written in order, merged, and finished at a clean stop."""

    class SlowFileStorage(FileStorage):
        saves = 0

        async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
            assert not sync
            self.saves += 1
            await trio.sleep(0.5)  # a slow disk: proposals keep arriving meanwhile
            await super().save(hard_state, entries, sync=sync)

    storage = SlowFileStorage(tmp_path / "solo")
    machine = KeyValue()
    node = RaftNode("solo", "mem://solo", {}, state_machine=machine, storage=storage, config=node_config(durable=False))
    count = 200
    async with node:
        await node.wait_for_leader()
        for first in range(0, count, count // 4):  # in rounds, each handed over while the last is written
            async with trio.open_nursery() as nursery:
                for i in range(first, first + count // 4):
                    # A generous timeout: FileStorage writes in a worker thread, and while it does the
                    # autojump clock may leap to the next deadline.
                    nursery.start_soon(functools.partial(node.propose, put(f"k{i}", str(i)), timeout=3600))
        assert node.status().applied_index == node.status().last_index
        assert node._unwritten, "the test needs writes still queued at the stop"
        last_index = node.status().last_index
    assert storage.saves < count  # batches handed over while the writer was busy went as one save
    await storage.close()
    state = await FileStorage(tmp_path / "solo").load()
    assert state.entries[-1].index == last_index
    written = {entry.data for entry in state.entries}
    assert all(put(f"k{i}", str(i)) in written for i in range(count))


async def test_a_non_durable_member_stops_handing_writes_over_while_too_many_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """`max_unwritten_entries` bounds the memory the writes behind the commit path can take."""
    storage = GatedStorage()
    gate = trio.Event()
    node = RaftNode(
        "solo",
        "mem://solo",
        {},
        state_machine=KeyValue(),
        storage=storage,
        config=node_config(durable=False, max_unwritten_entries=10, max_pending_proposals=100),
    )
    async with node:
        await node.wait_for_leader()
        await trio.sleep(1)
        start = node.status().last_index
        storage.gate = gate
        async with trio.open_nursery() as nursery:
            for i in range(50):  # five rounds of ten: 10 queued are allowed, 20 are not
                nursery.start_soon(node.propose, put(f"k{i}", "v"))
                if i % 10 == 9:
                    await trio.sleep(0.1)
            # The writer holds the first round at the gate; the second is queued behind it; the third is
            # appended and queued, and then the member waits; the last two are not even appended.
            status = node.status()
            assert status.applied_index == start + 20 and status.last_index == start + 30
            gate.set()
        assert node.status().applied_index == start + 50


def test_later_saves_merge_into_a_queued_batch_as_writing_both_would_leave_the_storage() -> None:
    def entries(first: int, last: int, term: int = 1) -> tuple[Entry, ...]:
        return tuple(Entry(term, index, data=b"%d" % index) for index in range(first, last + 1))

    batch = _Batch(None, list(entries(5, 8)))
    assert batch.merge(HardState(1, "a", 0), entries(9, 10))  # follows on
    assert [e.index for e in batch.entries] == [5, 6, 7, 8, 9, 10] and batch.hard_state == HardState(1, "a", 0)
    assert batch.merge(None, entries(7, 7, term=2))  # a conflict truncates from index 7
    assert [(e.index, e.term) for e in batch.entries] == [(5, 1), (6, 1), (7, 2)]
    assert batch.merge(None, entries(3, 4, term=3))  # before the batch: it replaces all of it
    assert [(e.index, e.term) for e in batch.entries] == [(3, 3), (4, 3)]
    assert batch.hard_state == HardState(1, "a", 0)  # no new hard state: the last one stays
    assert not batch.merge(HardState(2, None, 0), entries(9, 9))  # a gap: not merged, unchanged
    assert [e.index for e in batch.entries] == [3, 4] and batch.hard_state == HardState(1, "a", 0)


async def test_a_proposal_waiting_for_room_goes_before_one_made_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A finishing proposal hands its place to the first waiting one. When its caller could take the place
    back at once, a writer that proposes again as soon as it is answered starved the waiting proposals
    until they timed out (about 20,000 per benchmark run at windows of 10,000 and more)."""
    async with open_node_cluster(ABC, config=node_config(max_pending_proposals=1)) as cluster:
        leader = await cluster.leader()
        cluster.network.hold = lambda m: isinstance(m, AppendEntries) and bool(m.entries)  # nothing commits
        order: list[str] = []

        async def greedy() -> None:
            await leader.propose(put("first", "1"), timeout=30)
            order.append("first")
            await leader.propose(put("third", "3"), timeout=30)  # at once: no checkpoint in between
            order.append("third")

        async def patient() -> None:
            await leader.propose(put("second", "2"), timeout=30)
            order.append("second")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(greedy)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(patient)
            await trio.testing.wait_all_tasks_blocked()
            cluster.network.hold = None
            cluster.network.release(lambda m: True)
        assert order == ["first", "second", "third"]


class VoteRecordingStorage(MemoryStorage):
    """A MemoryStorage that remembers the last term and vote written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.term_vote: tuple[int, str | None] = (0, None)

    async def save(self, hard_state: HardState | None, entries: Sequence[Entry], *, sync: bool = True) -> None:
        await super().save(hard_state, entries, sync=sync)
        if hard_state is not None:
            self.term_vote = (hard_state.term, hard_state.vote)


async def test_a_non_durable_member_gathers_its_writes_for_write_behind_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage = GatedStorage()  # never gated here: it only counts the saves
    config = node_config(durable=False, write_behind_delay=1.0)
    node = RaftNode("solo", "mem://solo", {}, state_machine=KeyValue(), storage=storage, config=config)
    async with node:
        await node.wait_for_leader()
        await trio.sleep(2)
        before = list(storage.saves)
        for i in range(5):
            await node.propose(put(f"k{i}", "v"))  # committed at once; the writes wait
            await trio.sleep(0.1)
        assert storage.saves == before
        await trio.sleep(1)
        assert storage.saves == [*before, 5]  # one save for the five


@pytest.mark.parametrize("write_behind_delay", [0.0, 30.0])
async def test_a_non_durable_member_writes_its_vote_before_it_sends_it(
    autojump_clock: trio.testing.MockClock, write_behind_delay: float
) -> None:
    """A vote is written (without fsync) before it is granted, so a member killed right after voting does
    not vote again in that term when it restarts (which could elect two leaders); and it is written at
    once, not after the writer's `write_behind_delay`, or every election would wait for it."""
    granted: list[RequestVoteResponse] = []
    unwritten: list[RequestVoteResponse] = []
    async with trio.open_nursery() as nursery:
        cluster = NodeCluster(nursery, config=node_config(durable=False, write_behind_delay=write_behind_delay))
        storages = {node_id: VoteRecordingStorage() for node_id in ABC}
        cluster.storages.update(storages)

        def observe(message: Message) -> bool:
            if isinstance(message, RequestVoteResponse) and message.granted and not message.pre_vote:
                granted.append(message)
                if storages[message.source].term_vote != (message.term, message.target):
                    unwritten.append(message)
            return False  # hold nothing

        cluster.network.hold = observe
        await cluster.start_all(ABC)
        leader = await cluster.leader()
        await leader.transfer_leadership()  # a second election
        await cluster.leader()
        nursery.cancel_scope.cancel()
    assert len(granted) >= 2
    assert unwritten == []
