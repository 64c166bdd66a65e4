"""graft_trio.raft: a Raft consensus library for trio, usable on its own with any deterministic state machine.

    from graft_trio.raft import RaftNode, RaftConfig, StateMachine, open_storage
"""

from graft_trio.raft.core import CoreConfig, RaftCore, ReadState, Ready, Role
from graft_trio.raft.errors import (
    MembershipChangeError,
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    ProposalTooLarge,
    RaftError,
)
from graft_trio.raft.messages import Entry, EntryKind, HardState, Member, Membership, Snapshot, SnapshotMeta
from graft_trio.raft.node import ClusterListener, RaftConfig, RaftNode, RaftObserver, RaftStatus
from graft_trio.raft.statemachine import StateMachine
from graft_trio.raft.storage import CorruptStorageError, MemoryStorage, PersistentState, Storage, open_storage

__all__ = [
    "ClusterListener",
    "CoreConfig",
    "CorruptStorageError",
    "Entry",
    "EntryKind",
    "HardState",
    "Member",
    "Membership",
    "MembershipChangeError",
    "MemoryStorage",
    "NoQuorumError",
    "NodeStoppedError",
    "NotLeaderError",
    "PersistentState",
    "ProposalTimeout",
    "ProposalTooLarge",
    "RaftConfig",
    "RaftCore",
    "RaftError",
    "RaftNode",
    "RaftObserver",
    "RaftStatus",
    "ReadState",
    "Ready",
    "Role",
    "Snapshot",
    "SnapshotMeta",
    "StateMachine",
    "Storage",
    "open_storage",
]
