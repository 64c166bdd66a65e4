"""Simulated time: one virtual timeline per run, and a skewed, drifting clock for each member over it.

`VirtualTime` is the run's coordinator. It hands out every trio deadline the simulation registers
(`unique_deadline`), making sure no two are ever equal: trio breaks deadline ties by the memory address
of the cancel scope, which differs from process to process and would break replay. `SimClock` is a
member's `graft_trio.clock.Clock`: its time is ``offset + (1 + drift) * virtual_time``.

Both read trio's clock, so they are used inside a `trio.run` on a virtual clock: the simulator's
`sims.scheduler.VirtualClock` (see `sims.scheduler.run_simulation`), or `trio.testing.MockClock` in unit
tests. Build a fresh `VirtualTime` for every run. Their sleeps use the `VirtualClock`'s timers when it is
the running clock (no cancel scope per sleep), and `trio.sleep_until` on any other clock.
"""

from __future__ import annotations

import heapq
import math

import trio

from graft_trio.clock import Clock
from sims.scheduler import VirtualClock


class VirtualTime:
    """The virtual timeline of one simulation run, and the registry of the deadlines issued on it."""

    def __init__(self) -> None:
        self.clocks: dict[str, SimClock] = {}
        # Every deadline issued that is not yet in the past, as a set for lookups and a heap for forgetting
        # them in order once virtual time passes them.
        self._issued: set[float] = set()
        self._issued_order: list[float] = []
        # The run's clock, read directly: the simulator asks for the time about ten times per message.
        try:
            clock: trio.abc.Clock | None = trio.lowlevel.current_clock()
        except RuntimeError:  # built outside a run: ask trio each time
            clock = None
        self._current_time = clock.current_time if clock is not None else trio.current_time
        self._virtual_clock = clock if isinstance(clock, VirtualClock) else None

    def now(self) -> float:
        """Virtual time: trio's current time."""
        return self._current_time()

    def clock(self, name: str, *, offset: float = 0.0, drift: float = 0.0) -> SimClock:
        """A new member clock reading ``offset + (1 + drift) * virtual_time``; `name` must be unused."""
        if name in self.clocks:
            raise ValueError(f"a clock named {name!r} already exists")
        clock = SimClock(self, name, offset=offset, drift=drift)
        self.clocks[name] = clock
        return clock

    def unique_deadline(self, deadline: float) -> float:
        """The earliest trio deadline at or after `deadline` (and not before now) that no other call of
        this method has returned and that could still be registered with trio.

        Why two returned deadlines can never be equal: every value returned is at least the current time
        and is recorded. A recorded value is forgotten only once virtual time has passed it, and from then
        on every new value is at least the current time, so strictly greater. Among values not yet
        forgotten, a collision is resolved by stepping to the next representable float: the value stays at
        or after the request (so `SimClock.trio_deadline`'s guarantee survives) and moves as little as
        possible. Colliding requests therefore fire in the order they were made, which the deterministic
        scheduler fixes.

        A deadline in the past becomes "now": trio treats both alike (it cancels at the next checkpoint).
        `math.inf` (no deadline) is returned unchanged; it is never registered with trio.
        """
        if math.isnan(deadline):
            raise ValueError("a deadline cannot be NaN")
        if deadline == math.inf:
            return deadline
        now = self._current_time()
        issued, order = self._issued, self._issued_order
        while order and order[0] < now:
            issued.discard(heapq.heappop(order))
        candidate = deadline if deadline > now else now
        while candidate in issued:
            candidate = math.nextafter(candidate, math.inf)
        issued.add(candidate)
        heapq.heappush(order, candidate)
        return candidate

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until virtual time `deadline`: on the `VirtualClock`, on one of its timers (which need no
        unique deadline: they fire in a fixed order); on any other clock, until `unique_deadline(deadline)`."""
        if self._virtual_clock is not None:
            await self._virtual_clock.sleep_until(deadline)
        else:
            await trio.sleep_until(self.unique_deadline(deadline))


class SimClock(Clock):
    """One member's clock: ``offset + (1 + drift) * virtual_time``, built by `VirtualTime.clock`.

    `drift` is a rate error, fixed for the life of the clock (a realistic one is about ±0.001: a second
    of virtual time reads as 1.001 or 0.999). `offset` models skew, and `jump` changes it at run time to
    model a clock that is stepped. Member time never goes backwards unless `jump` is told it may.
    """

    def __init__(self, virtual_time: VirtualTime, name: str, *, offset: float = 0.0, drift: float = 0.0):
        if not math.isfinite(offset):
            raise ValueError(f"clock offset must be finite, not {offset!r}")
        if not (math.isfinite(drift) and drift > -1.0):
            raise ValueError(f"clock drift must be finite and above -1, not {drift!r}")
        self.virtual_time = virtual_time
        self.name = name
        self._offset = float(offset)
        self._drift = float(drift)
        self._rate = 1.0 + self._drift

    def __repr__(self) -> str:
        return f"SimClock({self.name!r}, offset={self._offset!r}, drift={self._drift!r})"

    @property
    def offset(self) -> float:
        return self._offset

    @property
    def drift(self) -> float:
        return self._drift

    def local_at(self, virtual: float) -> float:
        """What this clock reads at virtual time `virtual` (with the current offset)."""
        return self._offset + self._rate * virtual

    def now(self) -> float:
        return self._offset + self._rate * self.virtual_time.now()

    def virtual_deadline(self, deadline: float) -> float:
        """The earliest virtual time at which this clock reads at least `deadline`, as rounding allows.

        Rounding in the inverse of `local_at` could land a hair early, and a member that wakes from
        ``sleep_until(t)`` and reads a time before ``t`` would be a bug the simulator planted, so the
        result is walked forward until ``local_at(result) >= deadline``. A later backwards `jump` voids
        that guarantee for deadlines already issued; a forward jump makes them fire late by member time.
        """
        if math.isnan(deadline):
            raise ValueError("a deadline cannot be NaN")
        if deadline == math.inf:
            return deadline
        virtual = (deadline - self._offset) / self._rate
        # local_at is monotonic in its argument (each float operation rounds monotonically), so stepping
        # forward terminates; doubling the step keeps it to a few iterations even when the offset dwarfs
        # the virtual time.
        step = max(math.ulp(virtual), math.ulp(deadline))
        while self.local_at(virtual) < deadline:
            virtual += step
            step *= 2
        return virtual

    def trio_deadline(self, deadline: float) -> float:
        """A unique trio deadline at or after `virtual_deadline(deadline)` (`VirtualTime.unique_deadline`)."""
        return self.virtual_time.unique_deadline(self.virtual_deadline(deadline))

    async def sleep_until(self, deadline: float) -> None:
        await self.virtual_time.sleep_until(self.virtual_deadline(deadline))

    def jump(self, seconds: float, *, allow_backwards: bool = False) -> None:
        """Step this clock by `seconds` (a skew fault). Deadlines already registered with trio keep their
        virtual time. A negative step is refused unless `allow_backwards`: code may rightly assume a
        member's clock is monotonic, and a fault that breaks that has to be asked for.
        """
        if not math.isfinite(seconds):
            raise ValueError(f"a clock jump must be finite, not {seconds!r}")
        if seconds < 0 and not allow_backwards:
            raise ValueError(
                f"jumping clock {self.name!r} back by {-seconds!r}s would make its time go backwards;"
                " pass allow_backwards=True to model that fault"
            )
        self._offset += seconds
