"""The Raft consensus core: a deterministic state machine with no I/O.

`RaftCore` takes ticks, messages from peers and requests from its driver, and produces `Ready` batches:
a hard state and entries to persist, messages to send once they are persisted, committed entries to
apply, and answers to read requests. It never touches a clock, a socket, a disk or global randomness: the
driver (`graft_trio.raft.node`) does all of that, and the simulator drives the very same core.

The rules follow the Raft paper and Ongaro's dissertation: elections with randomized timeouts, PreVote
(§9.6) and CheckQuorum (§6.2), log replication with fast backtracking, commitment counted only for entries
of the leader's own term (§5.4.2), single-server membership changes that take effect when appended
(§4.1), leadership transfer (§3.10), ReadIndex (§6.4) and snapshots sent in chunks (§5).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable

import attrs

from graft_trio.raft.codec import CodecError, check_commands, decode_commands, encode_commands
from graft_trio.raft.errors import MembershipChangeError, NotLeaderError, ProposalTooLarge
from graft_trio.raft.log import RaftLog
from graft_trio.raft.messages import (
    ENTRY_OVERHEAD_BYTES,
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
    Membership,
    Message,
    ReadIndexRequest,
    ReadIndexResponse,
    RequestVote,
    RequestVoteResponse,
    Snapshot,
    SnapshotMeta,
    TimeoutNow,
)
from graft_trio.raft.progress import Inflights, Progress, ProgressState


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@attrs.frozen
class CoreConfig:
    election_ticks: int = 10  # the election timeout is random in [election_ticks, 2 * election_ticks)
    heartbeat_ticks: int = 2
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight_messages: int = 64
    max_inflight_bytes: int = 8 * 1024 * 1024
    max_message_bytes: int = 1024 * 1024  # entries per AppendEntries stop once this is exceeded
    max_entry_bytes: int = 1024 * 1024  # the largest entry a proposal may make (`Entry.size`)
    # False (RaftConfig.durable=False): this member may have lost entries it acknowledged, so a commit index
    # from a heartbeat or CommitNotice is trusted only up to what an AppendEntries of this term showed to
    # match the leader's log in this life of the member (a lost write could have left an older entry there).
    durable_log: bool = True
    snapshot_chunk_bytes: int = 512 * 1024

    def __attrs_post_init__(self) -> None:
        if self.heartbeat_ticks < 1 or self.election_ticks <= self.heartbeat_ticks:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks")


@attrs.frozen
class ReadState:
    """A read request confirmed by a quorum: it may be served once `index` is applied."""

    context: int
    index: int


@attrs.frozen
class SoftState:
    role: Role
    leader_id: str | None
    term: int


@attrs.frozen
class Ready:
    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None  # received from the leader: persist it, then restore the state machine
    discard_log: bool
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]
    soft_state: SoftState | None


@attrs.define
class _ReadRequest:
    context: int  # the leader's sequence number for this round
    index: int
    requester: str
    requester_context: int
    acks: dict[str, bool] = attrs.Factory(dict)


def _unchanged(data: bytes) -> bytes:
    return data


def proposal_size(data: bytes, request_id: str) -> int:
    """What `max_entry_bytes` bounds: the size of the entry a proposal makes (`Entry.size`), unstamped."""
    return len(data) + len(request_id) + ENTRY_OVERHEAD_BYTES


def check_proposal_size(data: bytes, request_id: str, max_entry_bytes: int) -> None:
    """Raise ProposalTooLarge for a proposal whose entry would be over `max_entry_bytes`."""
    size = proposal_size(data, request_id)
    if size > max_entry_bytes:
        raise ProposalTooLarge(f"a proposal of {size} bytes, over max_entry_bytes ({max_entry_bytes})")


class RaftCore:
    def __init__(
        self,
        node_id: str,
        config: CoreConfig,
        rng: random.Random,
        hard_state: HardState,
        snapshot: Snapshot | None,
        entries: tuple[Entry, ...] | list[Entry],
        *,
        stamp: Callable[[bytes], bytes] | None = None,
    ) -> None:
        self.id = node_id
        self.config = config
        self.rng = rng
        # What the leader does to a command as it appends it (the driver's `StateMachine.stamp` with the
        # leader's clock); the identity unless the state machine asks for it.
        self._stamp: Callable[[bytes], bytes] = stamp if stamp is not None else _unchanged
        meta = snapshot.meta if snapshot is not None else SnapshotMeta()
        self.log = RaftLog(meta, entries, hard_state.commit)
        self.snapshot = snapshot  # the latest snapshot, sent to followers that fell behind the log
        self.term = hard_state.term
        self.vote = hard_state.vote
        self.leader_id: str | None = None
        # With durable_log=False: the highest index an AppendEntries of term `_verified_term` showed to match
        # the leader's log since this core started (a heartbeat's commit index is trusted only up to it).
        self._verified_term = 0
        self._verified_index = 0
        self.role = Role.FOLLOWER
        self.votes: dict[str, bool] = {}
        self.progress: dict[str, Progress] = {}
        self.transfer_target: str | None = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = 0
        self._reset_randomized_timeout()

        self._messages: list[Message] = []
        self._read_states: list[ReadState] = []
        self._prev_hard_state = hard_state
        self._prev_soft_state = SoftState(self.role, self.leader_id, self.term)
        self._needs_send: dict[str, bool] = {}  # peers owed an AppendEntries at the next `ready`
        self._read_seq = 0
        self._pending_reads: list[_ReadRequest] = []  # reads waiting for a quorum to confirm leadership
        self._reads_before_commit: list[tuple[str, int]] = []  # reads waiting for this term's first commit
        self._incoming_snapshot: tuple[SnapshotMeta, bytearray] | None = None
        self._received_snapshot: tuple[Snapshot, bool] | None = None  # installed, not yet handed to the driver
        self._applying = self.log.applied  # committed entries up to here were handed to the driver

    # --- bootstrap -----------------------------------------------------------------------------------

    @staticmethod
    def bootstrap_entries(membership: Membership) -> tuple[HardState, list[Entry]]:
        """The identical first entry every founding member starts a new cluster with."""
        entry = Entry(term=1, index=1, kind=EntryKind.MEMBERSHIP, membership=membership)
        return HardState(term=1, vote=None, commit=1), [entry]

    # --- status ---------------------------------------------------------------------------------------

    @property
    def membership(self) -> Membership:
        return self.log.membership

    def is_voter(self) -> bool:
        return self.membership.is_voter(self.id)

    def can_campaign(self) -> bool:
        """A voter of the latest membership, or of the committed one.

        The second case is a leader that appended its own removal and then lost its quorum: the others may
        still need its vote, and it must be able to become leader again to commit its removal.
        """
        return self.is_voter() or self.log.membership_at(self.log.committed).is_voter(self.id)

    def quorum(self) -> int:
        return len(self.membership.voters) // 2 + 1

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def _committed_in_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    # --- the driver's calls --------------------------------------------------------------------------

    def tick(self) -> None:
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._tick_election()

    def ticks_until_action(self) -> int:
        """How many more ticks until `tick` would do something, if nothing else happens meanwhile."""
        if self.role is Role.LEADER:
            heartbeat = self.config.heartbeat_ticks - self.heartbeat_elapsed
            check = self.config.election_ticks - self.election_elapsed
            return max(1, min(heartbeat, check))
        remaining = self.randomized_election_timeout - self.election_elapsed
        if remaining <= 0 and not self.can_campaign():
            return self.config.election_ticks  # nothing will ever happen on a tick
        return max(1, remaining)

    def campaign_now(self) -> None:
        """Start an election at once (a sole founding voter does this instead of waiting a timeout)."""
        if self.role is not Role.LEADER and self.can_campaign():
            self._campaign(pre_vote=self.config.pre_vote, transfer=False)

    def propose(self, data: bytes, request_id: str, kind: EntryKind = EntryKind.NORMAL) -> int | None:
        """Append a command (kind NORMAL) or a batch of them (BATCH, `codec.encode_commands`) on the leader,
        returning its index, or forward it to the leader (None).

        Raises NotLeaderError when no leader is known or a leadership transfer is under way, and
        ProposalTooLarge for a proposal whose entry would be over `max_entry_bytes` as proposed (stamping
        may add a few bytes, which the frame limit leaves room for: the proposer checked the same size, so
        the leader never refuses what the proposer let through). A batch's encoding is the driver's to get
        right; the leader checks it only when the batch comes from another member.
        """
        if kind is not EntryKind.NORMAL and kind is not EntryKind.BATCH:
            raise ValueError(f"{kind.name} entries are not proposed as commands")
        check_proposal_size(data, request_id, self.config.max_entry_bytes)
        if self.role is Role.LEADER:
            if self.transfer_target is not None:
                raise NotLeaderError("leadership transfer in progress", self.transfer_target)
            return self._append_new(self._new_command_entry(data, request_id, kind, check=False))
        if self.leader_id is None or self.leader_id == self.id:
            raise NotLeaderError("no leader known", None)
        forward = ForwardBatch if kind is EntryKind.BATCH else ForwardProposal
        self._send(forward(self.id, self.leader_id, self.term, data, request_id))
        return None

    def _new_command_entry(self, data: bytes, request_id: str, kind: EntryKind, *, check: bool = True) -> Entry:
        """The next entry of the log for a command or batch of commands, stamped (`StateMachine.stamp`).
        With `check`, raises CodecError for a batch that is not one: every member would fail to apply it."""
        if kind is EntryKind.BATCH:
            if self._stamp is not _unchanged:
                data = encode_commands([self._stamp(command) for command in decode_commands(data)])
            elif check:
                check_commands(data)
        elif self._stamp is not _unchanged:
            data = self._stamp(data)
        return Entry(self.term, self.log.last_index + 1, kind, data, request_id)

    def propose_membership(self, membership: Membership, request_id: str) -> int:
        """Append a single-server membership change on the leader; returns its index."""
        if self.role is not Role.LEADER:
            raise NotLeaderError("membership changes are made on the leader", self.leader_id)
        if self.transfer_target is not None:
            raise NotLeaderError("leadership transfer in progress", self.transfer_target)
        if not self._committed_in_term():
            raise MembershipChangeError("the leader has not yet committed an entry of its term", retryable=True)
        if self.log.membership_index > self.log.committed:
            raise MembershipChangeError("another membership change is not yet committed", retryable=True)
        current = self.membership
        changed = [
            node_id
            for node_id in sorted(set(current.ids) | set(membership.ids))
            if current.get(node_id) != membership.get(node_id)
        ]
        if len(changed) != 1:
            raise MembershipChangeError(f"a change must touch exactly one member, not {changed}")
        if not membership.voters:
            raise MembershipChangeError("a membership needs at least one voter")
        return self._append_new(
            Entry(
                self.term,
                self.log.last_index + 1,
                EntryKind.MEMBERSHIP,
                b"",
                request_id,
                membership,
            )
        )

    def read_index(self, context: int) -> None:
        """Ask for a linearizable read point; a `ReadState` with `context` comes out in a later Ready."""
        if self.role is Role.LEADER:
            self._leader_read(self.id, context)
        elif self.leader_id is not None and self.leader_id != self.id:
            self._send(ReadIndexRequest(self.id, self.leader_id, self.term, context))
        else:
            raise NotLeaderError("no leader known", None)

    def transfer_leadership(self, target: str) -> None:
        if self.role is not Role.LEADER:
            raise NotLeaderError("only the leader can transfer leadership", self.leader_id)
        if target == self.id:
            return
        if not self.membership.is_voter(target):
            raise MembershipChangeError(f"{target!r} is not a voter")
        self.transfer_target = target
        self.election_elapsed = 0  # the transfer is abandoned after an election timeout
        progress = self.progress[target]
        if progress.match_index == self.log.last_index:
            self._send(TimeoutNow(self.id, target, self.term))
        else:
            self._needs_send[target] = True

    def progress_of(self, node_id: str) -> Progress | None:
        return self.progress.get(node_id) if self.role is Role.LEADER else None

    def compact(self, snapshot: Snapshot, compact_to: int) -> None:
        """Adopt a snapshot of the applied state and drop log entries up to `compact_to`."""
        assert snapshot.meta.index <= self.log.applied
        self.snapshot = snapshot
        self.log.compact(min(compact_to, snapshot.meta.index))

    def snapshot_meta(self, index: int) -> SnapshotMeta:
        term = self.log.term(index)
        assert term is not None
        return SnapshotMeta(index, term, self.log.membership_at(index))

    # --- ready / advance -----------------------------------------------------------------------------

    def has_ready(self) -> bool:
        log = self.log
        return bool(
            self._messages
            or self._read_states
            or self._needs_send
            or log.has_unstable_entries()
            or self._received_snapshot is not None
            or self._hard_state_changed()
            or log.committed > self._applying
            or self._soft_state_changed()
        )

    # Field by field rather than by building a HardState or SoftState: the driver asks after every turn.

    def _hard_state_changed(self) -> bool:
        previous = self._prev_hard_state
        return self.term != previous.term or self.vote != previous.vote or self.log.committed != previous.commit

    def _soft_state_changed(self) -> bool:
        previous = self._prev_soft_state
        return self.role is not previous.role or self.leader_id != previous.leader_id or self.term != previous.term

    def _soft_state(self) -> SoftState:
        return SoftState(self.role, self.leader_id, self.term)

    def ready(self) -> Ready:
        if self._needs_send:
            if self.role is Role.LEADER:
                for node_id in self.membership.ids:
                    if self._needs_send.get(node_id):
                        self._send_append(node_id)
            self._needs_send.clear()
        log = self.log
        hard_state: HardState | None = None
        if self._hard_state_changed():
            hard_state = self._prev_hard_state = self.hard_state()
        soft_state: SoftState | None = None
        if self._soft_state_changed():
            soft_state = self._prev_soft_state = self._soft_state()
        snapshot, discard_log = self._received_snapshot or (None, False)
        committed: tuple[Entry, ...] = ()
        if log.committed > self._applying:
            low = max(self._applying + 1, log.first_index)
            committed = tuple(log.entries[low - log.offset - 1 : log.committed - log.offset])
            self._applying = log.committed
        ready = Ready(
            hard_state=hard_state,
            entries=tuple(log.unstable_entries()) if log.has_unstable_entries() else (),
            snapshot=snapshot,
            discard_log=discard_log,
            messages=tuple(self._messages),
            committed_entries=committed,
            read_states=tuple(self._read_states),
            soft_state=soft_state,
        )
        if self._messages:
            self._messages = []
        if self._read_states:
            self._read_states = []
        self._received_snapshot = None
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver persisted, sent and applied everything in `ready`."""
        if ready.committed_entries:
            self.log.applied = max(self.log.applied, ready.committed_entries[-1].index)
        if ready.entries:
            last = ready.entries[-1]
            self.log.stable_to(last.index, last.term)
            if self.role is Role.LEADER and self.is_voter():
                # The leader's own entries count towards a quorum only once they are durable. (The other
                # members' matches are counted as their answers arrive.)
                self._maybe_commit()

    # --- ticks ---------------------------------------------------------------------------------------

    def _reset_randomized_timeout(self) -> None:
        ticks = self.config.election_ticks
        self.randomized_election_timeout = ticks + self.rng.randrange(ticks)

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        # A member that cannot campaign lets the count grow: past an election timeout it no longer
        # believes in its leader's lease and answers vote requests.
        if self.election_elapsed >= self.randomized_election_timeout and self.can_campaign():
            self.election_elapsed = 0
            self._campaign(pre_vote=self.config.pre_vote, transfer=False)

    def _tick_leader(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.config.election_ticks:
            self.election_elapsed = 0
            if self.config.check_quorum and not self._quorum_active():
                self._become_follower(self.term, None)
                return
            self.transfer_target = None  # a transfer that did not finish in an election timeout is abandoned
            self._probe_stalled_followers()
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self._broadcast_heartbeat(0)
            for node_id, progress in self.progress.items():
                if progress.state is ProgressState.SNAPSHOT:
                    progress.snapshot_sent = False  # resend the chunk that may have been lost
                    self._needs_send[node_id] = True

    def _probe_stalled_followers(self) -> None:
        """Once per election timeout: a follower whose match has not moved since the last round while
        entries were outstanding presumably lost what was in flight; probe it from its match.

        Not once per heartbeat: a follower busy with a backlog (megabyte messages, a loaded machine) often
        takes longer than a heartbeat interval to answer, and probing it then re-sent everything in flight,
        which only deepened its backlog (in one loaded benchmark run the leader sent 22.5 MB where 14 MB
        sufficed once the check waited an election timeout).
        """
        last = self.log.last_index
        for node_id, progress in self.progress.items():
            if (
                node_id != self.id
                and progress.state is ProgressState.REPLICATE
                and progress.heartbeat_match == progress.match_index < last
            ):
                progress.become_probe()
                self._needs_send[node_id] = True
            progress.heartbeat_match = progress.match_index

    def _quorum_active(self) -> bool:
        active = 0
        for node_id in self.membership.voters:
            if node_id == self.id:
                active += 1
                continue
            progress = self.progress.get(node_id)
            if progress is not None and progress.recent_active:
                active += 1
        for progress in self.progress.values():
            progress.recent_active = False
        return active >= self.quorum()

    # --- role changes ----------------------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader_id = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self.votes = {}
        self.transfer_target = None
        self._pending_reads = []
        self._reads_before_commit = []
        self._needs_send.clear()

    def _become_follower(self, term: int, leader_id: str | None) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader_id = leader_id
        self.progress = {}

    def _campaign(self, pre_vote: bool, transfer: bool) -> None:
        if pre_vote:
            # A pre-candidate asks whether it could win before disturbing anyone's term (§9.6).
            self._reset(self.term)
            self.role = Role.PRE_CANDIDATE
            term = self.term + 1
        else:
            self._reset(self.term + 1)
            self.role = Role.CANDIDATE
            self.vote = self.id
            term = self.term
        self.progress = {}
        self.votes = {self.id: True}
        if self._vote_result() is True:
            self._won_vote(pre_vote)
            return
        for node_id in self.membership.voters:
            if node_id != self.id:
                self._send(
                    RequestVote(
                        self.id,
                        node_id,
                        term,
                        self.log.last_index,
                        self.log.last_term,
                        pre_vote=pre_vote,
                        transfer=transfer,
                    )
                )

    def _vote_result(self) -> bool | None:
        granted = sum(1 for node_id in self.membership.voters if self.votes.get(node_id) is True)
        rejected = sum(1 for node_id in self.membership.voters if self.votes.get(node_id) is False)
        if granted >= self.quorum():
            return True
        if rejected >= self.quorum():
            return False
        return None

    def _won_vote(self, pre_vote: bool) -> None:
        if pre_vote:
            self._campaign(pre_vote=False, transfer=False)
        else:
            self._become_leader()

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader_id = self.id
        self.vote = self.id
        self.progress = {}
        for member in self.membership.members:
            self._add_progress(member.node_id)
        # A new leader commits a no-op of its own term, which commits everything before it (§5.4.2) and
        # lets it serve reads (§6.4).
        self._append_new(Entry(self.term, self.log.last_index + 1, EntryKind.NOOP))

    def _add_progress(self, node_id: str) -> None:
        if node_id in self.progress:
            return
        last = self.log.last_index
        self.progress[node_id] = Progress(
            match_index=last if node_id == self.id else 0,
            next_index=last + 1,
            inflights=Inflights(self.config.max_inflight_messages, self.config.max_inflight_bytes),
            recent_active=node_id == self.id,
        )

    def _sync_progress(self) -> None:
        """Keep one Progress per member after the membership changed."""
        ids = self.membership.ids
        for node_id in ids:
            self._add_progress(node_id)
        for node_id in [n for n in self.progress if n not in ids]:
            del self.progress[node_id]

    # --- the leader's log ------------------------------------------------------------------------------

    def _append_new(self, entry: Entry) -> int:
        self.log.append([entry])
        if entry.membership is not None:
            self._sync_progress()
        # The leader keeps one Progress per member: iterating it spares building the membership's ids
        # for every proposal (`ready` sends in the membership's order whatever the order here).
        for node_id in self.progress:
            if node_id != self.id:
                self._needs_send[node_id] = True
        return entry.index

    def _can_commit(self, index: int) -> bool:
        # §5.4.2: a leader counts replicas only for an entry of its own term.
        return self.log.term(index) == self.term

    def _maybe_commit(self) -> bool:
        voters = self.membership.voters
        if not voters:
            return False
        progress = self.progress
        matches = sorted(
            [
                self.log.stable_index
                if node_id == self.id
                else (progress[node_id].match_index if node_id in progress else 0)
                for node_id in voters
            ]
        )
        quorum_index = matches[len(voters) - (len(voters) // 2 + 1)]  # the highest index a quorum holds
        if quorum_index > self.log.committed and self._can_commit(quorum_index):
            self.log.commit_to(quorum_index)
            self._after_commit()
            return True
        return False

    def _after_commit(self) -> None:
        if self._committed_in_term() and self._reads_before_commit:
            waiting, self._reads_before_commit = self._reads_before_commit, []
            for requester, context in waiting:
                self._leader_read(requester, context)
        if self.log.membership_index <= self.log.committed and not self.is_voter():
            # A leader removed from the cluster steps down once its removal is committed (§4.2.2).
            self._become_follower(self.term, None)
            return
        # Followers learn the new commit index promptly. One that was sent every entry and has yet to answer
        # for some learns it with the CommitNotice its answer brings (`_handle_append_response`).
        last = self.log.last_index
        for node_id in self.membership.ids:
            if node_id != self.id:
                progress = self.progress.get(node_id)
                awaiting_answer = (
                    progress is not None
                    and progress.state is ProgressState.REPLICATE
                    and progress.match_index < last < progress.next_index
                )
                if not awaiting_answer:
                    self._needs_send[node_id] = True

    def _send_append(self, node_id: str) -> None:
        progress = self.progress.get(node_id)
        if progress is None or progress.is_paused():
            if progress is not None and progress.state is ProgressState.SNAPSHOT and not progress.snapshot_sent:
                self._send_snapshot_chunk(node_id, progress)
            return
        prev_index = progress.next_index - 1
        prev_term = self.log.term(prev_index)
        if prev_term is None:
            if self.snapshot is None:
                return  # nothing to send from yet
            progress.become_snapshot(self.snapshot)
            self._send_snapshot_chunk(node_id, progress)
            return
        entries = self.log.slice(progress.next_index, self.log.last_index + 1, self.config.max_message_bytes)
        committed = self.log.committed
        if not entries and progress.state is ProgressState.REPLICATE and prev_index == self.log.last_index:
            # Nothing new: only the commit index may need to travel. To a follower known to have every
            # entry it goes as a CommitNotice, which is not answered. To one with entries unanswered (sent
            # after a heartbeat's answer), an empty AppendEntries: its answer shows whether they were lost.
            if progress.match_index == prev_index:
                if progress.commit_sent < committed:
                    self._send(CommitNotice(self.id, node_id, self.term, committed))
                    progress.commit_sent = committed
            elif progress.match_index < committed:
                self._send(AppendEntries(self.id, node_id, self.term, prev_index, prev_term, (), committed))
            return
        self._send(AppendEntries(self.id, node_id, self.term, prev_index, prev_term, tuple(entries), committed))
        if progress.state is ProgressState.REPLICATE:
            progress.commit_sent = max(progress.commit_sent, min(committed, prev_index + len(entries)))
        if entries:
            progress.sent_entries(entries[-1].index, sum(e.size() for e in entries))
        elif progress.state is ProgressState.PROBE:
            progress.probe_sent = True

    def _send_snapshot_chunk(self, node_id: str, progress: Progress) -> None:
        snapshot = progress.snapshot
        if snapshot is None:
            return
        start = progress.snapshot_offset
        chunk = snapshot.data[start : start + self.config.snapshot_chunk_bytes]
        done = start + len(chunk) >= len(snapshot.data)
        self._send(InstallSnapshot(self.id, node_id, self.term, snapshot.meta, start, chunk, done))
        progress.snapshot_sent = True

    def _broadcast_heartbeat(self, read_context: int) -> None:
        for node_id in self.membership.ids:
            if node_id == self.id:
                continue
            progress = self.progress.get(node_id)
            commit = min(progress.match_index, self.log.committed) if progress else 0
            self._send(Heartbeat(self.id, node_id, self.term, commit, read_context))

    # --- reads -----------------------------------------------------------------------------------------

    def _leader_read(self, requester: str, context: int) -> None:
        if not self._committed_in_term():
            self._reads_before_commit.append((requester, context))
            return
        if self.membership.voters == (self.id,):
            self._release_read(requester, context, self.log.committed)
            return
        self._read_seq += 1
        request = _ReadRequest(self._read_seq, self.log.committed, requester, context, {self.id: True})
        self._pending_reads.append(request)
        self._broadcast_heartbeat(self._read_seq)

    def _release_read(self, requester: str, context: int, index: int) -> None:
        if requester == self.id:
            self._read_states.append(ReadState(context, index))
        else:
            self._send(ReadIndexResponse(self.id, requester, self.term, context, index))

    def _ack_reads(self, node_id: str, read_context: int) -> None:
        if not self.membership.is_voter(node_id):
            return
        released = 0
        for position, request in enumerate(self._pending_reads):
            if request.context > read_context:
                break
            request.acks[node_id] = True
            if sum(1 for voter in self.membership.voters if request.acks.get(voter)) >= self.quorum():
                released = position + 1
        # A confirmed round confirms every earlier one too: release them in order.
        for request in self._pending_reads[:released]:
            self._release_read(request.requester, request.requester_context, request.index)
        del self._pending_reads[:released]

    # --- messages --------------------------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self._messages.append(message)

    def step(self, message: Message) -> None:
        if message.target != self.id:
            return
        if message.term > self.term:
            if isinstance(message, RequestVote):
                in_lease = (
                    self.config.check_quorum
                    and self.leader_id is not None
                    and self.election_elapsed < self.config.election_ticks
                )
                if in_lease and not message.transfer:
                    # We heard from a leader recently: a disruptive candidate is ignored (§4.2.3).
                    return
                if not message.pre_vote:
                    self._become_follower(message.term, None)
            elif isinstance(message, RequestVoteResponse) and message.pre_vote:
                pass  # a granted pre-vote carries the term the candidate will campaign for
            elif isinstance(message, AppendEntries | Heartbeat | InstallSnapshot):
                self._become_follower(message.term, message.source)
            else:
                self._become_follower(message.term, None)
        elif message.term < self.term:
            if isinstance(message, AppendEntries | Heartbeat | InstallSnapshot):
                # A stale leader: tell it our term so it steps down.
                self._send(AppendEntriesResponse(self.id, message.source, self.term, False, 0))
            elif isinstance(message, RequestVote) and message.pre_vote:
                self._send(RequestVoteResponse(self.id, message.source, self.term, False, pre_vote=True))
            return

        if isinstance(message, RequestVote):
            self._handle_request_vote(message)
            return
        if self.role is Role.LEADER:
            self._step_leader(message)
        elif self.role is Role.FOLLOWER:
            self._step_follower(message)
        else:
            self._step_candidate(message)

    def _handle_request_vote(self, message: RequestVote) -> None:
        can_vote = (
            self.vote == message.source
            or (self.vote is None and self.leader_id is None)
            or (message.pre_vote and message.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(message.last_log_index, message.last_log_term):
            self._send(RequestVoteResponse(self.id, message.source, message.term, True, message.pre_vote))
            if not message.pre_vote:
                self.election_elapsed = 0
                self.vote = message.source
        else:
            self._send(RequestVoteResponse(self.id, message.source, self.term, False, message.pre_vote))

    def _step_candidate(self, message: Message) -> None:
        if isinstance(message, RequestVoteResponse):
            if message.pre_vote != (self.role is Role.PRE_CANDIDATE):
                return
            if not message.granted and message.term > self.term:
                self._become_follower(message.term, None)
                return
            self.votes.setdefault(message.source, message.granted)
            result = self._vote_result()
            if result is True:
                self._won_vote(self.role is Role.PRE_CANDIDATE)
            elif result is False:
                self._become_follower(self.term, None)
        elif isinstance(message, AppendEntries | Heartbeat | InstallSnapshot):
            self._become_follower(self.term, message.source)
            self._step_follower(message)

    def _step_follower(self, message: Message) -> None:
        if isinstance(message, AppendEntries):
            self.election_elapsed = 0
            self.leader_id = message.source
            self._handle_append(message)
        elif isinstance(message, Heartbeat):
            self.election_elapsed = 0
            self.leader_id = message.source
            commit = message.commit
            if not self.config.durable_log:
                commit = min(commit, self._verified_index if self._verified_term == self.term else 0)
                if commit < message.commit and message.commit > self.log.committed:
                    # Ask the leader to check our log (it has not in this life of ours): a rejection at
                    # or below the match it knows makes it probe us again (`_handle_append_response`).
                    self._send(
                        AppendEntriesResponse(
                            self.id,
                            message.source,
                            self.term,
                            False,
                            0,
                            rejected_index=message.commit,
                            hint_index=min(message.commit, self.log.last_index),
                        )
                    )
            if commit <= self.log.last_index:
                self.log.commit_to(commit)
            if not isinstance(message, CommitNotice):
                self._send(HeartbeatResponse(self.id, message.source, self.term, message.read_context))
        elif isinstance(message, InstallSnapshot):
            self.election_elapsed = 0
            self.leader_id = message.source
            self._handle_snapshot_chunk(message)
        elif isinstance(message, TimeoutNow):
            if self.is_voter():
                self._campaign(pre_vote=False, transfer=True)
        elif isinstance(message, ForwardProposal) and self.membership.get(message.source) is not None:
            if self.leader_id is not None and self.leader_id != self.id:
                self._send(attrs.evolve(message, source=self.id, target=self.leader_id, term=self.term))
        elif isinstance(message, ReadIndexResponse) and message.index > 0:
            self._read_states.append(ReadState(message.context, message.index))

    def _handle_append(self, message: AppendEntries) -> None:
        committed = self.log.committed
        if message.prev_log_index < committed:
            # Everything up to our commit index matches the leader already (Leader Completeness).
            if message.prev_log_index + len(message.entries) <= committed:
                self._verified_through(committed)
                self._send(AppendEntriesResponse(self.id, message.source, self.term, True, committed))
                return
            skip = committed - message.prev_log_index
            committed_term = self.log.term(committed)
            assert committed_term is not None
            message = attrs.evolve(
                message,
                prev_log_index=committed,
                prev_log_term=committed_term,
                entries=message.entries[skip:],
            )
        last_new = self.log.maybe_append(
            message.prev_log_index, message.prev_log_term, message.leader_commit, message.entries
        )
        if last_new is not None:
            self._verified_through(last_new)
            self._send(AppendEntriesResponse(self.id, message.source, self.term, True, last_new))
            return
        hint_index, hint_term = self.log.find_conflict_by_term(
            min(message.prev_log_index, self.log.last_index), message.prev_log_term
        )
        self._send(
            AppendEntriesResponse(
                self.id,
                message.source,
                self.term,
                False,
                0,
                rejected_index=message.prev_log_index,
                hint_index=hint_index,
                hint_term=hint_term,
            )
        )

    def _verified_through(self, index: int) -> None:
        """An AppendEntries of this term showed our log to match the leader's up to `index`."""
        if self._verified_term != self.term:
            self._verified_term, self._verified_index = self.term, 0
        self._verified_index = max(self._verified_index, index)

    def _handle_snapshot_chunk(self, message: InstallSnapshot) -> None:
        meta = message.meta
        if meta.index <= self.log.committed:
            # We have all of it already; tell the leader where we are.
            self._send(InstallSnapshotResponse(self.id, message.source, self.term, self.log.committed, 0, True))
            return
        incoming = self._incoming_snapshot
        if message.offset == 0 or incoming is None or incoming[0] != meta:
            incoming = (meta, bytearray())
            self._incoming_snapshot = incoming
        buffer = incoming[1]
        if message.offset == len(buffer):
            buffer.extend(message.data)
        elif message.offset > len(buffer):
            # A chunk went missing: ask again from where we are.
            self._send(InstallSnapshotResponse(self.id, message.source, self.term, meta.index, len(buffer), False))
            return
        if not message.done or message.offset + len(message.data) != len(buffer):
            self._send(InstallSnapshotResponse(self.id, message.source, self.term, meta.index, len(buffer), False))
            return
        self._incoming_snapshot = None
        snapshot = Snapshot(meta, bytes(buffer))
        kept = self.log.restore(meta)
        self._applying = max(self._applying, meta.index)
        self.snapshot = snapshot
        self._received_snapshot = (snapshot, not kept)
        self._verified_through(meta.index)
        self._send(InstallSnapshotResponse(self.id, message.source, self.term, meta.index, len(buffer), True))

    def _step_leader(self, message: Message) -> None:
        if isinstance(message, AppendEntriesResponse):
            self._handle_append_response(message)
        elif isinstance(message, HeartbeatResponse):
            progress = self.progress.get(message.source)
            if progress is None:
                return
            progress.recent_active = True
            if progress.state is ProgressState.PROBE:
                progress.probe_sent = False
            if progress.match_index < self.log.last_index or progress.state is ProgressState.SNAPSHOT:
                self._needs_send[message.source] = True
            if message.read_context:
                self._ack_reads(message.source, message.read_context)
        elif isinstance(message, InstallSnapshotResponse):
            self._handle_snapshot_response(message)
        elif isinstance(message, ForwardProposal) and self.membership.get(message.source) is not None:
            # Only from members: a member removed from the cluster but still running (its engine claiming
            # steps, say) must not keep writing to the log.
            # A proposal over max_entry_bytes (its proposer has a larger limit) or a batch that is not one
            # is dropped: its proposer times out, and nothing is appended.
            fits = proposal_size(message.data, message.request_id) <= self.config.max_entry_bytes
            if self.transfer_target is None and fits:
                try:
                    entry = self._new_command_entry(message.data, message.request_id, message.kind)
                except CodecError:
                    return
                self._append_new(entry)
        elif isinstance(message, ReadIndexRequest) and self.membership.get(message.source) is not None:
            self._leader_read(message.source, message.context)

    def _handle_append_response(self, message: AppendEntriesResponse) -> None:
        progress = self.progress.get(message.source)
        if progress is None:
            return
        progress.recent_active = True
        if not message.success:
            next_probe = message.hint_index
            if message.hint_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(message.hint_index, message.hint_term)
            if progress.state is ProgressState.SNAPSHOT:
                return
            if not self.config.durable_log and message.rejected_index <= progress.match_index:
                # A member that may lose acknowledged writes (durable=False) lost some: it no longer has
                # what it answered for. Probe it again from below; otherwise the leader trusts the old
                # answer, ignores every rejection at or below it, and never repairs that member.
                progress.match_index = max(0, min(message.rejected_index - 1, next_probe))
                progress.become_probe()
                self._needs_send[message.source] = True
                return
            if progress.maybe_decrease_to(message.rejected_index, next_probe):
                if progress.state is ProgressState.REPLICATE:
                    progress.become_probe()
                self._needs_send[message.source] = True
            return
        confirms_probe = progress.state is ProgressState.PROBE and message.match_index == progress.match_index
        if progress.maybe_update(message.match_index) or confirms_probe:
            if progress.state is ProgressState.PROBE:
                progress.become_replicate()
            elif progress.state is ProgressState.SNAPSHOT and progress.match_index >= progress.snapshot_index:
                progress.become_probe()
            progress.inflights.free_to(message.match_index)
            if not self._maybe_commit() and (
                progress.match_index < self.log.last_index or progress.commit_sent < self.log.committed
            ):
                self._needs_send[message.source] = True  # more entries, or the commit index (a CommitNotice)
            if message.source == self.transfer_target and progress.match_index == self.log.last_index:
                self._send(TimeoutNow(self.id, message.source, self.term))
        elif progress.state is ProgressState.PROBE and progress.match_index < self.log.last_index:
            progress.probe_sent = False
            self._needs_send[message.source] = True

    def _handle_snapshot_response(self, message: InstallSnapshotResponse) -> None:
        progress = self.progress.get(message.source)
        if progress is None:
            return
        progress.recent_active = True
        if progress.state is not ProgressState.SNAPSHOT:
            return
        if message.done:
            progress.match_index = max(progress.match_index, message.meta_index)
            progress.become_probe()
            progress.next_index = progress.match_index + 1
            self._needs_send[message.source] = True
            return
        # One chunk is in flight at a time, and only a reply that moves the offset sends the next one. A
        # duplicated or reordered reply naming the current offset is dropped: answering it too started a
        # second chain of chunks, and every further duplicate another (a message storm). A chunk or reply
        # that was lost is resent at the next heartbeat.
        if message.meta_index == progress.snapshot_index and message.next_offset != progress.snapshot_offset:
            progress.snapshot_offset = message.next_offset
            progress.snapshot_sent = False
            self._needs_send[message.source] = True

