"""The control channel between `python -m benchmarks raft` and its member processes, shared by both systems.

The orchestrator (`benchmarks/raft.py`) starts each member as ``python -m benchmarks.raft_member ...``
(graft-trio) or ``python -m benchmarks.raft_pysyncobj ...`` (PySyncObj) and talks to it over its stdin and
stdout, one JSON object per line. A member prints ``{"event": "ready"}`` once it serves Raft traffic, then
answers each request with one line, in order:

- ``{"op": "status"}`` -> ``{"role": "leader" | "follower" | ..., "leader": <name or null>,
  "commit": <index>, "applied": <index>}``.
- ``{"op": "load", "window": W, "seconds": S, "warmup": U, "timeout": T, "batch": B}`` -> the pipelined
  client, run in this member's own process: `W` writers each keep one command outstanding (a new one as
  soon as the last completed) for ``U + S`` seconds; answers ``{"completed": n, "failed": f, "lost": l}``,
  counting only the completions that arrived in the last `S` seconds (the first `U` are warm-up). With
  `B` > 1 (it defaults to 1), ceil(W / B) writers each keep one call of `B` fresh commands outstanding
  (graft-trio: `RaftNode.propose_many`; PySyncObj: the commands packed into one `@replicated` call), so
  `W` is still the commands outstanding; a call counts as `B` commands, completed, failed or lost.
- ``{"op": "serial", "count": n, "timeout": T}`` -> ``{"latencies": [seconds, ...], "failed": f}``: `n`
  writes, each sent once the previous one completed.
- ``{"op": "write_until_ok", "interval": I, "attempt_timeout": T, "limit": L}`` -> ``{"ok": bool,
  "attempts": k}``: a new write every `I` seconds (each given `T` seconds) until one succeeds, at most `L`
  seconds. Used on a survivor right after the leader was killed.
- ``{"op": "stop"}`` -> ``{"stopped": true}``, then the member exits.

Every write is one `COMMAND_BYTES`-byte command; both systems' state machines apply it the same way (count
the commands and their bytes). Members are named ``n1``, ``n2``, ``n3`` in both systems.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

COMMAND_BYTES = 100


def command_bytes(writer: int, sequence: int) -> bytes:
    """A distinct `COMMAND_BYTES`-byte command for `writer`'s `sequence`-th write."""
    head = b"%08x:%012x:" % (writer, sequence)
    return head + b"." * (COMMAND_BYTES - len(head))


def encode_line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes | str) -> dict[str, Any]:
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError(f"control line is not a JSON object: {line!r}")
    return message


async def requests_from_stdin() -> AsyncIterator[dict[str, Any]]:
    """A trio member's control requests, one per line of stdin (blank lines skipped), until its end."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = bytearray()
    async with stdin:
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                chunk = await stdin.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
                continue
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            if line.strip():
                yield decode_line(line)


def reply(message: dict[str, Any]) -> None:
    """Answer the orchestrator: one line on stdout."""
    sys.stdout.buffer.write(encode_line(message))
    sys.stdout.flush()


@contextlib.contextmanager
def profiled(path: str | None) -> Iterator[None]:
    """With a `path`, cProfile the block into ``<path>`` and a readable summary into ``<path>.txt``, which
    starts with the process's CPU time over the block and how much of it the cyclic garbage collector took
    (cProfile charges a collection to whatever allocated when it started)."""
    if path is None:
        yield
        return
    collections = {generation: [0, 0.0] for generation in range(3)}
    started = [0.0]

    def time_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            totals = collections[info["generation"]]
            totals[0] += 1
            totals[1] += time.process_time() - started[0]

    gc.callbacks.append(time_collection)
    cpu_before = time.process_time()
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        cpu = time.process_time() - cpu_before
        gc.callbacks.remove(time_collection)
        profiler.dump_stats(path)
        text = io.StringIO()
        text.write(f"process CPU time {cpu:.3f} s (all threads, with the profiler's own overhead); garbage collection ")
        text.write(", ".join(f"gen{g}: {n} in {t:.3f} s" for g, (n, t) in collections.items()))
        text.write(f"; {sum(t for _, t in collections.values()) / cpu:.0%} of the CPU time\n\n" if cpu else "\n\n")
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        with open(path + ".txt", "w") as file:
            file.write(text.getvalue())


def parse_peers(text: str) -> dict[str, str]:
    """``n2@127.0.0.1:7102,n3@127.0.0.1:7103`` -> ``{"n2": "127.0.0.1:7102", ...}``."""
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, address = item.partition("@")
        if not sep or not name or not address:
            raise argparse.ArgumentTypeError(f"peer {item!r} is not written name@host:port")
        peers[name] = address
    return peers


def format_peers(peers: dict[str, str]) -> str:
    return ",".join(f"{name}@{address}" for name, address in peers.items())


def member_parser(description: str) -> argparse.ArgumentParser:
    """The options both kinds of member take."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--id", required=True, help="this member's name (n1, n2, ...)")
    parser.add_argument("--address", required=True, help="host:port for Raft traffic")
    parser.add_argument("--peers", type=parse_peers, required=True, help="name@host:port,... of the others")
    return parser
