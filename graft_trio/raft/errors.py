"""The errors `graft_trio.raft` raises to its callers."""

from __future__ import annotations


class RaftError(Exception):
    """Base of every error raised by graft_trio.raft."""


class NotLeaderError(RaftError):
    """The call needs the leader and this member is not it. `leader_id` names the leader it knows, if any."""

    def __init__(self, message: str, leader_id: str | None = None) -> None:
        super().__init__(message)
        self.leader_id = leader_id


class ProposalTimeout(RaftError):
    """The proposal or read did not complete within its timeout; a proposal may still be applied later."""


class ProposalTooLarge(RaftError, ValueError):
    """The proposal's log entry would exceed `RaftConfig.max_entry_bytes`; it was not proposed.

    A larger entry could never be replicated (no message may carry it), so it is refused up front instead
    of blocking the log behind it.
    """


class NoQuorumError(RaftError):
    """No leader was known for the whole timeout: the cluster cannot make progress right now."""


class MembershipChangeError(RaftError):
    """A membership change was refused (another is pending, or it is not a single-server change).

    `retryable` is True when the same change can succeed later without any action by the caller.
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class NodeStoppedError(RaftError):
    """The member is not running."""
