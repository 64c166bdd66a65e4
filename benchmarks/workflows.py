"""Workflows per second and start-to-completion latency, on one member and on three (issue 4 §5).

    python -m benchmarks workflows [--workflows 5000] [--five-step-workflows 1500] [--window 200]
                                   [--serial 200] [--members 1,3] [--claim-batch N] [--max-concurrent-steps N]
                                   [--quick] [--profile DIR] [--keep]

Every member is a process of its own (``python -m benchmarks.workflows --id n1 ...``): a `Manager` on TCP
on loopback with ``cluster_secret`` set, its log in a durable `FileStorage` (``RaftConfig()``: every batch
fsynced) in a temp directory, and the Manager's other settings left at their defaults
(``max_concurrent_steps=16``, ``claim_batch=4``, a 7-day retention) unless `--claim-batch` or
`--max-concurrent-steps` set them. One process per member rather than three Managers in one process,
because that is how a cluster is deployed and because on a 2-core machine three members in one process
would share one core (the GIL) while the other idles, which is neither a lower nor an upper bound of a
deployment. The load is generated inside the member processes, so the
figures include the client's own cost, as an embedded engine's would. The members are driven over
the JSON-lines control channel of `benchmarks/raft_protocol.py`, with `benchmarks/raft.py`'s
`MemberProcess`.

Each member registers one node, ``step``: ``execute`` returns a one-key patch and, while its config's
``remaining`` is above 1, asks for the next ``step`` through ``next_nodes``, so a five-step workflow is a
chain of five steps, each its own claim and commit. For each cluster size, on fresh clusters:

1. latency: `serial` one-step and then `serial` five-step workflows, each started once the previous one
   completed, round robin over the members; a workflow's latency runs from just before `start_workflow`
   on a member to that member's seeing its `WorkflowCompleted` event (every member sees every event);
   p50 and p99;
2. throughput, one-step and then five-step, each on a fresh cluster (so that neither runs on the state
   the other left behind): `window` starters in all, split evenly over the members, each starting a
   workflow, waiting for its `WorkflowCompleted` and starting the next, until the members have started
   `workflows` in all; a warm-up of ``2 * window`` workflows first. The figure is the workflows over the
   time from the first start to the last completion (``time.perf_counter``, one clock for all processes
   on Linux). Raft entries per workflow is the leader's commit index over the run divided by the workflows,
   and CPU ms per workflow the members' `time.process_time` (all threads) over the run, summed;
3. the peer: on the one-step cluster, after its run, the same `window` spread the same way proposes the
   lightest command of the same log (a `Tick`, through the same `Proposer` that `start_workflow` uses) as
   fast as it can; the one-step workflow rate as a fraction of that raw Raft throughput shows the engine's
   cost.

The last line is ``one_step_workflows_per_s_3_members: X``. With `--profile DIR`, every member process
profiles each throughput run with cProfile (its main thread) into ``DIR/<run>-<member>.prof`` and a
summary next to it (``.txt``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

import graft_trio as graft
from benchmarks._args import positive_int
from benchmarks.raft import BenchmarkError, MemberProcess, free_port
from benchmarks.raft_protocol import (
    format_peers,
    member_parser,
    profiled,
    reply,
    requests_from_stdin,
)
from graft_trio.state import commands as c

NAMES = ("n1", "n2", "n3")
STARTUP_TIMEOUT = 60.0
WORKFLOW_TIMEOUT = 60.0  # one workflow, start to completion, before the run counts it as failed
EVENT_BACKLOG = 1 << 22  # completions queued for the tracker; past it a run is reported as broken


# --- the member process ---------------------------------------------------------------------------------


class Step(graft.Node[dict[str, Any], dict[str, Any]]):
    """A trivial step: a one-key patch, and the next step of the chain while ``remaining`` is above 1."""

    name = "step"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        remaining = int(config["remaining"])
        following = [graft.NextNode("step", config={"remaining": remaining - 1})] if remaining > 1 else []
        return graft.NodeResult(data={"done": int(state.get("done", 0)) + 1}, next_nodes=following)


class CompletionTracker:
    """Wakes whoever waits for a workflow when this member applies its `WorkflowCompleted` (or `Failed`)."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[trio.Event, list[float]]] = {}
        self.broken: str | None = None

    def expect(self, workflow_id: str) -> tuple[trio.Event, list[float]]:
        """Call before starting the workflow: the event is set, and the list gets the time and (1.0 for
        completed, 0.0 for failed), when its terminal event is applied here."""
        entry: tuple[trio.Event, list[float]] = (trio.Event(), [])
        self._waiting[workflow_id] = entry
        return entry

    async def run(self, manager: graft.Manager, *, task_status: trio.TaskStatus[None]) -> None:
        async with manager.subscribe(graft.WorkflowCompleted, graft.WorkflowFailed, capacity=EVENT_BACKLOG) as events:
            task_status.started()
            async for event in events:
                now = time.perf_counter()
                if isinstance(event, graft.EventsDropped):
                    self.broken = f"the completion tracker missed {event.count} events"
                    continue
                entry = self._waiting.pop(event.workflow_id, None)
                if entry is not None:
                    entry[1].extend((now, 1.0 if isinstance(event, graft.WorkflowCompleted) else 0.0))
                    entry[0].set()


class Member:
    """One member's Manager, the completion tracker and the requests of the control channel."""

    def __init__(self, manager: graft.Manager, profile_path: str | None) -> None:
        self.manager = manager
        self.tracker = CompletionTracker()
        self.profile_path = profile_path

    def status(self) -> dict[str, Any]:
        status = self.manager.raft.status()
        return {
            "role": status.role,
            "leader": status.leader_id,
            "commit": status.commit_index,
            "applied": status.applied_index,
        }

    async def one_workflow(self, workflow_id: str, steps: int) -> tuple[float, bool]:
        """Start a workflow of `steps` steps and wait for it: (seconds to completion, completed)."""
        done, outcome = self.tracker.expect(workflow_id)
        began = time.perf_counter()
        await self.manager.start_workflow(
            graft.WorkflowTrigger(
                workflow_id=workflow_id,
                initial_state={},
                initial_nodes=[graft.NodeConfig(name="step", config={"remaining": steps})],
            )
        )
        with trio.move_on_after(WORKFLOW_TIMEOUT):
            await done.wait()
            return outcome[0] - began, outcome[1] == 1.0
        return time.perf_counter() - began, False

    async def workflows(self, prefix: str, count: int, window: int, steps: int, profile: str | None) -> dict[str, Any]:
        """`window` starters start `count` workflows in all, each waiting for its workflow to complete."""
        numbers = iter(range(count))
        failed = 0

        async def starter() -> None:
            nonlocal failed
            for number in numbers:
                _, completed = await self.one_workflow(f"{prefix}{number}", steps)
                failed += not completed

        with self._profiled(profile):
            began, cpu_began = time.perf_counter(), time.process_time()
            async with trio.open_nursery() as nursery:
                for _ in range(min(window, count)):
                    nursery.start_soon(starter)
            ended, cpu = time.perf_counter(), time.process_time() - cpu_began
        return self._answer({"began": began, "ended": ended, "cpu": cpu, "count": count, "failed": failed})

    async def serial(self, prefix: str, count: int, steps: int) -> dict[str, Any]:
        latencies: list[float] = []
        failed = 0
        for number in range(count):
            latency, completed = await self.one_workflow(f"{prefix}{number}", steps)
            if completed:
                latencies.append(latency)
            else:
                failed += 1
        return self._answer({"latencies": latencies, "failed": failed})

    async def proposals(self, count: int, window: int) -> dict[str, Any]:
        """`window` proposers propose `count` `Tick`s in all through the member's `Proposer`."""
        numbers = iter(range(count))

        async def proposer() -> None:
            for _ in numbers:
                await self.manager.proposer.propose(c.Tick, timeout=WORKFLOW_TIMEOUT)

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(min(window, count)):
                nursery.start_soon(proposer)
        return self._answer({"began": began, "ended": time.perf_counter(), "count": count})

    def _answer(self, answer: dict[str, Any]) -> dict[str, Any]:
        if self.tracker.broken is not None:
            return {"error": self.tracker.broken}
        return answer

    def _profiled(self, what: str | None) -> contextlib.AbstractContextManager[None]:
        if self.profile_path is None or what is None:
            return profiled(None)
        return profiled(f"{self.profile_path}/{what}-{self.manager.node_id}.prof")


async def serve(member: Member) -> None:
    """Answer control requests from stdin, one at a time, until `stop` or the end of stdin."""
    async for request in requests_from_stdin():
        op = request["op"]
        answer: dict[str, Any]
        if op == "status":
            answer = member.status()
        elif op == "workflows":
            answer = await member.workflows(
                str(request["prefix"]),
                int(request["count"]),
                int(request["window"]),
                int(request["steps"]),
                request.get("profile"),
            )
        elif op == "serial":
            answer = await member.serial(str(request["prefix"]), int(request["count"]), int(request["steps"]))
        elif op == "proposals":
            answer = await member.proposals(int(request["count"]), int(request["window"]))
        elif op == "stop":
            reply({"stopped": True})
            return
        else:
            answer = {"error": f"unknown op {op!r}"}
        reply(answer)


async def run_member(args: argparse.Namespace) -> None:
    manager = graft.Manager(
        args.id,
        args.address,
        args.data_dir,
        transport="tcp",
        peers=args.peers,
        cluster_secret=args.cluster_secret,
        **({} if args.claim_batch is None else {"claim_batch": args.claim_batch}),
        **({} if args.max_concurrent_steps is None else {"max_concurrent_steps": args.max_concurrent_steps}),
    )
    manager.register_node(Step())
    member = Member(manager, args.profile)
    async with manager, trio.open_nursery() as nursery:
        await nursery.start(member.tracker.run, manager)
        reply({"event": "ready"})
        await serve(member)
        nursery.cancel_scope.cancel()


def member_main(argv: Sequence[str]) -> int:
    parser = member_parser("One member of the workflow benchmark (a graft-trio Manager).")
    parser.add_argument("--data-dir", required=True, help="where the member's FileStorage lives")
    parser.add_argument("--cluster-secret", required=True, help="shared secret the members authenticate with")
    parser.add_argument("--profile", default=None, help="directory for the throughput runs' profiles")
    parser.add_argument("--claim-batch", type=int, default=None, help="Manager(claim_batch=...)")
    parser.add_argument("--max-concurrent-steps", type=int, default=None, help="Manager(max_concurrent_steps=...)")
    trio.run(run_member, parser.parse_args(list(argv)))
    return 0


# --- the orchestrator -----------------------------------------------------------------------------------


class Cluster:
    """`size` member processes of one fresh cluster, each with its data in `root`."""

    def __init__(self, size: int, root: str, profile_dir: str | None, manager_options: Sequence[str]) -> None:
        names = NAMES[:size]
        addresses = {name: f"127.0.0.1:{free_port()}" for name in names}
        secret = secrets.token_hex(16)
        self.members: dict[str, MemberProcess] = {}
        for name in names:
            os.makedirs(os.path.join(root, name))
            argv = [sys.executable, "-m", "benchmarks.workflows", "--id", name]
            argv += ["--address", addresses[name], "--data-dir", os.path.join(root, name), "--cluster-secret", secret]
            peers = {other: address for other, address in addresses.items() if other != name}
            argv += ["--peers", format_peers(peers)]  # empty for a one-member cluster
            if profile_dir is not None:
                argv += ["--profile", profile_dir]
            argv += manager_options
            self.members[name] = MemberProcess(name, argv, os.path.join(root, f"{name}.log"))

    async def __aenter__(self) -> Cluster:
        try:
            async with trio.open_nursery() as nursery:
                for member in self.members.values():
                    nursery.start_soon(member.start)
            await self.wait_for_leader()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for member in self.members.values():
                    nursery.start_soon(member.stop)

    async def statuses(self) -> dict[str, dict[str, Any]]:
        return {name: await member.request({"op": "status"}, timeout=10) for name, member in self.members.items()}

    async def wait_for_leader(self) -> str:
        with trio.move_on_after(STARTUP_TIMEOUT):
            while True:
                statuses = await self.statuses()
                leaders = {status["leader"] for status in statuses.values()}
                leader = next(iter(leaders)) if len(leaders) == 1 else None
                if leader is not None and statuses[leader]["role"] == "leader":
                    return str(leader)
                await trio.sleep(0.02)
        raise BenchmarkError(f"no agreed leader within {STARTUP_TIMEOUT} s")

    async def commit_index(self) -> int:
        leader = await self.wait_for_leader()
        return int((await self.statuses())[leader]["commit"])

    async def on_all(self, requests: dict[str, dict[str, Any]], timeout: float) -> dict[str, dict[str, Any]]:
        """Send each member its request at once; their answers."""
        answers: dict[str, dict[str, Any]] = {}

        async def ask(name: str, request: dict[str, Any]) -> None:
            answers[name] = await self.members[name].request(request, timeout=timeout)

        async with trio.open_nursery() as nursery:
            for name, request in requests.items():
                nursery.start_soon(ask, name, request)
        return answers


@attrs.frozen
class Plan:
    workflows: int  # one-step workflows per throughput run
    five_step_workflows: int
    window: int
    serial: int
    sizes: tuple[int, ...]
    manager_options: tuple[str, ...] = ()  # member arguments for Manager settings other than the defaults


@attrs.frozen
class Throughput:
    workflows: int
    seconds: float
    failed: int
    entries: int  # Raft entries committed during the run
    cpu: float  # CPU seconds (all threads) of the member processes during their part of the run

    @property
    def per_second(self) -> float:
        return self.workflows / self.seconds

    @property
    def cpu_per_workflow(self) -> float:
        return self.cpu / self.workflows

    @property
    def entries_per_workflow(self) -> float:
        return self.entries / self.workflows


@attrs.define
class SizeResult:
    size: int
    latency: dict[int, list[float]] = attrs.Factory(dict)  # steps -> seconds
    latency_failed: int = 0
    throughput: dict[int, Throughput] = attrs.Factory(dict)  # steps -> run
    proposals_per_second: float = math.nan


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (index < total % parts) for index in range(parts)]


def percentile(values: list[float], percent: int) -> float:
    if len(values) < 2:
        return values[0] if values else math.nan
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


async def run_throughput(
    cluster: Cluster, label: str, count: int, window: int, steps: int, profile: bool
) -> Throughput:
    names = list(cluster.members)
    timeout = count * steps * 0.1 + 120

    def requests(prefix: str, total: int, profile_as: str | None) -> dict[str, dict[str, Any]]:
        counts, windows = split(total, len(names)), split(window, len(names))
        return {
            name: {
                "op": "workflows",
                "prefix": f"{prefix}-{name}-",
                "count": counts[index],
                "window": windows[index],
                "steps": steps,
                "profile": profile_as,
            }
            for index, name in enumerate(names)
        }

    await cluster.on_all(requests(f"{label}-warmup", 2 * window, None), timeout)
    first_index = await cluster.commit_index()
    answers = await cluster.on_all(requests(label, count, label if profile else None), timeout)
    entries = await cluster.commit_index() - first_index
    began = min(float(answer["began"]) for answer in answers.values())
    ended = max(float(answer["ended"]) for answer in answers.values())
    failed = sum(int(answer["failed"]) for answer in answers.values())
    cpu = sum(float(answer["cpu"]) for answer in answers.values())
    return Throughput(count, ended - began, failed, entries, cpu)


async def run_proposals(cluster: Cluster, count: int, window: int) -> float:
    names = list(cluster.members)
    counts, windows = split(count, len(names)), split(window, len(names))
    requests = {
        name: {"op": "proposals", "count": counts[index], "window": windows[index]} for index, name in enumerate(names)
    }
    answers = await cluster.on_all(requests, timeout=count * 0.1 + 120)
    began = min(float(answer["began"]) for answer in answers.values())
    ended = max(float(answer["ended"]) for answer in answers.values())
    return count / (ended - began)


async def measure(size: int, plan: Plan, root: str, profile_dir: str | None) -> SizeResult:
    result = SizeResult(size)
    runs = iter(range(1_000_000))

    def fresh_cluster() -> Cluster:
        return Cluster(size, os.path.join(root, f"{size}-members-{next(runs)}"), profile_dir, plan.manager_options)

    async with fresh_cluster() as cluster:
        print(f"  {size} member(s): latency, {plan.serial} one-step then five-step workflows ...", flush=True)
        names = list(cluster.members)
        for steps in (1, 5):
            latencies: list[float] = []
            for index, count in enumerate(split(plan.serial, len(names))):
                answer = await cluster.members[names[index]].request(
                    {"op": "serial", "prefix": f"serial{steps}-{names[index]}-", "count": count, "steps": steps},
                    timeout=count * WORKFLOW_TIMEOUT + 60,
                )
                latencies += [float(latency) for latency in answer["latencies"]]
                result.latency_failed += int(answer["failed"])
            result.latency[steps] = latencies
    for steps, count in ((1, plan.workflows), (5, plan.five_step_workflows)):
        async with fresh_cluster() as cluster:
            label = f"{size}m-{steps}step"
            run = await run_throughput(cluster, label, count, plan.window, steps, profile_dir is not None)
            result.throughput[steps] = run
            print(
                f"  {size} member(s): {steps}-step throughput: {run.per_second:,.0f} workflows/s"
                f" ({count} in {run.seconds:.2f} s, {run.entries_per_workflow:.2f} Raft entries and"
                f" {run.cpu_per_workflow * 1000:.2f} CPU ms per workflow, {run.cpu / run.seconds:.2f} CPUs busy)",
                flush=True,
            )
            if steps == 1:
                result.proposals_per_second = await run_proposals(cluster, plan.workflows * 2, plan.window)
                print(f"  {size} member(s): peer: {result.proposals_per_second:,.0f} Tick proposals/s", flush=True)
    return result


def report(results: list[SizeResult], plan: Plan) -> None:
    print()
    print(f"window {plan.window} workflows in flight, split over the members; latency over {plan.serial} each")
    header = (
        f"{'members':>7} | {'steps':>5} | {'workflows/s':>11} | {'steps/s':>8} | {'entries/wf':>10} | "
        f"{'p50 ms':>7} | {'p99 ms':>7} | {'failed':>6}"
    )
    print(header)
    for result in results:
        for steps in (1, 5):
            run = result.throughput[steps]
            latencies = result.latency[steps]
            print(
                f"{result.size:>7} | {steps:>5} | {run.per_second:>11,.0f} | {run.per_second * steps:>8,.0f} | "
                f"{run.entries_per_workflow:>10.2f} | {percentile(latencies, 50) * 1000:>7.1f} | "
                f"{percentile(latencies, 99) * 1000:>7.1f} | {run.failed:>6}"
            )
    for result in results:
        one_step = result.throughput[1].per_second
        print(
            f"peer, {result.size} member(s): raw Raft proposals of the same log (Tick, same window and members):"
            f" {result.proposals_per_second:,.0f}/s; one-step workflows/s is"
            f" {one_step / result.proposals_per_second:.2f}x that"
        )
    failed = sum(result.latency_failed + sum(run.failed for run in result.throughput.values()) for result in results)
    if failed:
        print(f"WARNING: {failed} workflows did not complete")
    three = next((result for result in results if result.size == 3), None)
    if three is not None:
        print(f"one_step_workflows_per_s_3_members: {three.throughput[1].per_second:.0f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks workflows", description=__doc__.split("\n")[0])
    parser.add_argument("--workflows", type=positive_int, default=5000, help="one-step workflows per throughput run")
    parser.add_argument("--five-step-workflows", type=positive_int, default=1500, help="five-step workflows per run")
    parser.add_argument("--window", type=positive_int, default=200, help="workflows in flight, over all members")
    parser.add_argument("--serial", type=positive_int, default=200, help="workflows for the latency, of each kind")
    parser.add_argument("--members", default="1,3", help="cluster sizes, comma-separated (1 to 3)")
    parser.add_argument("--claim-batch", type=int, default=None, help="Manager(claim_batch=...); default: its default")
    parser.add_argument(
        "--max-concurrent-steps", type=int, default=None, help="Manager(max_concurrent_steps=...); default: its default"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--profile", default=None, help="cProfile every member's throughput runs into DIR")
    parser.add_argument("--keep", action="store_true", help="keep the data directories and member logs")
    args = parser.parse_args(argv)
    sizes = tuple(int(size) for size in args.members.split(","))
    if not sizes or any(not 1 <= size <= len(NAMES) for size in sizes):
        parser.error(f"--members takes sizes from 1 to {len(NAMES)}")
    options: list[str] = []
    if args.claim_batch is not None:
        options += ["--claim-batch", str(args.claim_batch)]
    if args.max_concurrent_steps is not None:
        options += ["--max-concurrent-steps", str(args.max_concurrent_steps)]
    if args.quick:
        plan = Plan(300, 100, 50, 20, sizes, tuple(options))
    else:
        plan = Plan(args.workflows, args.five_step_workflows, args.window, args.serial, sizes, tuple(options))
    profile_dir = None if args.profile is None else os.path.abspath(args.profile)
    if profile_dir is not None:
        os.makedirs(profile_dir, exist_ok=True)
    root = tempfile.mkdtemp(prefix="graft-workflows-bench-")
    print(
        f"graft-trio workflows: one process per member, TCP on loopback with cluster_secret, durable FileStorage"
        f" in {root}; Python {platform.python_version()}, {os.cpu_count()} CPUs",
        flush=True,
    )
    try:
        results = [trio.run(measure, size, plan, root, profile_dir) for size in plan.sizes]
    except BenchmarkError as error:
        print(f"benchmark failed: {error}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(results, plan)
    if profile_dir is not None:
        print(f"profiles in {profile_dir}")
    return 0


if __name__ == "__main__":  # a member process, started by `Cluster`
    sys.exit(member_main(sys.argv[1:]))
