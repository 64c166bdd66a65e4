"""The binary encodings of the records a member keeps on disk and of the messages it sends to its peers.

`FileStorage` frames and checksums these bytes; this module only turns records into bytes and back. The
format is little-endian, struct-packed and length-prefixed (no pickle: a file written by one version
must be readable, or clearly refused, by the next). Every top-level blob starts with a one-byte format
version, so a reader refuses data written in a format it does not know instead of misreading it.

Layouts (version 1)::

    batch    = version:u8 flags:u8 count:u32 [hard_state] entry*count   (flags bit 0: hard state present)
    hard     = term:u64 commit:u64 has_vote:u8 [vote:str]
    entry    = term:u64 index:u64 kind:u8 has_membership:u8 data:bytes request_id:str [membership]
    commands = count:u32 length:u32*count (command bytes)*count   (a BATCH entry's data; `encode_commands`)
    meta     = version:u8 index:u64 term:u64 membership
    members  = count:u32 (node_id:str address:str voter:u8)*count
    str      = bytes of its UTF-8 encoding;  bytes = length:u32 followed by that many bytes

Messages (`encode_message`, wire version 1, versioned apart from the records; docs/WIRE.md has the table)::

    message  = version:u8 tag:u8 source:str target:str fixed-fields [tail]
"""

from __future__ import annotations

import itertools
import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from graft_trio.raft.messages import (
    AppendEntries,
    AppendEntriesResponse,
    CommitNotice,
    Entry,
    EntryKind,
    ForwardBatch,
    ForwardProposal,
    HardState,
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

FORMAT_VERSION = 1

_BATCH = struct.Struct("<BBI")
_HARD_STATE = struct.Struct("<QQB")
_ENTRY = struct.Struct("<QQBBI")  # term, index, kind, has_membership, len(data)
_META = struct.Struct("<BQQ")
_U32 = struct.Struct("<I")
_U8 = struct.Struct("<B")

_HAS_HARD_STATE = 0x01


class CodecError(ValueError):
    """The bytes are not a record of a format this version can read."""


def encode_batch(hard_state: HardState | None, entries: Sequence[Entry]) -> bytes:
    """One write to the log: an optional hard state and any number of entries, as one blob."""
    parts: list[bytes] = [_BATCH.pack(FORMAT_VERSION, _HAS_HARD_STATE if hard_state is not None else 0, len(entries))]
    if hard_state is not None:
        _encode_hard_state(parts, hard_state)
    parts.append(_ENTRY_RUNS.encode(entries))
    return b"".join(parts)


def decode_batch(blob: bytes | memoryview) -> tuple[HardState | None, list[Entry]]:
    """The inverse of `encode_batch`; raises `CodecError` on anything else."""
    with _Reader(blob) as reader:
        version, flags, count = reader.unpack(_BATCH)
        _check_version(version)
        if flags & ~_HAS_HARD_STATE:
            raise CodecError(f"unknown batch flags {flags:#x}")
        hard_state = _decode_hard_state(reader) if flags & _HAS_HARD_STATE else None
        entries = [_decode_entry(reader) for _ in range(count)]
    return hard_state, entries


def encode_commands(commands: Sequence[bytes]) -> bytes:
    """Several commands (or their results) as one blob: the data of an `EntryKind.BATCH` entry."""
    count = len(commands)
    return struct.pack(f"<I{count}I", count, *map(len, commands)) + b"".join(commands)


def decode_commands(blob: bytes) -> list[bytes]:
    """The inverse of `encode_commands`; raises `CodecError` on anything else."""
    return [blob[begin:end] for begin, end in itertools.pairwise(_command_bounds(blob))]


def check_commands(blob: bytes) -> None:
    """Raise `CodecError` unless `blob` is an `encode_commands` encoding (without slicing it up)."""
    _command_bounds(blob)


def _command_bounds(blob: bytes) -> list[int]:
    """Where each command of an `encode_commands` blob starts, and where the last one ends."""
    if len(blob) < _U32.size:
        raise CodecError("a batch of commands ends before its count")
    (count,) = _U32.unpack_from(blob)
    start = _U32.size * (count + 1)
    if start > len(blob):
        raise CodecError(f"a batch of {count} commands ends before their lengths")
    bounds = list(itertools.accumulate(struct.unpack_from(f"<{count}I", blob, _U32.size), initial=start))
    if bounds[-1] != len(blob):
        raise CodecError(f"a batch of commands of {bounds[-1] - start} bytes has {len(blob) - start}")
    return bounds


def encode_snapshot_meta(meta: SnapshotMeta) -> bytes:
    parts: list[bytes] = [_META.pack(FORMAT_VERSION, meta.index, meta.term)]
    _encode_membership(parts, meta.membership)
    return b"".join(parts)


def decode_snapshot_meta(blob: bytes | memoryview) -> SnapshotMeta:
    with _Reader(blob) as reader:
        version, index, term = reader.unpack(_META)
        _check_version(version)
        membership = _decode_membership(reader)
    return SnapshotMeta(index=index, term=term, membership=membership)


# --- pieces -----------------------------------------------------------------------------------------


def _check_version(version: int) -> None:
    if version != FORMAT_VERSION:
        raise CodecError(f"record format version {version}, this version reads {FORMAT_VERSION}")


def _encode_bytes(parts: list[bytes], value: bytes) -> None:
    parts.append(_U32.pack(len(value)))
    parts.append(value)


def _encode_hard_state(parts: list[bytes], hard_state: HardState) -> None:
    parts.append(_HARD_STATE.pack(hard_state.term, hard_state.commit, hard_state.vote is not None))
    if hard_state.vote is not None:
        _encode_bytes(parts, hard_state.vote.encode())


def _decode_hard_state(reader: _Reader) -> HardState:
    term, commit, has_vote = reader.unpack(_HARD_STATE)
    vote = reader.string() if reader.flag(has_vote) else None
    return HardState(term=term, vote=vote, commit=commit)


def _encode_entry(parts: list[bytes], entry: Entry) -> None:
    parts.append(_ENTRY.pack(entry.term, entry.index, entry.kind, entry.membership is not None, len(entry.data)))
    parts.append(entry.data)
    _encode_bytes(parts, entry.request_id.encode())
    if entry.membership is not None:
        _encode_membership(parts, entry.membership)


class _EntryRunCache:
    """The encoding of the last run of entries encoded, reused when the same run is encoded again.

    A leader sends its new entries to every follower and writes the same ones to its log: one encoding
    serves all of them. The same run means the same `Entry` objects (immutable, and kept alive here, so
    identity cannot be reused), compared one by one. One slot, replaced whole: the log writes encode in
    a worker thread, which must never see half an update.
    """

    def __init__(self) -> None:
        self._last: tuple[tuple[Entry, ...], bytes] = ((), b"")

    def encode(self, entries: Sequence[Entry]) -> bytes:
        cached, encoded = self._last
        if len(cached) == len(entries) and all(map(operator.is_, cached, entries)):
            return encoded
        parts: list[bytes] = []
        for entry in entries:
            _encode_entry(parts, entry)
        encoded = b"".join(parts)
        self._last = (tuple(entries), encoded)
        return encoded


_ENTRY_RUNS = _EntryRunCache()


def _decode_entry(reader: _Reader) -> Entry:
    term, index, kind, has_membership, data_length = reader.unpack(_ENTRY)
    data = reader.take(data_length)
    request_id = reader.string()
    membership = _decode_membership(reader) if reader.flag(has_membership) else None
    try:
        entry_kind = EntryKind(kind)
    except ValueError:
        raise CodecError(f"unknown entry kind {kind}") from None
    return Entry(term=term, index=index, kind=entry_kind, data=data, request_id=request_id, membership=membership)


def _encode_membership(parts: list[bytes], membership: Membership) -> None:
    parts.append(_U32.pack(len(membership.members)))
    for member in membership.members:
        _encode_bytes(parts, member.node_id.encode())
        _encode_bytes(parts, member.address.encode())
        parts.append(_U8.pack(member.voter))


def _decode_membership(reader: _Reader) -> Membership:
    (count,) = reader.unpack(_U32)
    members = []
    for _ in range(count):
        node_id = reader.string()
        address = reader.string()
        (voter,) = reader.unpack(_U8)
        members.append(Member(node_id=node_id, address=address, voter=reader.flag(voter)))
    # Stored members are already sorted; `of` keeps equal memberships equal even if they were not.
    return Membership.of(members)


class _Reader:
    """A cursor over a blob that turns every way of running off its end into `CodecError`."""

    def __init__(self, blob: bytes | memoryview) -> None:
        self._view = memoryview(blob)
        self._offset = 0

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None and self._offset != len(self._view):
            raise CodecError(f"{len(self._view) - self._offset} unexpected bytes after the record")

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        end = self._offset + layout.size
        if end > len(self._view):
            raise CodecError("record ends early")
        values: tuple[int, ...] = layout.unpack_from(self._view, self._offset)
        self._offset = end
        return values

    def take(self, length: int) -> bytes:
        end = self._offset + length
        if end > len(self._view):
            raise CodecError("record ends early")
        value = bytes(self._view[self._offset : end])
        self._offset = end
        return value

    def string(self) -> str:
        (length,) = self.unpack(_U32)
        try:
            return self.take(length).decode()
        except UnicodeDecodeError as exc:
            raise CodecError(f"invalid UTF-8 in a string: {exc}") from None

    @staticmethod
    def flag(value: int) -> bool:
        if value not in (0, 1):
            raise CodecError(f"invalid boolean {value}")
        return value == 1


# --- messages between members -------------------------------------------------------------------------

WIRE_VERSION = 1  # of the message format; it changes independently of FORMAT_VERSION, the on-disk one

_MESSAGE_HEADER = struct.Struct("<BB")  # version, tag


@attrs.frozen
class _MessageLayout:
    """How one message type goes on the wire: its tag, its fixed-size fields, and any variable-size tail."""

    tag: int
    message_type: type[Any]
    fixed_fields: tuple[str, ...]  # in `fixed` order; a leading dotted name reads a nested attribute
    fixed: struct.Struct
    boolean_fields: frozenset[str] = frozenset()
    encode_tail: Callable[[list[bytes], Any], None] | None = None
    decode_tail: Callable[[_Reader], dict[str, Any]] | None = None
    get_fixed: Callable[[Any], Any] = attrs.field(init=False)

    @get_fixed.default
    def _get_fixed(self) -> Callable[[Any], Any]:
        return operator.attrgetter(*self.fixed_fields)


def _encode_append_entries_tail(parts: list[bytes], message: AppendEntries) -> None:
    parts.append(_U32.pack(len(message.entries)))
    parts.append(_ENTRY_RUNS.encode(message.entries))


def _decode_append_entries_tail(reader: _Reader) -> dict[str, Any]:
    (count,) = reader.unpack(_U32)
    return {"entries": tuple(_decode_entry(reader) for _ in range(count))}


def _encode_install_snapshot_tail(parts: list[bytes], message: InstallSnapshot) -> None:
    _encode_membership(parts, message.meta.membership)
    _encode_bytes(parts, message.data)


def _decode_install_snapshot_tail(reader: _Reader) -> dict[str, Any]:
    membership = _decode_membership(reader)
    (length,) = reader.unpack(_U32)
    return {"membership": membership, "data": reader.take(length)}


def _encode_forward_proposal_tail(parts: list[bytes], message: ForwardProposal) -> None:
    _encode_bytes(parts, message.data)
    _encode_bytes(parts, message.request_id.encode())


def _decode_forward_proposal_tail(reader: _Reader) -> dict[str, Any]:
    (length,) = reader.unpack(_U32)
    data = reader.take(length)
    return {"data": data, "request_id": reader.string()}


def _encode_membership_request_tail(parts: list[bytes], message: MembershipRequest) -> None:
    for text in (message.request_id, message.origin, message.origin_address, message.node_id, message.address):
        _encode_bytes(parts, text.encode())


def _decode_membership_request_tail(reader: _Reader) -> dict[str, Any]:
    names = ("request_id", "origin", "origin_address", "node_id", "address")
    return {name: reader.string() for name in names}


def _encode_membership_response_tail(parts: list[bytes], message: MembershipResponse) -> None:
    parts.append(_U8.pack(message.outcome))
    for text in (message.request_id, message.leader_id, message.reason):
        _encode_bytes(parts, text.encode())


def _decode_membership_response_tail(reader: _Reader) -> dict[str, Any]:
    (code,) = reader.unpack(_U8)
    try:
        outcome = MembershipOutcome(code)
    except ValueError:
        raise CodecError(f"unknown membership outcome {code}") from None
    return {"outcome": outcome, "request_id": reader.string(), "leader_id": reader.string(), "reason": reader.string()}


# Tags are part of the wire format: never renumber one, only add new ones.
_MESSAGE_LAYOUTS: tuple[_MessageLayout, ...] = (
    _MessageLayout(
        1,
        RequestVote,
        ("term", "last_log_index", "last_log_term", "pre_vote", "transfer"),
        struct.Struct("<QQQBB"),
        frozenset({"pre_vote", "transfer"}),
    ),
    _MessageLayout(
        2,
        RequestVoteResponse,
        ("term", "granted", "pre_vote"),
        struct.Struct("<QBB"),
        frozenset({"granted", "pre_vote"}),
    ),
    _MessageLayout(
        3,
        AppendEntries,
        ("term", "prev_log_index", "prev_log_term", "leader_commit"),
        struct.Struct("<QQQQ"),
        encode_tail=_encode_append_entries_tail,
        decode_tail=_decode_append_entries_tail,
    ),
    _MessageLayout(
        4,
        AppendEntriesResponse,
        ("term", "success", "match_index", "rejected_index", "hint_index", "hint_term"),
        struct.Struct("<QBQQQQ"),
        frozenset({"success"}),
    ),
    _MessageLayout(5, Heartbeat, ("term", "commit", "read_context"), struct.Struct("<QQQ")),
    _MessageLayout(16, CommitNotice, ("term", "commit", "read_context"), struct.Struct("<QQQ")),
    _MessageLayout(6, HeartbeatResponse, ("term", "read_context"), struct.Struct("<QQ")),
    _MessageLayout(
        7,
        InstallSnapshot,
        ("term", "meta.index", "meta.term", "offset", "done"),
        struct.Struct("<QQQQB"),
        frozenset({"done"}),
        encode_tail=_encode_install_snapshot_tail,
        decode_tail=_decode_install_snapshot_tail,
    ),
    _MessageLayout(
        8,
        InstallSnapshotResponse,
        ("term", "meta_index", "next_offset", "done"),
        struct.Struct("<QQQB"),
        frozenset({"done"}),
    ),
    _MessageLayout(9, TimeoutNow, ("term",), struct.Struct("<Q")),
    _MessageLayout(
        10,
        ForwardProposal,
        ("term",),
        struct.Struct("<Q"),
        encode_tail=_encode_forward_proposal_tail,
        decode_tail=_decode_forward_proposal_tail,
    ),
    _MessageLayout(11, ReadIndexRequest, ("term", "context"), struct.Struct("<QQ")),
    _MessageLayout(12, ReadIndexResponse, ("term", "context", "index"), struct.Struct("<QQQ")),
    _MessageLayout(
        13,
        MembershipRequest,
        ("term", "voter", "remove"),
        struct.Struct("<QBB"),
        frozenset({"voter", "remove"}),
        encode_tail=_encode_membership_request_tail,
        decode_tail=_decode_membership_request_tail,
    ),
    _MessageLayout(
        14,
        MembershipResponse,
        ("term",),
        struct.Struct("<Q"),
        encode_tail=_encode_membership_response_tail,
        decode_tail=_decode_membership_response_tail,
    ),
    _MessageLayout(
        15,
        ForwardBatch,
        ("term",),
        struct.Struct("<Q"),
        encode_tail=_encode_forward_proposal_tail,
        decode_tail=_decode_forward_proposal_tail,
    ),
)
_LAYOUT_BY_TYPE: dict[type[Any], _MessageLayout] = {layout.message_type: layout for layout in _MESSAGE_LAYOUTS}
_LAYOUT_BY_TAG: dict[int, _MessageLayout] = {layout.tag: layout for layout in _MESSAGE_LAYOUTS}
MESSAGE_TAGS: dict[type[Any], int] = {layout.message_type: layout.tag for layout in _MESSAGE_LAYOUTS}


def encode_message(message: Message) -> bytes:
    """One message as a self-describing frame body; `decode_message` turns it back into an equal message.

    Raises `CodecError` for a message the format cannot carry (an integer outside 0..2**64-1, a string that
    is not valid Unicode); nothing is sent half-encoded, since the bytes are only returned whole.
    """
    layout = _LAYOUT_BY_TYPE.get(type(message))
    if layout is None:
        raise CodecError(f"{type(message).__name__} is not a Raft message")
    try:
        parts = [_MESSAGE_HEADER.pack(WIRE_VERSION, layout.tag)]
        _encode_bytes(parts, message.source.encode())
        _encode_bytes(parts, message.target.encode())
        fixed = layout.get_fixed(message)
        parts.append(layout.fixed.pack(*fixed) if len(layout.fixed_fields) > 1 else layout.fixed.pack(fixed))
        if layout.encode_tail is not None:
            layout.encode_tail(parts, message)
    except (struct.error, UnicodeEncodeError) as exc:
        raise CodecError(f"cannot encode {type(message).__name__}: {exc}") from None
    return b"".join(parts)


def decode_message(data: bytes | memoryview) -> Message:
    """The inverse of `encode_message`. Raises `CodecError`, and only that, on any other input."""
    with _Reader(data) as reader:
        version, tag = reader.unpack(_MESSAGE_HEADER)
        if version != WIRE_VERSION:
            raise CodecError(f"message format version {version}, this version reads {WIRE_VERSION}")
        layout = _LAYOUT_BY_TAG.get(tag)
        if layout is None:
            raise CodecError(f"unknown message tag {tag}")
        fields: dict[str, Any] = {"source": reader.string(), "target": reader.string()}
        for name, value in zip(layout.fixed_fields, reader.unpack(layout.fixed), strict=True):
            fields[name] = reader.flag(value) if name in layout.boolean_fields else value
        if layout.decode_tail is not None:
            fields.update(layout.decode_tail(reader))
    if layout.message_type is InstallSnapshot:
        fields["meta"] = SnapshotMeta(
            index=fields.pop("meta.index"), term=fields.pop("meta.term"), membership=fields.pop("membership")
        )
    message: Message = layout.message_type(**fields)
    return message
