"""Event dispatch on one member: subscriptions, handlers and per-workflow change notifications.

The state machine's apply hands every member the same events in log order (`graft_trio.state.events`);
the Manager adds `LeaderChanged` / `MemberJoined` / `MemberLeft` from its Raft member's status. `EventHub`
takes them synchronously, inside the apply loop, so it never blocks and never raises: each subscription has
a bounded queue, and a subscriber that falls behind loses events and gets one `EventsDropped` marker in
their place (the log is never held up by a slow reader).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import trio

from graft_trio.state.events import Event, StepsReady

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1000


@attrs.frozen(slots=True)
class EventsDropped:
    """The marker a subscriber gets in place of the `count` events (log indexes `first_index` to
    `last_index`) that arrived while its queue was full."""

    count: int
    first_index: int
    last_index: int


class Subscription:
    """A bounded queue of events of some types; iterate it with ``async for``. Ends when closed."""

    def __init__(self, event_types: tuple[type[Any], ...], capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.event_types = event_types
        self.capacity = capacity
        self._queue: collections.deque[Any] = collections.deque()
        self._dropped = 0
        self._first_dropped = 0
        self._last_dropped = 0
        self._wakeup = trio.Event()
        self.closed = False

    def wants(self, event: object) -> bool:
        if self.event_types:
            return isinstance(event, self.event_types)
        return not isinstance(event, StepsReady)  # engine-internal: only for those who ask for it by name

    def offer(self, event: Any) -> None:
        """Queue `event` without blocking; past `capacity` count it as dropped instead."""
        if self.closed:
            return
        if len(self._queue) >= self.capacity:
            if not self._dropped:
                self._first_dropped = getattr(event, "index", 0)
            self._dropped += 1
            self._last_dropped = getattr(event, "index", 0)
            return
        self._flush_marker()
        self._queue.append(event)
        self._wakeup.set()

    def _flush_marker(self) -> None:
        if self._dropped:
            self._queue.append(EventsDropped(self._dropped, self._first_dropped, self._last_dropped))
            self._dropped = 0
            self._wakeup.set()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        while True:
            if not self._queue:
                self._flush_marker()
            if self._queue:
                await trio.lowlevel.checkpoint()
                return self._queue.popleft()
            if self.closed:
                raise StopAsyncIteration
            self._wakeup = trio.Event()
            await self._wakeup.wait()


class EventHub:
    """Fans the member's events out to subscriptions and wakes whoever waits on a workflow."""

    def __init__(self) -> None:
        self._subscriptions: list[Subscription] = []
        self._workflow_changed: dict[str, trio.Event] = {}
        self._any_changed = trio.Event()

    def subscribe(self, event_types: Iterable[type[Any]] = (), capacity: int = DEFAULT_CAPACITY) -> Subscription:
        subscription = Subscription(tuple(event_types), capacity)
        self._subscriptions.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    def publish(self, events: Sequence[Event]) -> None:
        """Hand `events` (in log order) to every subscription that wants them; never blocks or raises."""
        for event in events:
            for subscription in self._subscriptions:
                if subscription.wants(event):
                    subscription.offer(event)
            workflow_id = getattr(event, "workflow_id", None)
            if workflow_id is not None:
                changed = self._workflow_changed.pop(workflow_id, None)
                if changed is not None:
                    changed.set()

    def workflow_changed(self, workflow_id: str) -> trio.Event:
        """An event set at the next apply that emits an event of `workflow_id` (or at `everything_changed`).
        Take it before reading the state, then wait on it: no change can slip in between."""
        changed = self._workflow_changed.get(workflow_id)
        if changed is None:
            changed = self._workflow_changed[workflow_id] = trio.Event()
        return changed

    def everything_changed(self) -> None:
        """The state was replaced wholesale (a snapshot was installed): wake every workflow waiter."""
        waiting, self._workflow_changed = self._workflow_changed, {}
        for changed in waiting.values():
            changed.set()

    def close(self) -> None:
        for subscription in self._subscriptions:
            subscription.close()
        self._subscriptions.clear()
        self.everything_changed()


Handler = Callable[[Any], Any]


async def run_handler(subscription: Subscription, handler: Handler, *, description: str) -> None:
    """Call `handler` with each event of `subscription`, one at a time, in order; awaits it if it returns an
    awaitable. A handler that raises is logged and keeps receiving events."""
    async for event in subscription:
        if isinstance(event, EventsDropped):
            logger.warning(
                "%s fell behind and missed %d events (%d..%d)",
                description,
                event.count,
                event.first_index,
                event.last_index,
            )
            continue
        try:
            result = handler(event)
            if hasattr(result, "__await__"):
                await result
        except Exception:
            logger.exception("%s raised on %r", description, event)
