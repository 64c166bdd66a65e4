"""Known Raft bugs, planted by patching the real code for the length of a run.

A mutant is a context manager that replaces one method of the core or driver with a broken version and
restores it on exit. Production code carries no switch for any of them. `python -m sims run --mutant NAME`
must report failures for each; without a mutant the same seeds pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from graft_trio.raft.core import RaftCore, Ready
from graft_trio.raft.node import RaftNode


@contextmanager
def _patched(owner: type, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def commit_old_term() -> Iterator[None]:
    """Figure 8 of the Raft paper: the leader commits an earlier term's entry by counting its replicas."""

    def can_commit(self: RaftCore, index: int) -> bool:
        return True

    with _patched(RaftCore, "_can_commit", can_commit):
        yield


@contextmanager
def forget_vote() -> Iterator[None]:
    """The vote is not persisted: after a crash a member may vote again in the same term."""
    original = RaftNode._persist

    async def persist(self: RaftNode, ready: Ready) -> None:
        if ready.hard_state is not None and ready.hard_state.vote is not None:
            ready = attrs.evolve(ready, hard_state=attrs.evolve(ready.hard_state, vote=None))
        await original(self, ready)

    with _patched(RaftNode, "_persist", persist):
        yield


@contextmanager
def stale_read() -> Iterator[None]:
    """The leader serves a read at its commit index without confirming it is still the leader."""

    def leader_read(self: RaftCore, requester: str, context: int) -> None:
        self._release_read(requester, context, self.log.committed)

    with _patched(RaftCore, "_leader_read", leader_read):
        yield


@contextmanager
def ack_before_sync() -> Iterator[None]:
    """A member sends its messages (acknowledgements included) before its entries are durable."""

    async def process_ready(self: RaftNode, core: RaftCore, ready: Ready) -> None:
        self._send_messages(ready)
        await self._persist(ready)
        self._apply(ready)
        core.advance(ready)
        await self._maybe_snapshot(core)

    with _patched(RaftNode, "_process_ready", process_ready):
        yield


MUTANTS: dict[str, Callable[[], Any]] = {
    "commit-old-term": commit_old_term,
    "forget-vote": forget_vote,
    "stale-read": stale_read,
    "ack-before-sync": ack_before_sync,
}


@contextmanager
def planted(name: str | None) -> Iterator[None]:
    """Plant the mutant called `name` (nothing for None) for the length of the block."""
    if name is None:
        yield
        return
    if name not in MUTANTS:
        raise KeyError(f"no mutant named {name!r}; known: {', '.join(sorted(MUTANTS))}")
    with MUTANTS[name]():
        yield
