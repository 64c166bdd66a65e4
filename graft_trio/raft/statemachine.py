"""The interface a replicated state machine implements."""

from __future__ import annotations

import abc


class StateMachine(abc.ABC):
    """A deterministic, synchronous state machine replicated by the Raft log.

    Every member applies the same commands in the same order, so `apply` must depend on nothing but the
    state and its arguments: no clock, no randomness, no I/O, no iteration over sets.
    """

    @abc.abstractmethod
    def apply(self, index: int, command: bytes) -> bytes:
        """Apply the committed command at log `index`; the bytes returned are the proposer's result."""

    @abc.abstractmethod
    def query(self, query: bytes) -> bytes:
        """Answer a read without changing state."""

    @abc.abstractmethod
    def snapshot(self) -> bytes:
        """The whole state, as bytes that `restore` accepts."""

    @abc.abstractmethod
    def restore(self, snapshot: bytes) -> None:
        """Replace the whole state with a snapshot."""

    def stamp(self, command: bytes, leader_time: float) -> bytes:
        """The command as the leader appends it, given the leader's clock when it does.

        A state machine whose commands carry a time (leases, timers) overrides this to write
        `leader_time` into the command, so that replicated time is always the leader's, whichever member
        proposed. It runs on the leader only, once per appended entry, and must be a pure function of its
        arguments. The default leaves commands unchanged (and the driver then skips the call).
        """
        return command
