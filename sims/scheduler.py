"""Deterministic task scheduling: the one module of graft-trio that reaches into trio's private run loop.

trio runs each batch of runnable tasks in a random order drawn from a module-level `random.Random`
(``trio._core._run._r``). When the module flag ``_ALLOW_DETERMINISTIC_SCHEDULING`` is true (trio sets it
itself under Hypothesis), the run loop first sorts the batch by task creation order (``Task._counter``)
and then shuffles it with ``_r``, so seeding ``_r`` fixes every interleaving of a run. This module sets
the flag and the seed for the length of a simulation and restores both afterwards, and refuses to do so
on a trio it has not been checked against.

What this does not make deterministic, and how the simulator avoids it:

* deadline ties: trio orders cancel scopes with equal deadlines by ``id(scope)``, a memory address. Sims
  take every deadline from `sims.clock.VirtualTime.unique_deadline`, so no two are ever equal.
* ``trio.testing.wait_all_tasks_blocked``: waiters with the same cushion are woken in ``id(task)`` order.
  Simulated code must not have two such waiters at once.
* wall-clock time and I/O: a simulation runs on `trio.testing.MockClock` (whose ``rate`` is 0, so the
  real clock never leaks in) and does no real I/O.
"""

from __future__ import annotations

import inspect
import random
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TypeVar, TypeVarTuple, Unpack

import trio
import trio.testing

# The oldest and newest trio minor versions whose run loop was read and found to work as described in
# the module docstring (0.27.0 and 0.35.0). A newer trio may have moved the private hooks: re-read
# `trio/_core/_run.py`, run tests/test_sim_infra.py against it, and only then raise the bound.
OLDEST_TESTED_TRIO = (0, 27)
NEWEST_TESTED_TRIO = (0, 35)

_FLAG = "_ALLOW_DETERMINISTIC_SCHEDULING"
_RNG = "_r"

RetT = TypeVar("RetT")
PosArgsT = TypeVarTuple("PosArgsT")


def _trio_run_module() -> ModuleType:
    from trio._core import _run

    return _run


def trio_version() -> tuple[int, int]:
    """trio's (major, minor) version."""
    match = re.match(r"(\d+)\.(\d+)", trio.__version__)
    if match is None:
        raise RuntimeError(f"cannot parse the trio version {trio.__version__!r}")
    return int(match.group(1)), int(match.group(2))


def check_trio_supported() -> None:
    """Raise `RuntimeError` unless the installed trio has the private scheduling hooks this module uses.

    Checks the version range, that the module flag and RNG exist with the expected types, that tasks carry
    a creation counter, and (when trio's source is available) that the run loop still sorts and shuffles
    each batch when the flag is set.
    """
    version = trio_version()
    if not OLDEST_TESTED_TRIO <= version <= NEWEST_TESTED_TRIO:
        raise RuntimeError(
            f"deterministic simulation is tested on trio {OLDEST_TESTED_TRIO[0]}.{OLDEST_TESTED_TRIO[1]}"
            f" to {NEWEST_TESTED_TRIO[0]}.{NEWEST_TESTED_TRIO[1]}.x; trio {trio.__version__} is installed"
            " (see sims/scheduler.py for how to extend the range)"
        )
    run_module = _trio_run_module()
    problems: list[str] = []
    if not isinstance(getattr(run_module, _FLAG, None), bool):
        problems.append(f"trio._core._run.{_FLAG} is missing or not a bool")
    if not isinstance(getattr(run_module, _RNG, None), random.Random):
        problems.append(f"trio._core._run.{_RNG} is missing or not a random.Random")
    if not hasattr(trio.lowlevel.Task, "_counter"):
        problems.append("trio.lowlevel.Task has no _counter")
    try:
        loop_source = inspect.getsource(run_module.unrolled_run)
    except (AttributeError, OSError, TypeError):
        # Without source (a frozen or byte-code-only install) the version check has to suffice.
        loop_source = None
    if loop_source is not None and not all(
        needle in loop_source for needle in (f"if {_FLAG}", "t._counter", f"{_RNG}.shuffle(batch)")
    ):
        problems.append("trio's run loop no longer sorts and shuffles batches under the flag")
    if problems:
        raise RuntimeError(
            f"trio {trio.__version__} does not support deterministic scheduling: {'; '.join(problems)}"
        )


@contextmanager
def deterministic_scheduling(seed: int) -> Iterator[None]:
    """Make every `trio.run` inside the block schedule tasks in an order fixed by `seed`.

    The flag and the state of trio's RNG are restored on exit, so an outer setting (Hypothesis sets the
    flag at import) survives. The RNG is process-global: do not run two simulations concurrently in
    threads.
    """
    check_trio_supported()
    run_module = _trio_run_module()
    rng: random.Random = getattr(run_module, _RNG)
    saved_flag: bool = getattr(run_module, _FLAG)
    saved_state = rng.getstate()
    # setattr rather than assignment: trio declares the flag `Final`.
    setattr(run_module, _FLAG, True)
    rng.seed(seed)
    try:
        yield
    finally:
        setattr(run_module, _FLAG, saved_flag)
        rng.setstate(saved_state)


def run_simulation(
    async_fn: Callable[[Unpack[PosArgsT]], Awaitable[RetT]], seed: int, *args: *PosArgsT
) -> RetT:
    """``trio.run(async_fn, *args)`` on a virtual clock that jumps whenever every task is blocked, with
    the scheduling order fixed by `seed`. Returns what `async_fn` returns.

    Virtual time starts at 0.0. The same seed and the same code give the same interleaving of tasks.
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    with deterministic_scheduling(seed):
        return trio.run(async_fn, *args, clock=clock)
