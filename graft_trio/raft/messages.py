"""The Raft log entries, persistent records and messages: small immutable attrs classes.

Everything the core exchanges with its driver, its storage and its peers is defined here, so that the
codec (and the simulator, which passes these objects by reference) has one place to look.
"""

from __future__ import annotations

import enum
from typing import ClassVar

import attrs


class EntryKind(enum.IntEnum):
    NORMAL = 0
    NOOP = 1  # appended by every new leader, so that it can commit entries of earlier terms
    MEMBERSHIP = 2  # data is unused; the new membership is in `membership`
    BATCH = 3  # data holds several commands (`codec.encode_commands`), applied in order at this index


@attrs.frozen(slots=True)
class Member:
    node_id: str
    address: str
    voter: bool = True


@attrs.frozen(slots=True)
class Membership:
    """A cluster configuration. Members are kept sorted by id so that equal memberships compare equal."""

    members: tuple[Member, ...] = ()

    @classmethod
    def of(cls, members: list[Member] | tuple[Member, ...]) -> Membership:
        return cls(tuple(sorted(members, key=lambda m: m.node_id)))

    @property
    def voters(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members if m.voter)

    @property
    def learners(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members if not m.voter)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(m.node_id for m in self.members)

    def get(self, node_id: str) -> Member | None:
        for member in self.members:
            if member.node_id == node_id:
                return member
        return None

    def is_voter(self, node_id: str) -> bool:
        member = self.get(node_id)
        return member is not None and member.voter

    def with_member(self, member: Member) -> Membership:
        others = [m for m in self.members if m.node_id != member.node_id]
        return Membership.of([*others, member])

    def without(self, node_id: str) -> Membership:
        return Membership.of([m for m in self.members if m.node_id != node_id])


ENTRY_OVERHEAD_BYTES = 24  # what `Entry.size` counts for an entry besides its data and request id


@attrs.frozen(slots=True)
class Entry:
    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""
    request_id: str = ""  # proposals retried with the same id are applied once
    membership: Membership | None = None

    def size(self) -> int:
        return len(self.data) + len(self.request_id) + ENTRY_OVERHEAD_BYTES


@attrs.frozen(slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


@attrs.frozen(slots=True)
class SnapshotMeta:
    index: int = 0
    term: int = 0
    membership: Membership = Membership()


@attrs.frozen(slots=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes


# --- messages between members ---------------------------------------------------------------------


@attrs.frozen(slots=True)
class RequestVote:
    source: str
    target: str
    term: int
    last_log_index: int
    last_log_term: int
    pre_vote: bool = False
    transfer: bool = False  # a leadership transfer: voters ignore their leader lease


@attrs.frozen(slots=True)
class RequestVoteResponse:
    source: str
    target: str
    term: int
    granted: bool
    pre_vote: bool = False


@attrs.frozen(slots=True)
class AppendEntries:
    source: str
    target: str
    term: int
    prev_log_index: int
    prev_log_term: int
    entries: tuple[Entry, ...]
    leader_commit: int


@attrs.frozen(slots=True)
class AppendEntriesResponse:
    source: str
    target: str
    term: int
    success: bool
    match_index: int  # on success: the last index known to match the leader's log
    rejected_index: int = 0  # on failure: the prev_log_index that did not match
    hint_index: int = 0  # on failure: where the leader should look next
    hint_term: int = 0  # on failure: the follower's term at hint_index (0 when its log is too short)


@attrs.frozen(slots=True)
class Heartbeat:
    source: str
    target: str
    term: int
    commit: int
    read_context: int = 0  # non-zero: the leader is confirming a ReadIndex round


@attrs.frozen(slots=True)
class CommitNotice(Heartbeat):
    """A leader's new commit index, for a follower that already has every entry: what an empty
    AppendEntries carried after each commit. Handled as a heartbeat, but not answered, since it asks
    nothing: that halves the messages a lone write costs after it commits."""


@attrs.frozen(slots=True)
class HeartbeatResponse:
    source: str
    target: str
    term: int
    read_context: int = 0


@attrs.frozen(slots=True)
class InstallSnapshot:
    source: str
    target: str
    term: int
    meta: SnapshotMeta
    offset: int
    data: bytes
    done: bool


@attrs.frozen(slots=True)
class InstallSnapshotResponse:
    source: str
    target: str
    term: int
    meta_index: int
    next_offset: int  # the offset the follower wants next
    done: bool


@attrs.frozen(slots=True)
class TimeoutNow:
    source: str
    target: str
    term: int


@attrs.frozen(slots=True)
class ForwardProposal:
    """A proposal made on a follower, sent to the leader it knows."""

    source: str
    target: str
    term: int
    data: bytes
    request_id: str

    kind: ClassVar[EntryKind] = EntryKind.NORMAL  # the kind of entry the leader appends (a class attribute)


@attrs.frozen(slots=True)
class ForwardBatch(ForwardProposal):
    """A batch of commands proposed together on a follower (`RaftNode.propose_many`), sent to the leader:
    `data` is their `codec.encode_commands` encoding, appended as one `EntryKind.BATCH` entry."""

    kind: ClassVar[EntryKind] = EntryKind.BATCH


@attrs.frozen(slots=True)
class ReadIndexRequest:
    source: str
    target: str
    term: int
    context: int


@attrs.frozen(slots=True)
class ReadIndexResponse:
    source: str
    target: str
    term: int
    context: int
    index: int  # 0: refused (the target is not a leader that can serve reads)


class MembershipOutcome(enum.IntEnum):
    """How the leader answered a `MembershipRequest`."""

    DONE = 0
    NOT_LEADER = 1  # ask the leader named in the response (if any) instead
    REFUSED = 2  # the change cannot be made (e.g. the id is a member at another address): do not retry
    TIMEOUT = 3  # the leader did not finish in time (a learner still catching up): ask again


@attrs.frozen(slots=True)
class MembershipRequest:
    """Add or remove a member: made on any member, or by a member asking to join, and forwarded (once) to
    the leader, which makes the change and answers `origin` at `origin_address`. Handled by the driver
    (`RaftNode`), never by the core: the change itself is the leader's `add_member` / `remove_member`."""

    source: str
    target: str
    term: int
    request_id: str
    origin: str
    origin_address: str
    node_id: str
    address: str  # of the member to add; empty for a removal
    voter: bool = True
    remove: bool = False


@attrs.frozen(slots=True)
class MembershipResponse:
    source: str
    target: str
    term: int
    request_id: str
    outcome: MembershipOutcome
    leader_id: str = ""  # with NOT_LEADER: the leader the responder knows, if any
    reason: str = ""


Message = (
    RequestVote
    | RequestVoteResponse
    | AppendEntries
    | AppendEntriesResponse
    | Heartbeat
    | CommitNotice
    | HeartbeatResponse
    | InstallSnapshot
    | InstallSnapshotResponse
    | TimeoutNow
    | ForwardProposal
    | ForwardBatch
    | ReadIndexRequest
    | ReadIndexResponse
    | MembershipRequest
    | MembershipResponse
)

MESSAGE_TYPES: tuple[type, ...] = (
    RequestVote,
    RequestVoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    InstallSnapshotResponse,
    TimeoutNow,
    ForwardProposal,
    ReadIndexRequest,
    ReadIndexResponse,
    MembershipRequest,
    MembershipResponse,
    ForwardBatch,
    CommitNotice,
)
