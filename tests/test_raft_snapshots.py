"""Log compaction and InstallSnapshot in chunks (Raft §7), on cores driven by hand."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from graft_trio.raft import CoreConfig, Member, Snapshot
from graft_trio.raft.messages import (
    AppendEntries,
    InstallSnapshot,
    InstallSnapshotResponse,
    SnapshotMeta,
)
from graft_trio.raft.node import decode_applied_state, encode_applied_state
from graft_trio.raft.progress import ProgressState
from tests.raft_cluster import CoreCluster, decode_applied, membership_of

ABC = ["a", "b", "c"]
SMALL_CHUNKS = CoreConfig(snapshot_chunk_bytes=16)


def commands(count: int, prefix: str = "x") -> list[bytes]:
    return [f"{prefix}{i}".encode() for i in range(count)]


def behind_the_compaction_point(config: CoreConfig | None = None, count: int = 10) -> CoreCluster:
    """c misses `count` commands while isolated; a and b then compact their logs past them."""
    c = CoreCluster(ABC, config=config)
    c.elect("a")
    c.isolate("c")
    for command in commands(count):
        c.propose("a", command)
    c.tick(["a", "b"], times=c.config.heartbeat_ticks)
    c.compact("a")
    c.compact("b")
    assert c["a"].log.offset > c["c"].log.last_index
    return c


def installs(c: CoreCluster, target: str) -> list[InstallSnapshot]:
    return [m for m in c.messages_of(InstallSnapshot, target=target) if isinstance(m, InstallSnapshot)]


def test_compaction_drops_entries_up_to_the_snapshot_and_keeps_positions() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    for command in commands(5):
        c.propose("a", command)
    last, last_term = a.log.last_index, a.log.last_term
    snapshot = c.compact("a", trailing=2)
    assert snapshot.meta.index == a.log.applied
    assert a.log.offset == snapshot.meta.index - 2
    assert (a.log.last_index, a.log.last_term) == (last, last_term)
    assert a.log.term(a.log.offset - 1) is None
    assert a.log.membership == membership_of(ABC)
    assert decode_applied(snapshot.data) == commands(5)


def test_follower_behind_the_compaction_point_is_sent_the_snapshot() -> None:
    c = behind_the_compaction_point()
    c.heal()
    c.tick(times=c.config.heartbeat_ticks)
    assert installs(c, "c")
    assert c.snapshots_received["c"] and c.snapshots_received["c"][-1].meta.index == c["a"].snapshot.meta.index  # type: ignore[union-attr]
    assert c.applied["c"] == commands(10)
    c.tick(times=c.config.heartbeat_ticks)
    c.propose("a", b"after")
    c.tick(times=c.config.heartbeat_ticks)
    assert c.applied["c"] == [*commands(10), b"after"]
    assert c["a"].progress["c"].state is ProgressState.REPLICATE


def test_follower_that_installed_a_snapshot_is_sent_new_entries_at_once() -> None:
    c = behind_the_compaction_point()
    c.heal()
    c.tick(times=c.config.heartbeat_ticks)
    assert c.applied["c"] == commands(10)
    c.propose("a", b"after")
    assert c["c"].log.last_index == c["a"].log.last_index


def test_snapshot_is_sent_in_chunks_of_the_configured_size() -> None:
    c = behind_the_compaction_point(SMALL_CHUNKS)
    c.heal()
    c.tick(times=c.config.heartbeat_ticks)
    chunks = installs(c, "c")
    snapshot = c["a"].snapshot
    assert snapshot is not None and len(chunks) == -(-len(snapshot.data) // 16) > 3
    assert [m.offset for m in chunks] == list(range(0, len(snapshot.data), 16))
    assert [m.done for m in chunks] == [False] * (len(chunks) - 1) + [True]
    assert b"".join(m.data for m in chunks) == snapshot.data
    assert c.applied["c"] == commands(10)


def test_a_lost_snapshot_chunk_is_sent_again() -> None:
    c = behind_the_compaction_point(SMALL_CHUNKS)
    c.heal()
    c.drop_first(lambda m: isinstance(m, InstallSnapshot) and m.offset == 32)
    c.tick(times=c.config.heartbeat_ticks)
    assert c.applied["c"] == []  # stalled on the lost chunk
    c.tick(times=c.config.heartbeat_ticks)  # the leader resends it on the next heartbeat
    assert [m.offset for m in installs(c, "c")].count(32) == 1  # (the lost one was not delivered)
    assert c.applied["c"] == commands(10)


def test_a_lost_snapshot_reply_makes_the_leader_send_the_chunk_again() -> None:
    c = behind_the_compaction_point(SMALL_CHUNKS)
    c.heal()
    c.drop_first(lambda m: isinstance(m, InstallSnapshotResponse) and m.next_offset == 48)
    c.tick(times=2 * c.config.heartbeat_ticks)
    assert [m.offset for m in installs(c, "c")].count(32) == 2  # the duplicate is harmless
    assert c.applied["c"] == commands(10)


def test_a_chunk_that_arrives_ahead_of_the_follower_is_answered_with_the_offset_it_needs() -> None:
    c = behind_the_compaction_point(SMALL_CHUNKS)
    snapshot = c["a"].snapshot
    assert snapshot is not None
    c.heal()
    follower = c["c"]
    term = c["a"].term
    follower.step(InstallSnapshot("a", "c", term, snapshot.meta, 0, snapshot.data[:16], False))
    follower.step(InstallSnapshot("a", "c", term, snapshot.meta, 48, snapshot.data[48:64], False))
    replies = [m for m in c.queued(InstallSnapshotResponse, source="c") if isinstance(m, InstallSnapshotResponse)]
    assert [(m.next_offset, m.done) for m in replies] == [(16, False), (16, False)]


def test_follower_whose_log_matches_the_snapshot_keeps_the_entries_after_it() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    for command in commands(4):
        c.propose("a", command)
    snapshot = Snapshot(a.snapshot_meta(4), b"[]")
    b = c["b"]
    b.log.committed = 3  # b has every entry, but only knows index 3 is committed
    c.applied["b"] = []
    last = b.log.last_index
    b.step(InstallSnapshot("a", "b", a.term, snapshot.meta, 0, snapshot.data, True))
    ready = b.ready()
    assert ready.snapshot == snapshot and not ready.discard_log
    assert b.log.offset == 4 and b.log.last_index == last


def test_follower_whose_log_conflicts_with_the_snapshot_discards_it() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    for command in commands(4):
        c.propose("a", command)
    meta = SnapshotMeta(a.log.last_index + 5, a.term + 3, a.membership)
    b = c["b"]
    b.step(InstallSnapshot("a", "b", a.term, meta, 0, b"[]", True))
    ready = b.ready()
    assert ready.snapshot is not None and ready.discard_log
    assert (b.log.offset, b.log.last_index, b.log.last_term) == (meta.index, meta.index, meta.term)


def test_a_snapshot_the_follower_already_has_is_answered_with_its_commit_index() -> None:
    c = CoreCluster(ABC)
    a = c.elect("a")
    for command in commands(4):
        c.propose("a", command)
    b = c["b"]
    b.step(InstallSnapshot("a", "b", a.term, a.snapshot_meta(3), 0, b"[]", True))
    (reply,) = c.queued(InstallSnapshotResponse, source="b")
    assert isinstance(reply, InstallSnapshotResponse) and reply.done and reply.meta_index == b.log.committed
    assert not b.has_ready()


def test_installed_snapshot_brings_the_membership_with_it() -> None:
    c = CoreCluster(ABC, extra=["d"])
    a = c.elect("a")
    for command in commands(3):
        c.propose("a", command)
    c.isolate("d")
    a.propose_membership(a.membership.with_member(Member("d", "addr-d", voter=False)), "")
    c.deliver()
    c.tick(times=c.config.heartbeat_ticks)
    c.compact("a")
    c.heal()
    c.tick(times=c.config.heartbeat_ticks)
    c.propose("a", b"tail")
    c.tick(times=c.config.heartbeat_ticks)
    assert c.snapshots_received["d"]  # d started empty and the log it needs is compacted away
    assert c["d"].membership == a.membership and c["d"].log.membership_index == c["d"].log.offset
    assert c.applied["d"] == [*commands(3), b"tail"]


def test_follower_slightly_behind_is_served_from_the_trailing_log_not_a_snapshot() -> None:
    c = CoreCluster(ABC)
    c.elect("a")
    c.isolate("c")
    for command in commands(3):
        c.propose("a", command)
    c.compact("a", trailing=5)
    c.heal()
    c.tick(times=c.config.heartbeat_ticks)
    c.propose("a", b"after")
    assert not installs(c, "c")
    assert c.applied["c"] == [*commands(3), b"after"]


def test_member_restarts_from_its_snapshot_and_the_log_after_it() -> None:
    c = CoreCluster(ABC)
    c.elect("a")
    for command in commands(5):
        c.propose("a", command)
    c.tick(times=c.config.heartbeat_ticks)
    c.compact("b", trailing=1)
    c.propose("a", b"tail")
    c.tick(times=c.config.heartbeat_ticks)
    c.crash("b")
    b = c.restart("b")
    assert b.snapshot is not None and b.log.offset == b.snapshot.meta.index
    c.flush("b")
    assert c.applied["b"] == [*commands(5), b"tail"]


def test_leader_that_compacts_again_while_sending_a_snapshot_finishes_the_one_in_flight() -> None:
    c = behind_the_compaction_point(SMALL_CHUNKS)
    first = c["a"].snapshot
    assert first is not None
    c.heal()
    c.drop = lambda m: isinstance(m, InstallSnapshot) and m.offset >= 32  # stall the transfer midway
    c.tick(times=c.config.heartbeat_ticks)
    c.drop = None
    c.cut.update({("a", "c"), ("c", "a")})
    for command in commands(5, prefix="y"):
        c.propose("a", command)
    second = c.compact("a")
    assert second.meta.index > first.meta.index
    c.heal()
    before = len(c.delivered)
    c.tick(times=c.config.heartbeat_ticks * 3)
    c.propose("a", b"end")
    c.tick(times=c.config.heartbeat_ticks)
    sent = [m for m in c.delivered[before:] if isinstance(m, InstallSnapshot) and m.target == "c"]
    # The transfer resumes where the follower stopped, not from offset 0 of the newer snapshot: restarting
    # at every new snapshot starved a follower whose transfer outlasted the leader's snapshot interval.
    assert (sent[0].meta.index, sent[0].offset) == (first.meta.index, 32)
    assert [m.meta.index for m in sent] == sorted(m.meta.index for m in sent)  # the first one, then the second
    assert {m.meta.index for m in sent} == {first.meta.index, second.meta.index}
    assert c.applied["c"] == [*commands(10), *commands(5, prefix="y"), b"end"]


def test_a_duplicated_snapshot_reply_does_not_start_a_second_stream_of_chunks() -> None:
    c = behind_the_compaction_point(SMALL_CHUNKS)
    c.heal()
    for _ in range(c.config.heartbeat_ticks):
        c["a"].tick()  # a heartbeat, whose reply shows c behind the log: the first chunk goes out
    while not c.queued(InstallSnapshotResponse, source="c"):
        assert c.deliver_one() is not None
    replies = c.queued(InstallSnapshotResponse, source="c")
    assert [m.next_offset for m in replies if isinstance(m, InstallSnapshotResponse)] == [16]
    c.queue.extend(replies)  # the network duplicates the reply
    c.deliver()
    offsets = [m.offset for m in installs(c, "c")]
    assert offsets == sorted(set(offsets))  # each chunk sent once: one stream
    assert c.applied["c"] == commands(10)


def test_snapshot_replaces_entries_in_the_append_stream_of_a_follower_that_fell_far_behind() -> None:
    c = behind_the_compaction_point()
    c.heal()
    before = len(c.delivered)
    c.tick(times=c.config.heartbeat_ticks)
    appends = [m for m in c.delivered[before:] if isinstance(m, AppendEntries) and m.target == "c"]
    assert appends
    assert all(m.prev_log_index >= c["a"].log.offset for m in appends)


# --- the dedup table in a snapshot ----------------------------------------------------------------------


@given(
    st.dictionaries(st.text(max_size=12), st.binary(max_size=12), max_size=20),
    st.binary(max_size=30),
)
def test_the_dedup_table_and_state_round_trip_through_a_snapshot(dedup: dict[str, bytes], state: bytes) -> None:
    decoded, decoded_state = decode_applied_state(encode_applied_state(dedup, state))
    assert list(decoded.items()) == list(dedup.items())  # in order: the oldest is evicted first
    assert decoded_state == state


def test_a_snapshot_in_the_first_layout_of_the_dedup_table_is_still_read() -> None:
    first_layout = b"".join(
        [struct.pack(">I", 2), struct.pack(">II", 3, 1), b"a/1", b"x", struct.pack(">II", 4, 0), b"b/\xc3\xa9", b"S"]
    )
    assert decode_applied_state(first_layout) == ({"a/1": b"x", "b/é": b""}, b"S")
