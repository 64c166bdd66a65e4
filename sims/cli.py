"""The simulator's command line.

    python -m sims run [--workload kv|workflows] --seeds N [--start S] [--nodes K] [--mutant NAME]
    python -m sims replay SEED [--workload kv|workflows] [--nodes K] [--mutant NAME] [--trace]

The default workload is the key-value one (`sims/cluster.py`); `workflows` runs Managers and random
workflows (`sims/workflows.py`).
"""

from __future__ import annotations

import argparse
import sys
import time

from sims.cluster import SimOptions, SimResult, run_seed
from sims.mutants import MUTANTS, WORKFLOW_MUTANTS, planted
from sims.workflows import WorkflowOptions, WorkflowResult, run_workflow_seed

WORKLOADS = ("kv", "workflows")


def _replay_command(seed: int, nodes: int, mutant: str | None, workload: str = "kv") -> str:
    command = f"python -m sims replay {seed}"
    if workload != "kv":
        command += f" --workload {workload}"
    command += f" --nodes {nodes}"
    if mutant:
        command += f" --mutant {mutant}"
    return command


def run_one(seed: int, nodes: int, mutant: str | None, trace: bool = False) -> SimResult:
    with planted(mutant):
        return run_seed(SimOptions(seed=seed, nodes=nodes, trace=trace))


def run_workflows(seed: int, nodes: int, mutant: str | None, trace: bool = False) -> WorkflowResult:
    with planted(mutant):
        return run_workflow_seed(WorkflowOptions(seed=seed, nodes=nodes, trace=trace))


def _run(args: argparse.Namespace) -> int:
    passed = failed = 0
    started = time.perf_counter()
    virtual = 0.0
    for seed in range(args.start, args.start + args.seeds):
        try:
            result: SimResult | WorkflowResult
            if args.workload == "workflows":
                result = run_workflows(seed, args.nodes, args.mutant)
            else:
                result = run_one(seed, args.nodes, args.mutant)
        except Exception as exc:  # a crash of the run itself is a failure of that seed
            failed += 1
            print(f"seed {seed}: FAILED: the run raised {type(exc).__name__}: {exc}")
            print(f"  replay: {_replay_command(seed, args.nodes, args.mutant, args.workload)}")
            continue
        virtual += result.virtual_time
        if result.ok:
            passed += 1
            if args.verbose:
                if isinstance(result, WorkflowResult):
                    print(f"{result.summary()}: ok")
                else:
                    print(f"seed {seed}: ok ({result.operations} ops, {result.elections} elections)")
        else:
            failed += 1
            first = result.violations[0]
            print(f"seed {seed}: FAILED: {first}")
            print(f"  replay: {_replay_command(seed, args.nodes, args.mutant, args.workload)}")
    elapsed = time.perf_counter() - started
    print(f"simulated {virtual:.0f} virtual s in {elapsed:.1f} s ({virtual / max(elapsed, 1e-9):.0f}x real time)")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def _replay(args: argparse.Namespace) -> int:
    if args.workload == "workflows":
        return _replay_workflows(args)
    result = run_one(args.seed, args.nodes, args.mutant, trace=args.trace)
    if args.trace:
        for line in result.trace:
            print(line)
    print(
        f"seed {result.seed}: {result.operations} operations ({result.completed_operations} completed), "
        f"{result.elections} elections, {result.crashes} crashes, {result.messages} messages, "
        f"linearizability {result.linearizability}, {result.virtual_time:.1f} virtual s"
    )
    for violation in result.violations:
        print(f"VIOLATION {violation}")
    print(f"digest: {result.digest}")
    return 0 if result.ok else 1


def _replay_workflows(args: argparse.Namespace) -> int:
    result = run_workflows(args.seed, args.nodes, args.mutant, trace=args.trace)
    if args.trace:
        for line in result.trace:
            print(line)
    print(result.summary())
    for violation in result.violations:
        print(f"VIOLATION {violation}")
    print(f"digest: {result.digest}")
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sims", description="graft-trio's deterministic simulator")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a campaign of seeds")
    run.add_argument("--workload", choices=WORKLOADS, default="kv")
    run.add_argument("--seeds", type=int, default=100)
    run.add_argument("--start", type=int, default=0)
    run.add_argument("--nodes", type=int, default=5)
    run.add_argument("--mutant", choices=sorted({**MUTANTS, **WORKFLOW_MUTANTS}))
    run.add_argument("--verbose", action="store_true")
    replay = commands.add_parser("replay", help="run one seed and print its digest")
    replay.add_argument("seed", type=int)
    replay.add_argument("--workload", choices=WORKLOADS, default="kv")
    replay.add_argument("--nodes", type=int, default=5)
    replay.add_argument("--mutant", choices=sorted({**MUTANTS, **WORKFLOW_MUTANTS}))
    replay.add_argument("--trace", action="store_true")
    args = parser.parse_args(argv)
    sys.setrecursionlimit(10_000)
    return _run(args) if args.command == "run" else _replay(args)
