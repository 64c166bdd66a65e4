"""One graft-trio member process for `python -m benchmarks raft`: a `RaftNode` on TCP and its control channel.

    python -m benchmarks.raft_member --id n1 --address 127.0.0.1:7101 --peers n2@127.0.0.1:7102,... \\
        --data-dir DIR [--non-durable] [--cluster-secret S] [--profile FILE]

The member keeps its log in a `FileStorage` in `--data-dir`. With ``RaftConfig(durable=True)`` (the
default) every batch the driver persists is fsynced before anything that depends on it leaves; with
``--non-durable`` (``RaftConfig(durable=False)``) the same files are written without fsync. The control
channel is described in `benchmarks/raft_protocol.py`; the pipelined client runs in this process, as
`window` trio tasks each awaiting `RaftNode.propose` or, for a `load` with ``"batch": B`` > 1,
ceil(`window` / B) tasks each awaiting `RaftNode.propose_many` of B commands (one log entry per call).
With `--profile FILE`, each `load` and `serial` request is profiled with cProfile (this member's main
thread only, so not the storage's worker threads) into ``FILE-load-<window>.prof`` (with a batch,
``FILE-load-<window>-batches-of-<B>.prof``) / ``FILE-serial.prof``, with a readable summary next to each
(``.txt``).
"""

from __future__ import annotations

import contextlib
import math
import struct
import sys
import time
from typing import Any

import trio

from benchmarks.raft_protocol import command_bytes, member_parser, profiled, reply, requests_from_stdin
from graft_trio.raft import (
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    RaftConfig,
    RaftError,
    RaftNode,
    StateMachine,
    open_storage,
)

RETRYABLE = (NotLeaderError, ProposalTimeout, NoQuorumError)


class CountingMachine(StateMachine):
    """The replicated state: how many commands were applied, and their bytes."""

    def __init__(self) -> None:
        self.count = 0
        self.total_bytes = 0

    def apply(self, index: int, command: bytes) -> bytes:
        self.count += 1
        self.total_bytes += len(command)
        return b""

    def query(self, query: bytes) -> bytes:
        return struct.pack(">QQ", self.count, self.total_bytes)

    def snapshot(self) -> bytes:
        return struct.pack(">QQ", self.count, self.total_bytes)

    def restore(self, snapshot: bytes) -> None:
        self.count, self.total_bytes = struct.unpack(">QQ", snapshot)


class Member:
    def __init__(self, node: RaftNode, profile_path: str | None) -> None:
        self.node = node
        self.profile_path = profile_path
        self._sequence = 0

    def _next_command(self, writer: int) -> bytes:
        self._sequence += 1
        return command_bytes(writer, self._sequence)

    def status(self) -> dict[str, Any]:
        status = self.node.status()
        return {
            "role": status.role,
            "leader": status.leader_id,
            "commit": status.commit_index,
            "applied": status.applied_index,
        }

    async def load(self, window: int, seconds: float, warmup: float, timeout: float, batch: int) -> dict[str, Any]:
        """`window` commands outstanding: one `propose` per writer, or with `batch` > 1 one `propose_many` of
        `batch` commands per writer, ceil(window / batch) writers. A call counts as `batch` commands."""
        start = time.perf_counter()
        count_from, end = start + warmup, start + warmup + seconds
        counts = {"completed": 0, "failed": 0}

        async def writer(index: int) -> None:
            while time.perf_counter() < end:
                try:
                    if batch == 1:
                        await self.node.propose(self._next_command(index), timeout=timeout)
                    else:
                        commands = [self._next_command(index) for _ in range(batch)]
                        await self.node.propose_many(commands, timeout=timeout)
                    outcome = "completed"
                except RaftError:
                    outcome = "failed"
                now = time.perf_counter()
                if count_from <= now < end:
                    counts[outcome] += batch

        with self._profiled(f"load-{window}" if batch == 1 else f"load-{window}-batches-of-{batch}"):
            async with trio.open_nursery() as nursery:
                for index in range(math.ceil(window / batch)):
                    nursery.start_soon(writer, index)
                    if batch > 1:
                        # Let each writer build its first batch before the next starts: all at once, they kept
                        # the member's loop from running (no heartbeats) long enough for an election.
                        await trio.lowlevel.checkpoint()
        return {**counts, "lost": 0}

    def _profiled(self, what: str) -> contextlib.AbstractContextManager[None]:
        """With `--profile`, cProfile the block into ``<profile>-<what>.prof`` and a summary in ``.txt``."""
        return profiled(None if self.profile_path is None else f"{self.profile_path}-{what}.prof")

    async def serial(self, count: int, timeout: float) -> dict[str, Any]:
        latencies: list[float] = []
        failed = 0
        with self._profiled("serial"):
            for _ in range(count):
                command = self._next_command(0)
                began = time.perf_counter()
                try:
                    await self.node.propose(command, timeout=timeout)
                except RaftError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - began)
        return {"latencies": latencies, "failed": failed}

    async def write_until_ok(self, interval: float, attempt_timeout: float, limit: float) -> dict[str, Any]:
        # Attempts overlap, as on the PySyncObj side: a new one every `interval`, each retried by the driver
        # itself (forwarded to whichever leader it learns of) until its own `attempt_timeout`.
        succeeded = trio.Event()
        attempts = 0

        async def attempt(command: bytes) -> None:
            with contextlib.suppress(*RETRYABLE):
                await self.node.propose(command, timeout=attempt_timeout)
                succeeded.set()

        with trio.move_on_after(limit):
            async with trio.open_nursery() as nursery:
                while not succeeded.is_set():
                    attempts += 1
                    nursery.start_soon(attempt, self._next_command(1_000_000))
                    with trio.move_on_after(interval):
                        await succeeded.wait()
                nursery.cancel_scope.cancel()
        return {"ok": succeeded.is_set(), "attempts": attempts}


async def serve(member: Member) -> None:
    """Answer control requests from stdin until `stop` or the end of stdin."""
    async for request in requests_from_stdin():
        op = request["op"]
        if op == "status":
            answer = member.status()
        elif op == "load":
            answer = await member.load(
                int(request["window"]),
                float(request["seconds"]),
                float(request["warmup"]),
                float(request["timeout"]),
                int(request.get("batch", 1)),
            )
        elif op == "serial":
            answer = await member.serial(int(request["count"]), float(request["timeout"]))
        elif op == "write_until_ok":
            answer = await member.write_until_ok(
                float(request["interval"]), float(request["attempt_timeout"]), float(request["limit"])
            )
        elif op == "stop":
            reply({"stopped": True})
            return
        else:
            answer = {"error": f"unknown op {op!r}"}
        reply(answer)


async def run(args: Any) -> None:
    transport_options = {"cluster_secret": args.cluster_secret} if args.cluster_secret else {}
    node = RaftNode(
        args.id,
        args.address,
        args.peers,
        state_machine=CountingMachine(),
        storage=open_storage(args.data_dir),
        transport=args.transport,
        config=RaftConfig(durable=not args.non_durable),
        transport_options=transport_options,
    )
    async with node:
        reply({"event": "ready"})
        await serve(Member(node, args.profile))


def main(argv: list[str] | None = None) -> int:
    parser = member_parser("One graft-trio member of the Raft benchmark.")
    parser.add_argument("--data-dir", required=True, help="where the member's FileStorage lives")
    parser.add_argument("--non-durable", action="store_true", help="RaftConfig(durable=False): no fsync")
    parser.add_argument("--transport", default="tcp", help="the transport's entry-point name (default tcp)")
    parser.add_argument("--cluster-secret", default=None, help="shared secret the members authenticate with")
    parser.add_argument("--profile", default=None, help="profile each load request into this file")
    trio.run(run, parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
