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
* ``trio.testing.wait_all_tasks_blocked``: waiters with the same cushion are woken in ``id(task)`` order,
  and on `VirtualClock` only once no deadline is left at all (the clock has already jumped to the next
  deadline when trio looks at them). Simulated code does not use it.
* wall-clock time and I/O: a simulation runs on `VirtualClock` (the real clock never leaks in) and does
  no real I/O.

`VirtualClock` is the virtual time of a run. It behaves as `trio.testing.MockClock(autojump_threshold=0)`
(time stands still while any task can run, and jumps to the next deadline when every task is blocked) at
half the run-loop turns: trio asks a clock how long to sleep (``deadline_to_sleep_time``) only when no
task is runnable, and this clock answers by jumping to the deadline at once, where ``MockClock`` first
spends one turn polling for I/O with a zero timeout and a second one to fire the deadline. Tasks run in
the same order on both clocks (the turn saved runs no task and draws nothing from the scheduling RNG).
It also keeps timers that the run loop fires without waking a task, which the simulated network and
disks use (`VirtualClock.call_at`).
"""

from __future__ import annotations

import functools
import heapq
import inspect
import math
import random
import re
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import TypeVar, TypeVarTuple, Unpack

import trio

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


@functools.cache
def _source_of(function: object) -> str | None:
    """The source of `function` (read once: every simulation checks it); None when there is none."""
    try:
        return inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        # Without source (a frozen or byte-code-only install) the version check has to suffice.
        return None


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
    loop_source = _source_of(getattr(run_module, "unrolled_run", None))
    if loop_source is not None and not all(
        needle in loop_source for needle in (f"if {_FLAG}", "t._counter", f"{_RNG}.shuffle(batch)")
    ):
        problems.append("trio's run loop no longer sorts and shuffles batches under the flag")
    if loop_source is not None and not all(
        needle in loop_source for needle in ("if runner.runq:", "runner.clock.deadline_to_sleep_time(deadline)")
    ):
        problems.append("trio's run loop no longer asks the clock for a sleep time only when no task can run")
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


class VirtualClock(trio.abc.Clock):
    """Virtual time for one `trio.run`, starting at 0.0: it stands still while any task can run, and
    jumps straight to the next deadline or timer when every task is blocked.

    trio calls `deadline_to_sleep_time` only when no task is runnable (`check_trio_supported` checks
    that), just before it polls for I/O: then nothing can happen before trio's next deadline, so the clock
    moves there and the run loop fires that deadline in the same turn. A simulation does no real I/O, so
    no event could have arrived meanwhile. With no deadline and no timer left (every task blocked for
    good: a deadlock) the run sleeps in real time, as a program that waits forever does.

    **Timers.** `call_at` runs a callback when virtual time reaches it, from the run loop itself: no
    task wakes for it and no cancel scope is made, which is what a message delivery or a disk sync of
    the simulator costs otherwise. Timers fire once every task is blocked and virtual time reaches them:
    all the timers set for that time, in the order they were set, then trio's deadlines at that time, in
    one turn of the run loop, so the tasks they wake run together, before anything later happens. (Timers
    are ordered without `sims.clock.VirtualTime.unique_deadline`: they never tie by memory address.) A
    callback must not block or raise (an exception escapes into trio's run loop and ends the run with
    `trio.TrioInternalError`); it may wake tasks (`trio.lowlevel.reschedule`, `trio.Event.set`, a memory
    channel's ``send_nowait``) and set timers; one it sets for the current time fires on the next turn.
    """

    def __init__(self) -> None:
        self._now = 0.0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timers_set = 0  # a tie-breaker: timers at the same time fire in the order they were set

    def __repr__(self) -> str:
        return f"<VirtualClock, time={self._now!r}, timers={len(self._timers)}>"

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Call `callback()` from the run loop once virtual time reaches `when` (see the class docstring).
        A timer cannot be cancelled: a callback that is no longer wanted does nothing when called."""
        if math.isnan(when):
            raise ValueError("a timer cannot be set for NaN")
        self._timers_set += 1
        heapq.heappush(self._timers, (when, self._timers_set, callback))

    async def sleep_until(self, when: float) -> None:
        """Sleep until virtual time reaches `when`, on a timer (no cancel scope). Cancellation works as
        for `trio.sleep_until`; a time that has come already is a checkpoint, as there."""
        if when <= self._now:
            await trio.lowlevel.checkpoint()
            return
        task = trio.lowlevel.current_task()
        waiting = True

        def wake() -> None:
            nonlocal waiting
            if waiting:
                waiting = False
                trio.lowlevel.reschedule(task)

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            nonlocal waiting
            waiting = False
            return trio.lowlevel.Abort.SUCCEEDED

        self.call_at(when, wake)
        await trio.lowlevel.wait_task_rescheduled(abort)

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        timers = self._timers
        if timers and timers[0][0] <= deadline:
            when = timers[0][0]
            if when > self._now:
                self._now = when
            due = []
            while timers and timers[0][0] <= when:
                due.append(heapq.heappop(timers)[2])
            for callback in due:  # a timer they set for now fires on the next turn
                callback()
            return 0.0
        if deadline == math.inf:
            return math.inf
        if deadline > self._now:
            self._now = deadline
        return 0.0


def run_simulation(
    async_fn: Callable[[Unpack[PosArgsT]], Awaitable[RetT]], seed: int, *args: *PosArgsT
) -> RetT:
    """``trio.run(async_fn, *args)`` on a `VirtualClock` (it jumps whenever every task is blocked), with
    the scheduling order fixed by `seed`. Returns what `async_fn` returns.

    Virtual time starts at 0.0. The same seed and the same code give the same interleaving of tasks.
    """
    with deterministic_scheduling(seed):
        return trio.run(async_fn, *args, clock=VirtualClock())
