"""The simulated network: a `MemoryNetwork` whose `deliver` adds seeded latency, loss, duplication,
reordering, partitions and clogged links, and delivers messages in virtual time.

This module owns the fault *mechanisms*. When a partition starts or heals is the simulator's schedule;
the ``random_*`` methods each take one random step of such a schedule with the RNG they are given.

A link is a (source address, target address) pair. Without reordering a link is FIFO: a message is never
delivered before one sent earlier on the same link (a duplicate counts as a message sent just after its
original). Partitions and clogs are checked when a message is sent: a message already in flight when a
partition starts still arrives. Whether the target is attached is checked when a message is delivered.

Replay: all randomness comes from the `random.Random` given to the network, in an order fixed by the
order of sends; no set is iterated and no trace detail contains an object id. With deterministic
scheduling (`sims.scheduler`) the same seed gives the same trace in any process.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
from collections.abc import Callable, Collection, Sequence
from typing import Literal

import attrs
import trio

from graft_trio.raft.messages import AppendEntries, AppendEntriesResponse, Message
from sims.clock import VirtualTime
from sims.scheduler import VirtualClock
from transports.memory import MemoryEndpoint, MemoryNetwork

Link = tuple[str, str]
EventCallback = Callable[[str, str], None]

_non_negative = attrs.validators.ge(0.0)
_probability = [attrs.validators.ge(0.0), attrs.validators.le(1.0)]


@attrs.frozen
class Latency:
    """The one-way delay of a link in virtual seconds: `base` plus a random tail.

    ``exponential``: the tail has mean `tail_scale`. ``lognormal``: the tail has median `tail_scale` and
    shape `tail_sigma` (a heavier tail: the occasional very slow message). ``none``: always `base`.
    """

    base: float = attrs.field(default=0.001, validator=_non_negative)
    tail: Literal["none", "exponential", "lognormal"] = attrs.field(
        default="exponential", validator=attrs.validators.in_(("none", "exponential", "lognormal"))
    )
    tail_scale: float = attrs.field(default=0.002, validator=_non_negative)
    tail_sigma: float = attrs.field(default=1.0, validator=_non_negative)

    def sample(self, rng: random.Random) -> float:
        if self.tail == "none" or self.tail_scale == 0.0:
            return self.base
        if self.tail == "exponential":
            return self.base + rng.expovariate(1.0 / self.tail_scale)
        return self.base + rng.lognormvariate(math.log(self.tail_scale), self.tail_sigma)


@attrs.frozen
class NetworkFaults:
    """The random faults applied to every message. A probability of 0 switches a fault off.

    `reorder` is the probability that a message takes an extra exponential delay of mean
    `reorder_delay` and leaves its link's FIFO order, so that later messages may overtake it.
    """

    latency: Latency = attrs.field(factory=Latency)
    loss: float = attrs.field(default=0.0, validator=_probability)
    duplication: float = attrs.field(default=0.0, validator=_probability)
    reorder: float = attrs.field(default=0.0, validator=_probability)
    reorder_delay: float = attrs.field(default=0.010, validator=_non_negative)

    @classmethod
    def none(cls) -> NetworkFaults:
        """A perfect network: no delay, no loss, no duplication, FIFO links."""
        return cls(latency=Latency(base=0.0, tail="none"))


@attrs.frozen
class NetworkStats:
    """Counts of copies of messages. ``sent + duplicated == delivered + dropped + in_flight + held``."""

    sent: int
    delivered: int
    duplicated: int
    reordered: int
    dropped: int  # all of the next three
    lost: int  # random loss
    blocked: int  # a partition, a one-way partition or a dropping clog
    undeliverable: int  # target detached or its inbox full at delivery time
    in_flight: int
    held: int  # waiting on clogged links


# A message on its way: (deliver_at, order, its name in the trace, target address, message). `order` is
# unique, so the heap never compares messages, and it breaks ties between equal delivery times in send
# order (FIFO).
_InFlight = tuple[float, int, str, str, Message]


@attrs.define
class _Clog:
    hold: bool
    held: list[tuple[str, Message]] = attrs.field(factory=list)  # (name in the trace, message)


def _summary(message: Message) -> str:
    """A short, exact description of a message for the trace (its type, term and log position)."""
    if isinstance(message, AppendEntries):
        return f"AppendEntries t={message.term} i={message.prev_log_index} n={len(message.entries)}"
    if isinstance(message, AppendEntriesResponse):
        return f"AppendEntriesResponse t={message.term} i={message.match_index} n=0"
    return f"{type(message).__name__} t={message.term} i=None n=0"


def _link_name(link: Link) -> str:
    return f"{link[0]}->{link[1]}"


class SimNetwork(MemoryNetwork):
    """A `MemoryNetwork` with faults. `run` must be running (``await nursery.start(network.run)``) for
    anything to be delivered.

    `rng` draws every random fault of message delivery; `faults` may be replaced at any time. `on_event`,
    if given, is called with a kind and a detail for every event, in a form fit for a byte-exact trace:
    send, drop, duplicate, hold, transmit, deliver, partition, one-way, clog, unclog, heal.
    """

    def __init__(
        self,
        virtual_time: VirtualTime,
        rng: random.Random,
        faults: NetworkFaults | None = None,
        *,
        on_event: EventCallback | None = None,
    ) -> None:
        super().__init__()
        self.virtual_time = virtual_time
        self.rng = rng
        self.faults = faults if faults is not None else NetworkFaults()
        self.on_event = on_event
        self.sent = 0
        self.delivered = 0
        self.duplicated = 0
        self.reordered = 0
        self.lost = 0
        self.blocked = 0
        self.undeliverable = 0
        self._message_ids = 0
        self._order = 0
        self._in_flight: list[_InFlight] = []
        self._fifo_watermark: dict[Link, float] = {}  # the latest delivery time of an in-order message
        self._link_latency: dict[Link, Latency] = {}
        self._group_of: dict[str, int] = {}
        self._one_way: set[Link] = set()  # only ever tested for membership: its order is hash-dependent
        self._clogs: dict[Link, _Clog] = {}
        self._running = False
        self._wake_at = math.inf  # the delivery time `run` wakes for next (inf: none)
        self._sleep_scope: trio.CancelScope | None = None  # on other clocks: what `run` sleeps in
        self._timer_clock: VirtualClock | None = None  # on the VirtualClock: whose timers deliver
        self._timer_generation = 0  # only the latest timer set is live
        self._timer_failed = trio.Event()
        self._timer_failure: BaseException | None = None

    # --- sending --------------------------------------------------------------------------------------

    def deliver(self, source: MemoryEndpoint, target_address: str, message: Message) -> None:
        link = (source.address, target_address)
        self._message_ids += 1
        self.sent += 1
        # The message's name in the trace, made once: "#<id> <source>-><target>".
        tag = f"#{self._message_ids} {source.address}->{target_address}"
        if self.on_event is not None:
            self.on_event("send", f"{tag} {_summary(message)}")
        reason = self._blocked_by(link) if self._group_of or self._one_way else None
        if reason is not None:
            self.blocked += 1
            self._drop(tag, reason)
            return
        faults = self.faults
        if faults.loss and self.rng.random() < faults.loss:
            self.lost += 1
            self._drop(tag, "lost")
            return
        copies = 1
        if faults.duplication and self.rng.random() < faults.duplication:
            copies = 2
            self.duplicated += 1
            self._emit("duplicate", tag)
        for _ in range(copies):
            clog = self._clogs.get(link) if self._clogs else None
            if clog is None:  # the usual case
                self._transmit(tag, link, message)
            elif clog.hold:
                clog.held.append((tag, message))
                self._emit("hold", tag)
            else:
                self.blocked += 1
                self._drop(tag, "clogged")

    def set_link_latency(self, source: str, target: str, latency: Latency | None) -> None:
        """Give one link its own latency; None returns it to `faults.latency`."""
        if latency is None:
            self._link_latency.pop((source, target), None)
        else:
            self._link_latency[(source, target)] = latency

    def _blocked_by(self, link: Link) -> str | None:
        source_group = self._group_of.get(link[0])
        target_group = self._group_of.get(link[1])
        if source_group is not None and target_group is not None and source_group != target_group:
            return "partitioned"
        if link in self._one_way:
            return "one-way"
        return None

    def _transmit(self, tag: str, link: Link, message: Message) -> None:
        faults, rng = self.faults, self.rng
        latency = self._link_latency.get(link, faults.latency) if self._link_latency else faults.latency
        deliver_at = self.virtual_time.now() + latency.sample(rng)
        reordered = bool(faults.reorder) and rng.random() < faults.reorder
        if reordered:
            self.reordered += 1
            if faults.reorder_delay > 0.0:
                deliver_at += rng.expovariate(1.0 / faults.reorder_delay)
        else:
            watermark = self._fifo_watermark.get(link)
            if watermark is not None and watermark > deliver_at:
                deliver_at = watermark
            self._fifo_watermark[link] = deliver_at
        self._order += 1
        heapq.heappush(self._in_flight, (deliver_at, self._order, tag, link[1], message))
        if self.on_event is not None:
            self.on_event("transmit", f"{tag} at={deliver_at!r} reordered" if reordered else f"{tag} at={deliver_at!r}")
        if deliver_at < self._wake_at:
            self._arm()

    def _drop(self, tag: str, reason: str) -> None:
        self.dropped += 1
        self._emit("drop", f"{tag} {reason}")

    def _emit(self, kind: str, detail: str) -> None:
        if self.on_event is not None:
            self.on_event(kind, detail)

    # --- delivering -----------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver each message at its time, until cancelled. Messages still in flight then stay in
        flight. At most one `run` per network.

        On the simulator's `VirtualClock` the deliveries are the clock's timers, run by trio's run loop
        itself, and this task only waits; on any other clock (trio's `MockClock` in unit tests) it
        sleeps until each delivery time. Both deliver the same messages at the same virtual times.
        """
        if self._running:
            raise RuntimeError("this SimNetwork is already running")
        self._running = True
        clock = trio.lowlevel.current_clock()
        try:
            if isinstance(clock, VirtualClock):
                await self._deliver_on_timers(clock, task_status)
            else:
                await self._deliver_in_this_task(task_status)
        finally:
            self._running = False
            self._sleep_scope = None
            self._timer_clock = None

    async def _deliver_on_timers(self, clock: VirtualClock, task_status: trio.TaskStatus[None]) -> None:
        self._timer_clock = clock
        failed = self._timer_failed = trio.Event()
        task_status.started()
        self._wake_at = math.inf
        self._arm()
        await failed.wait()
        assert self._timer_failure is not None
        raise self._timer_failure

    async def _deliver_in_this_task(self, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        while True:
            self._deliver_due()
            with trio.CancelScope() as scope:
                self._sleep_scope = scope
                self._wake_at = math.inf
                self._arm()
                await trio.sleep_forever()
            self._sleep_scope = None

    def _arm(self) -> None:
        """Make `run` wake for the earliest message in flight, if that is earlier than the time it
        already wakes at."""
        if not self._in_flight:
            return
        head = self._in_flight[0][0]
        if head >= self._wake_at:
            return
        if self._timer_clock is not None:
            self._wake_at = head
            self._timer_generation += 1
            self._timer_clock.call_at(head, functools.partial(self._on_timer, self._timer_generation))
        elif self._sleep_scope is not None:
            self._wake_at = head
            # A unique deadline: a tie with a member's timer would be broken by memory address.
            self._sleep_scope.deadline = self.virtual_time.unique_deadline(head)

    def _on_timer(self, generation: int) -> None:
        """A delivery timer fired (on the run loop: it must not raise). A timer set before a later
        `_arm` moved the wake-up earlier is stale and does nothing."""
        if generation != self._timer_generation or self._timer_clock is None:
            return
        try:
            self._deliver_due()
        except BaseException as exc:  # raised in `run`'s task instead of inside trio's run loop
            self._timer_clock = None
            self._timer_failure = exc
            self._timer_failed.set()
            return
        self._wake_at = math.inf
        self._arm()

    def _deliver_due(self) -> None:
        now = self.virtual_time.now()
        in_flight, endpoints = self._in_flight, self.endpoints
        while in_flight and in_flight[0][0] <= now:
            _, _, tag, target_address, message = heapq.heappop(in_flight)
            target = endpoints.get(target_address)
            if target is None or target.closed:
                self.undeliverable += 1
                self._drop(tag, "detached")
            elif target.put(message):
                self.delivered += 1
                if self.on_event is not None:
                    self.on_event("deliver", tag)
            else:
                self.undeliverable += 1
                self._emit("drop", f"{tag} closed")

    # --- fault mechanisms -----------------------------------------------------------------------------

    def partition(self, groups: Sequence[Collection[str]]) -> None:
        """Split addresses into groups that cannot reach each other, replacing any earlier split.
        Addresses in no group (a client, a member added later) still reach everyone."""
        group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for address in group:
                if address in group_of:
                    raise ValueError(f"address {address!r} is in more than one partition group")
                group_of[address] = index
        self._group_of = group_of
        self._emit("partition", " | ".join(",".join(sorted(group)) for group in groups))

    def partition_one_way(self, source: str, target: str) -> None:
        """Drop every message from `source` to `target`, but not the other way."""
        self._one_way.add((source, target))
        self._emit("one-way", _link_name((source, target)))

    def clog(self, source: str, target: str, *, hold: bool = True) -> None:
        """Stop the link from `source` to `target`. With `hold`, its messages wait and go out (with fresh
        latency, in order) when it is unclogged; without, they are dropped."""
        link = (source, target)
        clog = self._clogs.setdefault(link, _Clog(hold=hold))
        clog.hold = hold
        self._emit("clog", f"{_link_name(link)} {'hold' if hold else 'drop'}")

    def unclog(self, source: str, target: str) -> None:
        """Reopen a clogged link and send the messages it held; a link that is not clogged is left alone."""
        link = (source, target)
        clog = self._clogs.pop(link, None)
        if clog is None:
            return
        self._emit("unclog", f"{_link_name(link)} releasing {len(clog.held)}")
        for tag, message in clog.held:
            self._transmit(tag, link, message)

    def heal(self) -> None:
        """End every partition, one-way partition and clog (clogs in link order)."""
        self._group_of = {}
        self._one_way = set()
        self._emit("heal", "")
        for link in self.clogged_links():
            self.unclog(*link)

    def clogged_links(self) -> list[Link]:
        return sorted(self._clogs)

    def can_reach(self, source: str, target: str) -> bool:
        """Whether a message sent now from `source` to `target` would get past partitions and clogs."""
        link = (source, target)
        return self._blocked_by(link) is None and link not in self._clogs

    def stats(self) -> NetworkStats:
        return NetworkStats(
            sent=self.sent,
            delivered=self.delivered,
            duplicated=self.duplicated,
            reordered=self.reordered,
            dropped=self.dropped,
            lost=self.lost,
            blocked=self.blocked,
            undeliverable=self.undeliverable,
            in_flight=len(self._in_flight),
            held=sum(len(clog.held) for clog in self._clogs.values()),
        )

    # --- one random step of a fault schedule ----------------------------------------------------------

    def random_partition(self, rng: random.Random, addresses: Collection[str] | None = None) -> list[list[str]]:
        """Split `addresses` (default: every attached address) into two non-empty groups at random."""
        nodes = self._addresses(addresses)
        rng.shuffle(nodes)
        cut = rng.randint(1, len(nodes) - 1)
        groups = [sorted(nodes[:cut]), sorted(nodes[cut:])]
        self.partition(groups)
        return groups

    def random_one_way(self, rng: random.Random, addresses: Collection[str] | None = None) -> Link:
        source, target = rng.sample(self._addresses(addresses), 2)
        self.partition_one_way(source, target)
        return source, target

    def random_clog(
        self, rng: random.Random, addresses: Collection[str] | None = None, *, hold: bool = True
    ) -> Link:
        source, target = rng.sample(self._addresses(addresses), 2)
        self.clog(source, target, hold=hold)
        return source, target

    def unclog_one(self, rng: random.Random) -> Link | None:
        """Unclog one clogged link chosen at random (so that links come back one by one, in random
        order); None if none is clogged."""
        links = self.clogged_links()
        if not links:
            return None
        link = rng.choice(links)
        self.unclog(*link)
        return link

    def random_fault_step(self, rng: random.Random, addresses: Collection[str] | None = None) -> str:
        """Apply one random fault change (partition, one-way, clog, unclog one, heal); returns its kind."""
        kinds = ["partition", "one-way", "clog", "heal"]
        if self._clogs:
            kinds.append("unclog")
        kind = rng.choice(kinds)
        if kind == "partition":
            self.random_partition(rng, addresses)
        elif kind == "one-way":
            self.random_one_way(rng, addresses)
        elif kind == "clog":
            self.random_clog(rng, addresses)
        elif kind == "unclog":
            self.unclog_one(rng)
        else:
            self.heal()
        return kind

    def _addresses(self, addresses: Collection[str] | None) -> list[str]:
        # Sorted: the caller's collection may be a set, whose order changes with PYTHONHASHSEED.
        nodes = sorted(set(addresses if addresses is not None else self.endpoints))
        if len(nodes) < 2:
            raise ValueError(f"a network fault needs at least two addresses, not {nodes!r}")
        return nodes
