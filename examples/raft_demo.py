"""A three-member Raft cluster in one trio process, replicating a counter; its leader is then killed.

Run it with ``make demo`` or ``.venv/bin/python examples/raft_demo.py``. It uses the real trio clock and
`RaftConfig()` defaults (50 ms ticks, a 0.5 s to 1 s election timeout), so the timings it prints are what
an application embedding `graft_trio.raft` would see over the in-process memory transport. It exits 1 if
the members disagree about the final value.
"""

from __future__ import annotations

import sys
import time

import attrs
import trio

from graft_trio.raft import (
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    RaftConfig,
    RaftNode,
    StateMachine,
)

WRITES_BEFORE_KILL = 50
WRITES_AFTER_KILL = 30
PROGRESS_EVERY = 10


class Counter(StateMachine):
    """The replicated state machine: one integer. ``inc`` adds one and returns the new value."""

    def __init__(self) -> None:
        self.value = 0

    def apply(self, index: int, command: bytes) -> bytes:
        if command == b"inc":
            self.value += 1
        return str(self.value).encode()

    def query(self, query: bytes) -> bytes:
        return str(self.value).encode()

    def snapshot(self) -> bytes:
        return str(self.value).encode()

    def restore(self, snapshot: bytes) -> None:
        self.value = int(snapshot.decode())


@attrs.define(eq=False)
class Member:
    """One member, run under a cancel scope of its own so that the demo can kill it alone."""

    node: RaftNode
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    stopped: trio.Event = attrs.Factory(trio.Event)

    @property
    def node_id(self) -> str:
        return self.node.node_id

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                await self.node.run(task_status=task_status)
        finally:
            self.stopped.set()

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


def build_cluster() -> list[Member]:
    addresses = {"n1": "memory://n1", "n2": "memory://n2", "n3": "memory://n3"}
    return [
        Member(
            RaftNode(
                node_id,
                address,
                peers={peer: peer_address for peer, peer_address in addresses.items() if peer != node_id},
                state_machine=Counter(),
                transport="memory",  # members of one process reach each other by address, no setup
                config=RaftConfig(),
            )
        )
        for node_id, address in addresses.items()
    ]


async def wait_for_leader(members: list[Member], *, not_id: str | None = None) -> Member:
    """The member that is leader, once one is (polled: the demo measures how long that takes)."""
    while True:
        for member in members:
            if member.node.is_leader and member.node_id != not_id:
                return member
        await trio.sleep(0.001)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 0.01 else f"{seconds * 1000:.0f} ms"


class Writer:
    """Sends increments round-robin through the given members and prints one line per batch of them."""

    def __init__(self) -> None:
        self.done = 0
        self.forwarded = 0
        self.last_value = 0
        self._next = 0

    async def increment(self, members: list[Member], count: int) -> None:
        batch_started = time.perf_counter()
        batch_first = self.done + 1
        via: dict[str, int] = {}
        for _ in range(count):
            member = members[self._next % len(members)]
            self._next += 1
            if not member.node.is_leader:
                self.forwarded += 1  # a follower forwards the proposal to the leader
            self.last_value = int(await member.node.propose(b"inc"))
            self.done += 1
            via[member.node_id] = via.get(member.node_id, 0) + 1
            if self.done % PROGRESS_EVERY == 0 or self.done - batch_first + 1 == count:
                elapsed = time.perf_counter() - batch_started
                spread = " ".join(f"{node_id}:{n}" for node_id, n in sorted(via.items()))
                writes = self.done - batch_first + 1
                print(
                    f"  writes {batch_first:3d}-{self.done:<3d} counter={self.last_value:<3d} via {spread}"
                    f"  ({elapsed / writes * 1000:.1f} ms/write)"
                )
                batch_started, batch_first, via = time.perf_counter(), self.done + 1, {}


async def first_write_after_kill(survivor: Member, killed_at: float) -> tuple[int, float]:
    """Propose from a survivor until it succeeds; the value and the seconds since the kill.

    `propose` already retries (with the same request id, so the increment is applied once) while the
    cluster elects a new leader; the loop only covers a call that gave up before one was found.
    """
    while True:
        try:
            value = int(await survivor.node.propose(b"inc"))
        except (NotLeaderError, ProposalTimeout, NoQuorumError):
            continue
        return value, time.perf_counter() - killed_at


async def main() -> int:
    members = build_cluster()
    started = time.perf_counter()
    print("graft_trio.raft demo: 3 members (n1, n2, n3) on the memory transport, RaftConfig() defaults")
    async with trio.open_nursery() as nursery:
        for member in members:
            await nursery.start(member.run)
        leader = await wait_for_leader(members)
        elected_in = time.perf_counter() - started
        print(f"leader elected: {leader.node_id} in {ms(elected_in)} (term {leader.node.status().term})")

        writer = Writer()
        print(f"{WRITES_BEFORE_KILL} increments, round-robin over every member:")
        await writer.increment(members, WRITES_BEFORE_KILL)

        print(f"killing the leader {leader.node_id} ...")
        await leader.kill()
        killed_at = time.perf_counter()
        survivors = [member for member in members if member is not leader]
        new_leader: Member | None = None
        election_time = 0.0
        write_value = 0
        write_time = 0.0

        async def watch_election() -> None:
            nonlocal new_leader, election_time
            new_leader = await wait_for_leader(survivors, not_id=leader.node_id)
            election_time = time.perf_counter() - killed_at

        async def write_once() -> None:
            nonlocal write_value, write_time
            if not survivors[0].node.is_leader:
                writer.forwarded += 1
            write_value, write_time = await first_write_after_kill(survivors[0], killed_at)

        async with trio.open_nursery() as after_kill:
            after_kill.start_soon(watch_election)
            after_kill.start_soon(write_once)
        assert new_leader is not None
        writer.done += 1
        writer.last_value = write_value
        print(
            f"new leader elected: {new_leader.node_id} {ms(election_time)} after the kill "
            f"(term {new_leader.node.status().term})"
        )
        print(f"first successful write after the kill (from {survivors[0].node_id}): {ms(write_time)} after it")

        print(f"{WRITES_AFTER_KILL} more increments over the survivors:")
        await writer.increment(survivors, WRITES_AFTER_KILL)

        print("linearizable reads (ReadIndex) from every surviving member:")
        values: dict[str, int] = {}
        for member in survivors:
            read_started = time.perf_counter()
            try:
                values[member.node_id] = int(await member.node.read(b"get"))
            except NodeStoppedError:
                continue
            read_time = time.perf_counter() - read_started
            role = member.node.status().role
            print(f"  {member.node_id} ({role}): counter={values[member.node_id]} in {ms(read_time)}")
        nursery.cancel_scope.cancel()

    agreed = set(values.values()) == {writer.done} and len(values) == len(survivors)
    print(
        f"summary: {writer.done} increments ({writer.forwarded} forwarded by followers), "
        f"first leader {leader.node_id}, new leader {new_leader.node_id} after {ms(election_time)}, "
        f"first write after kill {ms(write_time)}, reads {'agree' if agreed else 'DISAGREE'} "
        f"on {sorted(set(values.values()))}, total {time.perf_counter() - started:.2f} s"
    )
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
