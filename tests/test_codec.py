"""The wire codec for Raft messages: every message survives a round trip, and bad bytes only raise CodecError."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graft_trio.raft import codec
from graft_trio.raft.codec import CodecError, decode_message, encode_message
from graft_trio.raft.messages import (
    MESSAGE_TYPES,
    AppendEntries,
    AppendEntriesResponse,
    CommitNotice,
    Entry,
    EntryKind,
    ForwardBatch,
    ForwardProposal,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    Member,
    Membership,
    MembershipOutcome,
    MembershipRequest,
    MembershipResponse,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    RequestVoteResponse,
    SnapshotMeta,
    TimeoutNow,
)

EXAMPLES = settings(max_examples=200, deadline=None)

# Realistic values, plus the edges of the format: hypothesis favours 0 and 2**64 - 1 within these ranges.
u64 = st.integers(min_value=0, max_value=2**64 - 1)
terms = st.integers(min_value=0, max_value=10_000) | u64
indexes = st.integers(min_value=0, max_value=10**9) | u64
node_ids = st.text(min_size=1, max_size=12) | st.sampled_from(["n1", "n2", "n3", "node-a", "节点"])
addresses = st.builds(lambda host, port: f"{host}:{port}", st.text(max_size=20), st.integers(1, 65535))
payloads = st.binary(max_size=300)
request_ids = st.text(max_size=36)

members = st.builds(Member, node_id=node_ids, address=addresses, voter=st.booleans())
memberships = st.builds(Membership.of, st.lists(members, max_size=5, unique_by=lambda m: m.node_id))
entries = st.builds(
    Entry,
    term=terms,
    index=indexes,
    kind=st.sampled_from(EntryKind),
    data=payloads,
    request_id=request_ids,
    membership=st.none() | memberships,
)
snapshot_metas = st.builds(SnapshotMeta, index=indexes, term=terms, membership=memberships)

MESSAGE_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    RequestVote: st.builds(
        RequestVote,
        source=node_ids,
        target=node_ids,
        term=terms,
        last_log_index=indexes,
        last_log_term=terms,
        pre_vote=st.booleans(),
        transfer=st.booleans(),
    ),
    RequestVoteResponse: st.builds(
        RequestVoteResponse,
        source=node_ids,
        target=node_ids,
        term=terms,
        granted=st.booleans(),
        pre_vote=st.booleans(),
    ),
    AppendEntries: st.builds(
        AppendEntries,
        source=node_ids,
        target=node_ids,
        term=terms,
        prev_log_index=indexes,
        prev_log_term=terms,
        entries=st.lists(entries, max_size=8).map(tuple),
        leader_commit=indexes,
    ),
    AppendEntriesResponse: st.builds(
        AppendEntriesResponse,
        source=node_ids,
        target=node_ids,
        term=terms,
        success=st.booleans(),
        match_index=indexes,
        rejected_index=indexes,
        hint_index=indexes,
        hint_term=terms,
    ),
    Heartbeat: st.builds(Heartbeat, source=node_ids, target=node_ids, term=terms, commit=indexes, read_context=u64),
    CommitNotice: st.builds(
        CommitNotice, source=node_ids, target=node_ids, term=terms, commit=indexes, read_context=u64
    ),
    HeartbeatResponse: st.builds(HeartbeatResponse, source=node_ids, target=node_ids, term=terms, read_context=u64),
    InstallSnapshot: st.builds(
        InstallSnapshot,
        source=node_ids,
        target=node_ids,
        term=terms,
        meta=snapshot_metas,
        offset=indexes,
        data=payloads,
        done=st.booleans(),
    ),
    InstallSnapshotResponse: st.builds(
        InstallSnapshotResponse,
        source=node_ids,
        target=node_ids,
        term=terms,
        meta_index=indexes,
        next_offset=indexes,
        done=st.booleans(),
    ),
    TimeoutNow: st.builds(TimeoutNow, source=node_ids, target=node_ids, term=terms),
    ForwardProposal: st.builds(
        ForwardProposal, source=node_ids, target=node_ids, term=terms, data=payloads, request_id=request_ids
    ),
    ForwardBatch: st.builds(
        ForwardBatch,
        source=node_ids,
        target=node_ids,
        term=terms,
        data=st.lists(payloads, max_size=5).map(codec.encode_commands),
        request_id=request_ids,
    ),
    ReadIndexRequest: st.builds(ReadIndexRequest, source=node_ids, target=node_ids, term=terms, context=u64),
    ReadIndexResponse: st.builds(
        ReadIndexResponse, source=node_ids, target=node_ids, term=terms, context=u64, index=indexes
    ),
    MembershipRequest: st.builds(
        MembershipRequest,
        source=node_ids,
        target=node_ids,
        term=terms,
        request_id=request_ids,
        origin=node_ids,
        origin_address=addresses,
        node_id=node_ids,
        address=addresses,
        voter=st.booleans(),
        remove=st.booleans(),
    ),
    MembershipResponse: st.builds(
        MembershipResponse,
        source=node_ids,
        target=node_ids,
        term=terms,
        request_id=request_ids,
        outcome=st.sampled_from(MembershipOutcome),
        leader_id=st.just("") | node_ids,
        reason=st.text(max_size=40),
    ),
}
messages: st.SearchStrategy[Message] = st.one_of(*MESSAGE_STRATEGIES.values())
frames = messages.map(encode_message)


def decode_or_refuse(data: bytes) -> Message | None:
    """Decode `data`; None if it was refused. Any exception other than CodecError fails the test."""
    try:
        message = decode_message(data)
    except CodecError:
        return None
    assert isinstance(message, MESSAGE_TYPES)
    return message


def test_every_message_type_has_a_strategy_and_a_distinct_tag() -> None:
    assert set(MESSAGE_STRATEGIES) == set(MESSAGE_TYPES)
    assert set(codec.MESSAGE_TAGS) == set(MESSAGE_TYPES)
    assert len(set(codec.MESSAGE_TAGS.values())) == len(MESSAGE_TYPES)


@pytest.mark.parametrize("message_type", MESSAGE_TYPES, ids=lambda t: t.__name__)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_each_message_type_round_trips(message_type: type[Any], data: st.DataObject) -> None:
    message = data.draw(MESSAGE_STRATEGIES[message_type])
    frame = encode_message(message)
    assert frame[:2] == bytes([codec.WIRE_VERSION, codec.MESSAGE_TAGS[message_type]])
    assert decode_message(frame) == message


@EXAMPLES
@given(message=messages)
def test_decoding_accepts_a_memoryview(message: Message) -> None:
    assert decode_message(memoryview(encode_message(message))) == message


@EXAMPLES
@given(data=st.binary(max_size=200))
def test_random_bytes_decode_or_raise_codec_error(data: bytes) -> None:
    decode_or_refuse(data)


@EXAMPLES
@given(frame=frames, data=st.data())
def test_every_truncation_is_refused(frame: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    with pytest.raises(CodecError):
        decode_message(frame[:cut])


@EXAMPLES
@given(frame=frames, extra=st.binary(min_size=1, max_size=16))
def test_trailing_bytes_are_refused(frame: bytes, extra: bytes) -> None:
    with pytest.raises(CodecError, match="unexpected bytes"):
        decode_message(frame + extra)


@EXAMPLES
@given(frame=frames, version=st.integers(0, 255).filter(lambda v: v != codec.WIRE_VERSION))
def test_an_unknown_version_is_refused(frame: bytes, version: int) -> None:
    with pytest.raises(CodecError, match="version"):
        decode_message(bytes([version]) + frame[1:])


@EXAMPLES
@given(frame=frames, tag=st.integers(0, 255).filter(lambda t: t not in codec.MESSAGE_TAGS.values()))
def test_an_unknown_tag_is_refused(frame: bytes, tag: int) -> None:
    with pytest.raises(CodecError, match="tag"):
        decode_message(frame[:1] + bytes([tag]) + frame[2:])


@EXAMPLES
@given(frame=frames, tag=st.sampled_from(sorted(codec.MESSAGE_TAGS.values())))
def test_a_frame_read_as_another_type_decodes_or_raises_codec_error(frame: bytes, tag: int) -> None:
    decode_or_refuse(frame[:1] + bytes([tag]) + frame[2:])


@EXAMPLES
@given(frame=frames, data=st.data())
def test_a_corrupted_byte_decodes_or_raises_codec_error(frame: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(min_value=0, max_value=len(frame) - 1))
    value = data.draw(st.integers(0, 255))
    decode_or_refuse(frame[:position] + bytes([value]) + frame[position + 1 :])


def test_invalid_utf8_is_refused() -> None:
    frame = encode_message(TimeoutNow(source="ab", target="n2", term=1))
    source = struct.pack("<I", 2) + b"ab"
    assert frame[2:8] == source
    with pytest.raises(CodecError, match="UTF-8"):
        decode_message(frame[:2] + struct.pack("<I", 2) + b"\xff\xfe" + frame[8:])


def test_an_invalid_boolean_is_refused() -> None:
    frame = encode_message(TimeoutNow(source="a", target="b", term=1))
    vote = encode_message(RequestVoteResponse(source="a", target="b", term=1, granted=True))
    assert vote[-2:] == b"\x01\x00"
    with pytest.raises(CodecError, match="boolean"):
        decode_message(vote[:-2] + b"\x02\x00")
    assert decode_message(frame) == TimeoutNow(source="a", target="b", term=1)


def test_an_unknown_entry_kind_is_refused() -> None:
    frame = encode_message(
        AppendEntries(
            source="a", target="b", term=1, prev_log_index=0, prev_log_term=0, entries=(Entry(1, 1),), leader_commit=0
        )
    )
    kind_offset = 2 + (4 + 1) * 2 + 8 * 4 + 4 + 8 + 8
    assert frame[kind_offset] == EntryKind.NORMAL
    with pytest.raises(CodecError, match="entry kind"):
        decode_message(frame[:kind_offset] + b"\x09" + frame[kind_offset + 1 :])


@pytest.mark.parametrize(
    "message",
    [
        Heartbeat(source="a", target="b", term=2**64, commit=0),
        ReadIndexRequest(source="a", target="b", term=1, context=-1),
        TimeoutNow(source="\ud800", target="b", term=1),
    ],
    ids=["too-large", "negative", "surrogate"],
)
def test_encoding_what_the_format_cannot_carry_raises_codec_error(message: Message) -> None:
    with pytest.raises(CodecError, match="cannot encode"):
        encode_message(message)


def test_round_trip_check_catches_a_dropped_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """The round-trip property can fail: a planted bug that stops carrying `read_context` is caught."""
    layout = codec._LAYOUT_BY_TAG[codec.MESSAGE_TAGS[Heartbeat]]
    planted = codec._MessageLayout(layout.tag, Heartbeat, ("term", "commit"), struct.Struct("<QQ"))
    monkeypatch.setitem(codec._LAYOUT_BY_TYPE, Heartbeat, planted)
    monkeypatch.setitem(codec._LAYOUT_BY_TAG, layout.tag, planted)

    @EXAMPLES
    @given(message=MESSAGE_STRATEGIES[Heartbeat])
    def round_trip(message: Message) -> None:
        assert decode_message(encode_message(message)) == message

    with pytest.raises(AssertionError):
        round_trip()


# --- the commands of a BATCH entry ----------------------------------------------------------------------


@EXAMPLES
@given(commands=st.lists(payloads, max_size=20))
def test_a_batch_of_commands_round_trips(commands: list[bytes]) -> None:
    blob = codec.encode_commands(commands)
    codec.check_commands(blob)
    assert codec.decode_commands(blob) == commands


@EXAMPLES
@given(commands=st.lists(payloads, min_size=1, max_size=5), data=st.data())
def test_a_damaged_batch_of_commands_decodes_or_raises_codec_error(commands: list[bytes], data: st.DataObject) -> None:
    blob = codec.encode_commands(commands)
    cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    with pytest.raises(CodecError):
        codec.decode_commands(blob[:cut])  # every truncation is refused
    with pytest.raises(CodecError):
        codec.check_commands(blob + b"x")  # and trailing bytes
    position = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    damaged = blob[:position] + bytes([data.draw(st.integers(0, 255))]) + blob[position + 1 :]
    try:
        decoded = codec.decode_commands(damaged)
    except CodecError:
        return
    assert b"".join(decoded) == damaged[4 * (len(decoded) + 1) :]  # what decodes covers the blob exactly


def test_a_batch_claiming_more_commands_than_it_holds_is_refused_without_reading_them() -> None:
    with pytest.raises(CodecError, match="before their lengths"):
        codec.decode_commands(struct.pack("<I", 2**32 - 1) + b"\x00" * 16)
