"""graft-trio's Raft against PySyncObj, three member processes each on loopback TCP, in one run.

    python -m benchmarks raft --vs pysyncobj [--seconds 5] [--warmup 1] [--window 100,1000,10000,30000]
                              [--batch 100] [--batch-window 30000,100000,300000,1000000] [--serial 200]
                              [--failovers 5] [--systems all] [--quick] [--profile DIR] [--keep]

Three clusters are measured one after the other, never at the same time: graft-trio durable
(``RaftConfig(durable=True)``, `FileStorage`, one fsync per persisted batch), graft-trio non-durable
(``RaftConfig(durable=False)``, the same files without fsync) and PySyncObj with its defaults (log in memory,
nothing on disk). For each, this module starts three member processes (`benchmarks/raft_member.py` or
`benchmarks/raft_pysyncobj.py`) and drives them over the control channel of `benchmarks/raft_protocol.py`,
in this order, on the same three processes (a killed member is replaced by a fresh process):

1. serial latency: `serial` writes on the leader, each sent once the previous one completed; p50 and p99;
2. failover, `failovers` times: SIGKILL the leader's process, ask a survivor to write until a write
   succeeds (a new attempt every 20 ms), and time from just before the kill to the survivor's answer; then
   start the killed member again (same address and data directory) and wait, untimed, until all three
   agree on a leader and the restarted member has applied what was committed. The figure is the median;
3. throughput, at each window: the leader runs the pipelined client in its own process (PySyncObj has no
   client protocol, so graft-trio's load is generated the same way): `window` writers, each with one
   100-byte command outstanding, for `warmup` + `seconds`; the completions in the last `seconds` count.
   A row's throughput is its best window;
4. with `batch` B > 1, throughput again, at each of the `batch_window` windows (larger ones: see
   `DEFAULT_BATCH_WINDOWS`), with B commands per call: graft-trio's client runs ceil(window / B) writers
   each with one `RaftNode.propose_many` of B commands outstanding (one log entry per call), PySyncObj's
   packs B commands into each `@replicated` call. These are rows of their own ("graft-trio ..., batches
   of B", "PySyncObj, B commands per call") measured on the processes of their one-command-per-call
   sibling, right after it, so that the run does not start and fail over three more clusters; their
   serial latency and failovers would be the sibling's.

The last lines compare graft-trio non-durable's throughput with PySyncObj's:
``ratio_vs_pysyncobj_one_propose_per_command`` (one `propose` per command over PySyncObj's defaults, one
command per call), ``ratio_vs_pysyncobj_packed`` (graft-trio non-durable's best row over the packed PySyncObj
row, what a PySyncObj application packing commands itself would get), and last ``ratio_vs_pysyncobj: X``:
graft-trio non-durable's best row (batches included: `propose_many` is part of its client API) over
PySyncObj's defaults, one command per call.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

import attrs
import trio

from benchmarks._args import positive_int
from benchmarks.raft_protocol import decode_line, encode_line, format_peers

NAMES = ("n1", "n2", "n3")
FAILOVER_ATTEMPT_INTERVAL = 0.02
FAILOVER_ATTEMPT_TIMEOUT = 2.0
FAILOVER_LIMIT = 30.0
WRITE_TIMEOUT = 5.0
STARTUP_TIMEOUT = 30.0
LEADER_TIMEOUT = 60.0
# PySyncObj sends AppendEntries every 0.1 s, so it needs tens of thousands of commands outstanding to reach
# its peak (about 60,000/s here); graft-trio peaks near 1000. Every one-command-per-call row runs every window.
DEFAULT_WINDOWS = (100, 1000, 10000, 30000)
# The batched rows run windows of their own: with 100 commands per call, window 1000 is 10 calls outstanding,
# and packed PySyncObj ships about `window` commands per 0.1 s up to hundreds of thousands of commands per
# second, so it peaks only at window 300,000 or beyond; graft-trio admits 1,024 calls (`max_pending_proposals`,
# 102,400 commands) at a time, and the calls beyond wait for room.
DEFAULT_BATCH_WINDOWS = (30000, 100000, 300000, 1000000)


class BenchmarkError(Exception):
    pass


@attrs.frozen
class System:
    """One row of the report: a kind of cluster and how its client calls it."""

    label: str
    kind: str  # "graft" or "pysyncobj"
    durable: bool = False
    batch: int = 1  # commands per call: above 1, graft-trio's `propose_many` or a packed PySyncObj call

    @property
    def cluster(self) -> tuple[str, bool]:
        """The rows that share this are measured on the same three member processes."""
        return self.kind, self.durable


GRAFT_DURABLE = System("graft-trio durable", "graft", durable=True)
GRAFT_NON_DURABLE = System("graft-trio non-durable", "graft", durable=False)
PYSYNCOBJ = System("PySyncObj (defaults)", "pysyncobj")
DEFAULT_BATCH = 100


def batched(system: System, batch: int) -> System:
    """`system` with `batch` commands per call."""
    if system.kind == "graft":
        return attrs.evolve(system, label=f"{system.label}, batches of {batch}", batch=batch)
    return attrs.evolve(system, label=f"PySyncObj, {batch} commands per call", batch=batch)


def all_systems(batch: int) -> tuple[System, ...]:
    """Every row, each batched one right after its one-command-per-call sibling (none when `batch` is 1)."""
    systems: list[System] = []
    for system in (GRAFT_DURABLE, GRAFT_NON_DURABLE, PYSYNCOBJ):
        systems.append(system)
        if batch > 1:
            systems.append(batched(system, batch))
    return tuple(systems)


SYSTEM_CHOICES: dict[str, Callable[[System], bool]] = {
    "all": lambda system: True,
    "graft": lambda system: system.kind == "graft",
    "graft-durable": lambda system: system.kind == "graft" and system.durable,
    "graft-non-durable": lambda system: system.kind == "graft" and not system.durable,
    "pysyncobj": lambda system: system.kind == "pysyncobj",
    "non-durable": lambda system: not system.durable,  # what the ratio lines compare
    "batched": lambda system: system.batch > 1,
}


@attrs.define
class Result:
    system: System
    throughput: dict[int, float] = attrs.Factory(dict)  # window -> commands/s
    load_failed: int = 0
    load_lost: int = 0
    serial: list[float] = attrs.Factory(list)
    serial_failed: int = 0
    failovers: list[float] = attrs.Factory(list)
    gave_up: str | None = None  # why the row's later windows were not measured (the cluster lost its leader)

    def serial_percentile(self, percent: int) -> float:
        if len(self.serial) < 2:
            return self.serial[0] if self.serial else math.nan
        return statistics.quantiles(self.serial, n=100, method="inclusive")[percent - 1]

    @property
    def best_throughput(self) -> float:
        return max(self.throughput.values(), default=math.nan)

    @property
    def failover_median(self) -> float:
        return statistics.median(self.failovers) if self.failovers else math.nan


# --- one member process -------------------------------------------------------------------------------------


class MemberProcess:
    """A member's process and its control channel (JSON lines on its stdin and stdout)."""

    def __init__(self, name: str, argv: list[str], log_path: str) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.process: trio.Process | None = None
        self._log: TextIO | None = None
        self._buffer = bytearray()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self._log = open(self.log_path, "a")  # noqa: SIM115 (closed in `reap`)
        self._buffer.clear()
        self.process = await trio.lowlevel.open_process(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log
        )
        with trio.move_on_after(STARTUP_TIMEOUT):
            message = await self._read_message()
            if message.get("event") == "ready":
                return
            raise BenchmarkError(f"{self.name} started with {message!r}; log: {self.log_tail()}")
        raise BenchmarkError(f"{self.name} not ready after {STARTUP_TIMEOUT} s; log: {self.log_tail()}")

    async def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        process = self.process
        if process is None or process.stdin is None:
            raise BenchmarkError(f"{self.name} is not running")
        with trio.move_on_after(timeout):
            try:
                await process.stdin.send_all(encode_line(message))
                answer = await self._read_message()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                raise BenchmarkError(f"{self.name} closed its control channel: {self.log_tail()}") from error
            if "error" in answer:
                raise BenchmarkError(f"{self.name} answered {message['op']} with {answer['error']}")
            return answer
        raise BenchmarkError(f"{self.name} did not answer {message['op']} within {timeout} s: {self.log_tail()}")

    async def _read_message(self) -> dict[str, Any]:
        assert self.process is not None and self.process.stdout is not None
        while (newline := self._buffer.find(b"\n")) < 0:
            chunk = await self.process.stdout.receive_some(65536)
            if not chunk:
                raise BenchmarkError(f"{self.name} exited: {self.log_tail()}")
            self._buffer += chunk
        line = bytes(self._buffer[:newline])
        del self._buffer[: newline + 1]
        return decode_line(line)

    def kill(self) -> None:
        """SIGKILL, without waiting for the process to be reaped (`reap` does that)."""
        if self.alive:
            assert self.process is not None
            self.process.kill()

    async def reap(self) -> None:
        if self.process is not None:
            self.kill()
            with trio.CancelScope(shield=True):
                await self.process.wait()
                for stream in (self.process.stdin, self.process.stdout):
                    if stream is not None:
                        await stream.aclose()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def stop(self) -> None:
        """Ask the member to stop; kill it if it does not within a few seconds."""
        if self.alive:
            with trio.move_on_after(5):
                await self.request({"op": "stop"}, timeout=5)
                assert self.process is not None
                await self.process.wait()
        await self.reap()

    def log_tail(self, lines: int = 15) -> str:
        with open(self.log_path, errors="replace") as file:
            tail = file.readlines()[-lines:]
        return "".join(tail).strip() or "(empty stderr)"


# --- one cluster of three -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """The three member processes of one system."""

    def __init__(self, system: System, root: str, profile_dir: str | None) -> None:
        self.system = system
        self.root = root
        addresses = {name: f"127.0.0.1:{free_port()}" for name in NAMES}
        secret = secrets.token_hex(16)
        self.members: dict[str, MemberProcess] = {}
        for name in NAMES:
            peers = format_peers({other: address for other, address in addresses.items() if other != name})
            common = ["--id", name, "--address", addresses[name], "--peers", peers]
            if system.kind == "graft":
                data_dir = os.path.join(root, name)
                argv = [sys.executable, "-m", "benchmarks.raft_member", *common, "--data-dir", data_dir]
                argv += ["--transport", "tcp", "--cluster-secret", secret]
                if not system.durable:
                    argv.append("--non-durable")
                if profile_dir is not None:
                    slug = "durable" if system.durable else "non-durable"
                    argv += ["--profile", os.path.join(profile_dir, f"graft-{slug}-{name}")]
            else:
                argv = [sys.executable, "-m", "benchmarks.raft_pysyncobj", *common]
            self.members[name] = MemberProcess(name, argv, os.path.join(root, f"{name}.log"))

    async def start(self) -> None:
        async with trio.open_nursery() as nursery:
            for member in self.members.values():
                nursery.start_soon(member.start)

    async def close(self) -> None:
        """Stop every member; whatever happens meanwhile (even Ctrl-C), none is left running."""
        try:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    for member in self.members.values():
                        nursery.start_soon(member.stop)
        finally:
            for member in self.members.values():
                member.kill()

    async def statuses(self) -> dict[str, dict[str, Any]]:
        return {
            name: await member.request({"op": "status"}, timeout=5)
            for name, member in self.members.items()
            if member.alive
        }

    async def wait_for_leader(self, caught_up: str | None = None) -> str:
        """The leader, once every running member names the same one (and `caught_up` has applied its commit)."""
        target_commit: int | None = None
        with trio.move_on_after(LEADER_TIMEOUT):
            while True:
                statuses = await self.statuses()
                leaders = {status["leader"] for status in statuses.values()}
                leader = next(iter(leaders)) if len(leaders) == 1 else None
                if leader is not None and statuses.get(leader, {}).get("role") == "leader":
                    if caught_up is None:
                        return str(leader)
                    if target_commit is None:
                        target_commit = int(statuses[leader]["commit"])
                    if int(statuses[caught_up]["applied"]) >= target_commit:
                        return str(leader)
                await trio.sleep(0.02)
        raise BenchmarkError(f"{self.system.label}: no agreed leader within {LEADER_TIMEOUT} s")


# --- the measurements ---------------------------------------------------------------------------------------


@attrs.frozen
class Plan:
    seconds: float
    warmup: float
    windows: tuple[int, ...]
    batch_windows: tuple[int, ...]
    serial: int
    failovers: int

    def windows_for(self, system: System) -> tuple[int, ...]:
        return self.windows if system.batch == 1 else self.batch_windows

    def all_windows(self, systems: Iterable[System]) -> list[int]:
        return sorted({window for system in systems for window in self.windows_for(system)})


async def measure(systems: Sequence[System], plan: Plan, root: str, profile_dir: str | None) -> list[Result]:
    """The rows of one cluster, on one fresh set of three members: serial latency first, then the failovers
    (both for the one-command-per-call row only: a batched row would repeat them), then each row's load at
    each window.

    The load runs last because a window a system cannot keep up with leaves a backlog behind it; the
    one-command-per-call row's windows come first, so its figures are measured as if no batched row followed.
    """
    results = [Result(system) for system in systems]
    cluster = Cluster(systems[0], root, profile_dir)
    try:
        await cluster.start()
        leader = await cluster.wait_for_leader()
        print(f"  {cluster.system.label}: members up, leader {leader}", flush=True)
        for result in results:
            if result.system.batch == 1:
                await measure_latencies(cluster, leader, plan, result)
        for result in results:
            await measure_throughput(cluster, plan, result)
    finally:
        await cluster.close()
    return results


async def measure_latencies(cluster: Cluster, leader: str, plan: Plan, result: Result) -> None:
    label = result.system.label
    print(f"  {label}: {plan.serial} serial writes ...", flush=True)
    serial = await cluster.members[leader].request(
        {"op": "serial", "count": plan.serial, "timeout": WRITE_TIMEOUT},
        timeout=plan.serial * WRITE_TIMEOUT + 60,
    )
    result.serial = [float(latency) for latency in serial["latencies"]]
    result.serial_failed = int(serial["failed"])
    for round_number in range(plan.failovers):
        await failover(cluster, result)
        print(f"  {label}: failover {round_number + 1}/{plan.failovers}: {result.failovers[-1]:.3f} s", flush=True)


async def measure_throughput(cluster: Cluster, plan: Plan, result: Result) -> None:
    """Each window in turn. A cluster that has no agreed leader after a window (the load it could not keep up
    with outlasted the election timeouts) ends the row there: the windows measured so far stand, and the
    report says where it stopped, instead of the whole run failing."""
    for window in plan.windows_for(result.system):
        try:
            leader = await cluster.wait_for_leader()
        except BenchmarkError as error:
            result.gave_up = f"stopped before window {window}: {error}"
            print(f"  {result.system.label}: {result.gave_up}", flush=True)
            return
        load = await cluster.members[leader].request(
            {
                "op": "load",
                "window": window,
                "seconds": plan.seconds,
                "warmup": plan.warmup,
                "timeout": WRITE_TIMEOUT,
                "batch": result.system.batch,
            },
            timeout=plan.warmup + plan.seconds + WRITE_TIMEOUT + 60,
        )
        result.throughput[window] = int(load["completed"]) / plan.seconds
        result.load_failed += int(load["failed"])
        result.load_lost += int(load["lost"])
        print(f"  {result.system.label}: window {window}: {result.throughput[window]:,.0f} commands/s", flush=True)


async def failover(cluster: Cluster, result: Result) -> None:
    leader = await cluster.wait_for_leader()
    survivor = cluster.members[next(name for name in NAMES if name != leader)]
    victim = cluster.members[leader]
    began = time.perf_counter()
    victim.kill()
    answer = await survivor.request(
        {
            "op": "write_until_ok",
            "interval": FAILOVER_ATTEMPT_INTERVAL,
            "attempt_timeout": FAILOVER_ATTEMPT_TIMEOUT,
            "limit": FAILOVER_LIMIT,
        },
        timeout=FAILOVER_LIMIT + 10,
    )
    elapsed = time.perf_counter() - began
    if not answer["ok"]:
        raise BenchmarkError(f"{cluster.system.label}: no write succeeded within {FAILOVER_LIMIT} s of the kill")
    result.failovers.append(elapsed)
    await victim.reap()
    await victim.start()
    await cluster.wait_for_leader(caught_up=victim.name)


# --- report -------------------------------------------------------------------------------------------------


def describe_machine() -> str:
    versions = []
    for package in ("trio", "pysyncobj"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return (
        f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.platform()}; {', '.join(versions)}"
    )


def milliseconds(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.2f}"


def print_report(results: dict[System, Result], windows: Sequence[int]) -> None:
    width = max(len("system"), *(len(system.label) for system in results))
    print()
    print("throughput, commands/s, by window (commands kept outstanding by the client):")
    print(f"{'system':<{width}} | " + " | ".join(f"{window:>8}" for window in windows) + f" | {'best':>8}")
    for result in results.values():
        cells = " | ".join(
            f"{result.throughput[window]:>8,.0f}" if window in result.throughput else f"{'-':>8}" for window in windows
        )
        print(f"{result.system.label:<{width}} | {cells} | {result.best_throughput:>8,.0f}")
    # A batched row ran on its sibling's cluster, after the sibling's serial writes and failovers.
    per_command = [result for result in results.values() if result.system.batch == 1]
    if per_command:
        width = max(len("system"), *(len(result.system.label) for result in per_command))
        print()
        print(
            f"{'system':<{width}} | {'serial p50 ms':>13} | {'serial p99 ms':>13} | {'failover median s':>17} "
            "| failovers s"
        )
        for result in per_command:
            failovers = " ".join(f"{value:.2f}" for value in result.failovers) or "-"
            median_text = "n/a" if math.isnan(result.failover_median) else f"{result.failover_median:.3f}"
            print(
                f"{result.system.label:<{width}} | {milliseconds(result.serial_percentile(50)):>13} "
                f"| {milliseconds(result.serial_percentile(99)):>13} | {median_text:>17} | {failovers}"
            )
    for result in results.values():
        if result.gave_up is not None:
            print(f"{result.system.label}: {result.gave_up}")
        if result.load_failed or result.load_lost or result.serial_failed:
            print(
                f"{result.system.label}: {result.load_failed} failed and {result.load_lost} unanswered writes "
                f"under load, {result.serial_failed} failed serial writes"
            )
    graft = [result for result in results.values() if result.system.kind == "graft"]
    durable = best_row(result for result in graft if result.system.durable)
    fast = best_row(result for result in graft if not result.system.durable)
    one_propose = results.get(GRAFT_NON_DURABLE)
    reference = results.get(PYSYNCOBJ)
    pysyncobj = [result for result in results.values() if result.system.kind == "pysyncobj"]
    packed = next((result for result in pysyncobj if result.system.batch > 1), None)
    print()
    print(
        "targets (throughput: each row's best window; graft-trio's better row of each durability, one propose "
        "per command or batched, over PySyncObj (defaults)):"
    )
    if fast is not None and reference is not None:
        value = ratio(fast, reference)
        print(
            f"  graft-trio non-durable >= 3x PySyncObj throughput: {value:.2f}x "
            f"({fast.system.label} over {reference.system.label}), {verdict(value >= 3)}"
        )
    if durable is not None and reference is not None:
        value = ratio(durable, reference)
        print(
            f"  graft-trio durable >= PySyncObj throughput: {value:.2f}x "
            f"({durable.system.label} over {reference.system.label}), {verdict(value >= 1)}"
        )
    if one_propose is not None:
        p50 = one_propose.serial_percentile(50)
        print(f"  graft-trio non-durable serial p50 <= 1 ms: {milliseconds(p50)} ms, {verdict(p50 <= 0.001)}")
    for result in per_command:
        if result.system.kind == "graft" and result.failovers:
            median = result.failover_median
            print(f"  {result.system.label} median failover < 1 s: {median:.3f} s, {verdict(median < 1)}")
    if one_propose is not None and reference is not None:
        print(f"ratio_vs_pysyncobj_one_propose_per_command: {ratio(one_propose, reference):.2f}")
    if fast is not None and packed is not None:
        print(f"ratio_vs_pysyncobj_packed: {ratio(fast, packed):.2f}")
    if fast is not None and reference is not None:
        print(f"ratio_vs_pysyncobj: {ratio(fast, reference):.2f}")


def best_row(results: Iterable[Result]) -> Result | None:
    return max(results, key=lambda result: result.best_throughput, default=None)


def ratio(numerator: Result, denominator: Result) -> float:
    return numerator.best_throughput / denominator.best_throughput if denominator.best_throughput else math.nan


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


# --- command line -------------------------------------------------------------------------------------------


def tcp_transport_problem() -> str | None:
    """Why graft-trio members cannot use the `tcp` transport here, or None if they can."""
    import graft_trio.raft  # noqa: F401  (graft_trio.transport is imported through the raft package)
    from graft_trio.transport import UnknownTransportError, load_transport

    try:
        load_transport("tcp", cluster_secret="probe")
    except (UnknownTransportError, ImportError, TypeError) as error:
        return str(error)
    return None


async def run(plan: Plan, systems: Sequence[System], root: str, profile_dir: str | None) -> dict[System, Result]:
    clusters: dict[tuple[str, bool], list[System]] = {}
    for system in systems:
        clusters.setdefault(system.cluster, []).append(system)
    results: dict[System, Result] = {}
    for index, rows in enumerate(clusters.values()):
        directory = os.path.join(root, f"cluster-{index}")
        os.makedirs(directory)
        for result in await measure(rows, plan, directory, profile_dir):
            results[result.system] = result
    return results


def parse_windows(text: str) -> tuple[int, ...]:
    try:
        windows = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not windows or min(windows) < 1:
        raise argparse.ArgumentTypeError("windows must be positive integers")
    return windows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks raft",
        description=__doc__.split("\n", 1)[0],
        epilog="Rows: graft-trio durable and non-durable, one propose per command; the same clusters again with "
        "propose_many batches of --batch commands; PySyncObj (defaults), one command per call; the same PySyncObj "
        "cluster again with --batch commands packed into each call. The last line, ratio_vs_pysyncobj, is "
        "graft-trio non-durable's best row over PySyncObj (defaults); the two lines before it have graft-trio's "
        "one-propose-per-command row as numerator (_one_propose_per_command) or the packed PySyncObj row as "
        "denominator (_packed).",
    )
    parser.add_argument("--vs", required=True, choices=["pysyncobj"], help="the Raft library to compare with")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured load duration per window (5)")
    parser.add_argument("--warmup", type=float, default=1.0, help="load before measuring starts (1)")
    parser.add_argument(
        "--window",
        type=parse_windows,
        default=DEFAULT_WINDOWS,
        help="commands kept outstanding by the client; a comma-separated list is measured window by window "
        "and each row's best counts (default: " + ",".join(map(str, DEFAULT_WINDOWS)) + ")",
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=DEFAULT_BATCH,
        help="commands per call in the batched rows: graft-trio's propose_many, PySyncObj's packed calls; "
        f"1 leaves those rows out ({DEFAULT_BATCH})",
    )
    parser.add_argument(
        "--batch-window",
        type=parse_windows,
        default=DEFAULT_BATCH_WINDOWS,
        help="the batched rows' windows, still in commands outstanding (ceil(window / batch) calls) "
        "(default: " + ",".join(map(str, DEFAULT_BATCH_WINDOWS)) + ")",
    )
    parser.add_argument("--serial", type=int, default=200, help="serial writes for the latency figures (200)")
    parser.add_argument("--failovers", type=int, default=5, help="leader kills per cluster; the median is kept (5)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 s load at window 1000 (batched rows: 30000), 20 serial writes, 1 failover",
    )
    parser.add_argument(
        "--systems",
        default="all",
        choices=list(SYSTEM_CHOICES),
        help="measure only some rows: graft-durable, graft-non-durable and pysyncobj each name a cluster (its "
        "one-command-per-call row and its batched row), graft both graft-trio clusters, non-durable the "
        "graft-trio non-durable and PySyncObj rows (what the ratio lines compare), batched the three batched "
        "rows only (then without serial writes or failovers). The ratio_vs_pysyncobj line needs graft-trio "
        "non-durable and PySyncObj (defaults)",
    )
    parser.add_argument("--profile", metavar="DIR", help="cProfile the graft-trio leaders' work into DIR")
    parser.add_argument("--dir", help="where the members' data and logs go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the data and logs afterwards")
    args = parser.parse_args(argv)
    plan = Plan(args.seconds, args.warmup, args.window, args.batch_window, args.serial, args.failovers)
    if args.quick:
        plan = Plan(seconds=1.0, warmup=0.3, windows=(1000,), batch_windows=(30000,), serial=20, failovers=1)
    systems = tuple(filter(SYSTEM_CHOICES[args.systems], all_systems(args.batch)))
    if not systems:
        print(f"--systems {args.systems} with --batch 1 leaves no row to measure", file=sys.stderr)
        return 2

    if any(system.kind == "pysyncobj" for system in systems) and importlib.util.find_spec("pysyncobj") is None:
        print("pysyncobj is not installed; install it with: .venv/bin/pip install pysyncobj", file=sys.stderr)
        return 2
    if any(system.kind == "graft" for system in systems) and (problem := tcp_transport_problem()) is not None:
        print(f"graft-trio's tcp transport is not available: {problem}", file=sys.stderr)
        return 2
    profile_dir = os.path.abspath(args.profile) if args.profile else None
    if profile_dir is not None:
        os.makedirs(profile_dir, exist_ok=True)

    print("Raft vs PySyncObj: 3 member processes per cluster on loopback TCP, 100-byte commands")
    print(describe_machine())
    print(
        f"load: windows {', '.join(map(str, plan.windows))}, each {plan.seconds:g} s measured after "
        f"{plan.warmup:g} s warm-up; "
        f"{plan.serial} serial writes; {plan.failovers} failovers per cluster; "
        + (
            f"batched rows: {args.batch} commands per call at windows {', '.join(map(str, plan.batch_windows))}"
            if args.batch > 1
            else "no batched rows"
        ),
        flush=True,
    )
    root = tempfile.mkdtemp(prefix="graft-raft-bench-", dir=args.dir)
    try:
        results = trio.run(run, plan, systems, root, profile_dir)
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every member process was killed", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"data and member logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print_report(results, plan.all_windows(results))
    if profile_dir is not None:
        print(f"profiles of the graft-trio leaders: {profile_dir}/*.prof.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
