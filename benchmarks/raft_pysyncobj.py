"""One PySyncObj member process for `python -m benchmarks raft --vs pysyncobj` (the only module importing it).

    python -m benchmarks.raft_pysyncobj --id n1 --address 127.0.0.1:7101 --peers n2@127.0.0.1:7102,...

PySyncObj runs with its defaults (`SyncObjConf()`): the Raft log and state live in memory only (no journal
file, nothing fsynced), one tick thread does all Raft work, and the leader sends AppendEntries in batches
every `appendEntriesPeriod` (0.1 s). The main thread serves the control channel described in
`benchmarks/raft_protocol.py`. PySyncObj has no client protocol, so the pipelined client runs here, in the
leader's process: every completion callback (called on the tick thread) issues the writer's next command.
A `load` with ``"batch": B`` > 1 packs B commands into each call instead (`append_packed`, its argument
a list of B commands, pickled by PySyncObj into one log entry), as a PySyncObj application could do
itself; ceil(`window` / B) calls are kept outstanding and each completed call counts B commands.
"""

from __future__ import annotations

import itertools
import math
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.raft_protocol import command_bytes, decode_line, encode_line, member_parser

try:
    from pysyncobj import FAIL_REASON, SyncObj, SyncObjException, replicated
except ImportError:  # the orchestrator checks first; this is for someone starting a member by hand
    print("pysyncobj is not installed: .venv/bin/pip install pysyncobj", file=sys.stderr)
    raise SystemExit(2) from None

Callback = Callable[[Any, int], None]
_ROLES = {0: "follower", 1: "candidate", 2: "leader"}


class CountingObject(SyncObj):  # type: ignore[misc]  # PySyncObj has no type hints
    """The replicated state: how many commands were applied, and their bytes."""

    def __init__(self, address: str, partners: list[str]) -> None:
        super().__init__(address, partners)
        self.count = 0
        self.total_bytes = 0

    @replicated  # type: ignore[untyped-decorator]
    def append(self, command: bytes) -> None:
        self.count += 1
        self.total_bytes += len(command)

    @replicated  # type: ignore[untyped-decorator]
    def append_packed(self, commands: list[bytes]) -> None:
        """Several commands in one call (one log entry), applied as `append` would apply each in turn."""
        for command in commands:
            self.count += 1
            self.total_bytes += len(command)


class Member:
    def __init__(self, name: str, address: str, peers: dict[str, str]) -> None:
        self.name = name
        self.names_by_address = {address: name, **{a: n for n, a in peers.items()}}
        self.obj = CountingObject(address, list(peers.values()))
        self._sequence = itertools.count(1)  # next() is atomic: both threads take numbers

    def _append(self, writer: int, callback: Callback, batch: int = 1) -> None:
        """One `append` call, or with `batch` > 1 one `append_packed` call of that many fresh commands."""
        if batch == 1:
            self.obj.append(command_bytes(writer, next(self._sequence)), callback=callback)
        else:
            commands = [command_bytes(writer, next(self._sequence)) for _ in range(batch)]
            self.obj.append_packed(commands, callback=callback)

    def status(self) -> dict[str, Any]:
        for _ in range(10):
            try:
                # Read on this thread while the tick thread runs: a dict it grows may change mid-iteration.
                status = self.obj.getStatus()
                break
            except RuntimeError:
                time.sleep(0.001)
        else:
            raise RuntimeError("PySyncObj's status kept changing while read")
        leader = status["leader"]
        return {
            "role": _ROLES.get(status["state"], str(status["state"])),
            "leader": None if leader is None else self.names_by_address.get(leader.id, leader.id),
            "commit": status["commit_idx"],
            "applied": status["last_applied"],
        }

    def load(self, window: int, seconds: float, warmup: float, timeout: float, batch: int) -> dict[str, Any]:
        """`window` commands outstanding: one per call, or with `batch` > 1 `batch` packed into each call,
        ceil(window / batch) calls outstanding. A call counts as `batch` commands."""
        start = time.perf_counter()
        count_from, end = start + warmup, start + warmup + seconds
        lock = threading.Lock()  # callbacks run on the tick thread, but a QUEUE_FULL one runs on the caller's
        writers = math.ceil(window / batch)
        counts = {"completed": 0, "failed": 0, "outstanding": writers}
        finished = threading.Event()

        def writer(index: int) -> Callback:
            def on_result(result: Any, error: int) -> None:
                now = time.perf_counter()
                with lock:
                    if count_from <= now < end:
                        counts["completed" if error == FAIL_REASON.SUCCESS else "failed"] += batch
                    if now >= end:
                        counts["outstanding"] -= 1
                        if counts["outstanding"] == 0:
                            finished.set()
                        return
                self._append(index, on_result, batch)

            return on_result

        for index in range(writers):
            self._append(index, writer(index), batch)
        finished.wait(warmup + seconds + timeout)
        with lock:
            lost = counts["outstanding"] * batch
            return {"completed": counts["completed"], "failed": counts["failed"], "lost": lost}

    def serial(self, count: int, timeout: float) -> dict[str, Any]:
        latencies: list[float] = []
        failed = 0
        for _ in range(count):
            command = command_bytes(0, next(self._sequence))
            began = time.perf_counter()
            try:
                self.obj.append(command, sync=True, timeout=timeout)
            except SyncObjException:
                failed += 1
                continue
            latencies.append(time.perf_counter() - began)
        return {"latencies": latencies, "failed": failed}

    def write_until_ok(self, interval: float, attempt_timeout: float, limit: float) -> dict[str, Any]:
        # Attempts overlap: one forwarded to the dead leader never answers, and the next one need not wait
        # for it. `attempt_timeout` plays no part: an unanswered attempt is simply left behind.
        succeeded = threading.Event()
        attempts = 0

        def on_result(result: Any, error: int) -> None:
            if error == FAIL_REASON.SUCCESS:
                succeeded.set()

        deadline = time.perf_counter() + limit
        while not succeeded.is_set() and time.perf_counter() < deadline:
            attempts += 1
            self._append(1_000_000, on_result)
            succeeded.wait(interval)
        return {"ok": succeeded.is_set(), "attempts": attempts}


def serve(member: Member) -> None:
    print(encode_line({"event": "ready"}).decode(), end="", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = decode_line(line)
        op = request["op"]
        if op == "status":
            answer = member.status()
        elif op == "load":
            answer = member.load(
                int(request["window"]),
                float(request["seconds"]),
                float(request["warmup"]),
                float(request["timeout"]),
                int(request.get("batch", 1)),
            )
        elif op == "serial":
            answer = member.serial(int(request["count"]), float(request["timeout"]))
        elif op == "write_until_ok":
            answer = member.write_until_ok(
                float(request["interval"]), float(request["attempt_timeout"]), float(request["limit"])
            )
        elif op == "stop":
            print(encode_line({"stopped": True}).decode(), end="", flush=True)
            return
        else:
            answer = {"error": f"unknown op {op!r}"}
        print(encode_line(answer).decode(), end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = member_parser("One PySyncObj member of the Raft benchmark.").parse_args(argv)
    member = Member(args.id, args.address, args.peers)
    member.obj.waitBinded()
    try:
        serve(member)
    finally:
        member.obj.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
