"""How fast the deterministic simulator runs: virtual seconds of a faulty 5-member cluster per wall second.

Each seed is one `sims.cluster.run_seed` (Raft members, clients, the fault schedule and the checkers,
including the linearizability check at the end), timed with `time.perf_counter`. For scale, the same run
also times a bare `trio.run` in which one task per member sleeps in a loop at the Raft tick rate (20 Hz)
for the same total virtual time: the cost of trio and a virtual clock alone, with no Raft, network or
checkers. It does so on trio's `MockClock(autojump_threshold=0)` (the clock the simulator used until
it got its own) and on the simulator's `sims.scheduler.VirtualClock`.

    python -m benchmarks sim [--seeds 10] [--start 0]

The last line printed is ``sim_speed_x_realtime: X``. docs/BENCHMARKS.md records a run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import trio
import trio.testing

from sims.cluster import SimOptions, run_seed
from sims.scheduler import VirtualClock

NODES = 5
PEER_TICK_INTERVAL = 0.05  # RaftConfig.tick_interval: the rate at which every member's driver wakes up


async def _sleepers(tasks: int, interval: float, duration: float) -> None:
    async def sleeper() -> None:
        while trio.current_time() < duration:
            await trio.sleep(interval)

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(sleeper)


def clock_cost(tasks: int, interval: float, duration: float, clock: trio.abc.Clock) -> float:
    """Wall seconds for `tasks` tasks to each sleep every `interval` virtual seconds for `duration`."""
    started = time.perf_counter()
    trio.run(_sleepers, tasks, interval, duration, clock=clock)
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sim", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="the first seed")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    # As in `python -m sims`: a deep stack of nested nurseries and awaits can exceed the default limit.
    sys.setrecursionlimit(10_000)

    total_virtual = total_wall = 0.0
    print(f"{args.seeds} seeds from {args.start}, {NODES} members under faults")
    print(
        f"{'seed':>6} | {'virtual s':>9} | {'wall s':>7} | {'x real time':>11} | {'messages':>8} | {'ops':>5} | result"
    )
    for seed in range(args.start, args.start + args.seeds):
        started = time.perf_counter()
        result = run_seed(SimOptions(seed=seed, nodes=NODES))
        wall = time.perf_counter() - started
        total_virtual += result.virtual_time
        total_wall += wall
        outcome = "ok" if result.ok else f"{len(result.violations)} violations"
        print(
            f"{seed:>6} | {result.virtual_time:>9.1f} | {wall:>7.2f} | {result.virtual_time / wall:>11.1f} | "
            f"{result.messages:>8} | {result.operations:>5} | {outcome}"
        )
    speed = total_virtual / total_wall
    print(f"total: {total_virtual:.1f} virtual s in {total_wall:.2f} wall s")

    peers: list[tuple[str, trio.abc.Clock]] = [
        ("MockClock(autojump_threshold=0)", trio.testing.MockClock(autojump_threshold=0)),
        ("the simulator's VirtualClock", VirtualClock()),
    ]
    for name, clock in peers:
        peer_wall = clock_cost(NODES, PEER_TICK_INTERVAL, total_virtual, clock)
        print(
            f"peer: bare trio.run on {name}, {NODES} tasks sleeping at "
            f"{1 / PEER_TICK_INTERVAL:.0f} Hz for {total_virtual:.1f} virtual s: {peer_wall:.2f} wall s "
            f"({total_virtual / peer_wall:.0f}x real time), "
            f"{100 * peer_wall / total_wall:.1f}% of the simulation's wall time"
        )
    print(f"sim_speed_x_realtime: {speed:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
