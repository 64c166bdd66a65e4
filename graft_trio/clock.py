"""Time as the engine sees it.

Nothing in graft_trio reads the system clock or calls `trio.sleep` with a raw duration that matters for
behaviour: it asks the `Clock` it was given. A `Manager` defaults to `WallClock` (wall time that advances with
trio's clock), a bare `RaftNode` to `TrioClock` (trio's own clock: Raft only measures intervals); in the
simulator every member has a clock with its own skew and drift over the virtual clock.
"""

from __future__ import annotations

import abc
import time

import trio


class Clock(abc.ABC):
    """A member's view of time, in seconds."""

    @abc.abstractmethod
    def now(self) -> float:
        """The member's current time."""

    @abc.abstractmethod
    def trio_deadline(self, deadline: float) -> float:
        """The trio deadline (for `trio.move_on_at` / `trio.fail_at`) at which this clock reads `deadline`."""

    async def sleep_until(self, deadline: float) -> None:
        await trio.sleep_until(self.trio_deadline(deadline))

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.now() + seconds)

    def move_on_after(self, seconds: float) -> trio.CancelScope:
        return trio.move_on_at(self.trio_deadline(self.now() + seconds))


class TrioClock(Clock):
    """trio's clock, unchanged: the production clock (and, under `trio.testing.MockClock`, a test's)."""

    def now(self) -> float:
        return trio.current_time()

    def trio_deadline(self, deadline: float) -> float:
        return deadline


class WallClock(Clock):
    """Wall-clock time (seconds since the epoch) that runs at trio's pace: the Manager's default.

    The workflow state stamps leases, timers and retention with the leader's clock, so members must agree
    on what a time means across processes and restarts; trio's clock (monotonic, from an arbitrary origin)
    does not. This clock reads the system's wall clock once, at its first use inside `trio.run`, and from
    then on advances with trio's clock, so it never jumps when the system clock is stepped, and under
    `trio.testing.MockClock` it follows virtual time. Members' clocks are expected to agree to within a
    small fraction of the claim lease (NTP); the state machine never lets replicated time go backwards.
    """

    def __init__(self) -> None:
        self._offset: float | None = None

    def _origin(self) -> float:
        if self._offset is None:
            self._offset = time.time() - trio.current_time()
        return self._offset

    def now(self) -> float:
        return trio.current_time() + self._origin()

    def trio_deadline(self, deadline: float) -> float:
        return deadline - self._origin()
