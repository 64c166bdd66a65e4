"""The Manager and the workflow engine end to end: real RaftNodes on a private memory network, autojump clock."""

from __future__ import annotations

import contextlib
import itertools
import random
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

import graft_trio as graft
from graft_trio.manager import Manager
from graft_trio.raft import MemoryStorage, ProposalTooLarge
from graft_trio.raft.messages import Message
from tests.raft_cluster import OffsetClock
from transports.memory import MemoryEndpoint, MemoryNetwork, MemoryTransport

_ports = itertools.count()


@attrs.frozen
class GreeterConfig:
    message: str


@attrs.define
class GreeterState:
    name: str
    greeting: str | None = None


class Greeter(graft.Node[GreeterState, GreeterConfig]):
    name = "greeter"
    retry = graft.RetryPolicy(max_attempts=3, initial_interval=1.0, backoff=2.0, max_interval=300.0)
    timeout = 300.0

    async def execute(self, ctx: graft.NodeContext, state: GreeterState, config: GreeterConfig) -> graft.NodeResult:
        return graft.NodeResult(data={"greeting": f"{config.message}, {state.name}!"})


def make_manager(
    network: MemoryNetwork, node_id: str, peers: dict[str, str] | None = None, life: int = 1, **kwargs: Any
) -> Manager:
    """A member on `network`, seeded from its id and `life` (a restarted member needs a new seed, or it
    would reuse its request ids and read contexts)."""
    return Manager(
        node_id,
        f"mem-{node_id}",
        None,
        transport=MemoryTransport(network),
        peers=peers,
        rng=random.Random(zlib.crc32(f"{node_id}/{life}".encode())),
        **kwargs,
    )


@contextlib.asynccontextmanager
async def one_member(*nodes: graft.Node[Any, Any], **kwargs: Any) -> AsyncIterator[Manager]:
    mgr = make_manager(MemoryNetwork(), "solo", **kwargs)
    for node in nodes:
        mgr.register_node(node)
    async with mgr:
        yield mgr


def trigger(workflow_id: str, node: str, config: Any = None, state: Any = None) -> graft.WorkflowTrigger:
    return graft.WorkflowTrigger(
        workflow_id=workflow_id,
        initial_state=state if state is not None else {},
        initial_nodes=[graft.NodeConfig(name=node, config=config)],
    )


# --- one member ------------------------------------------------------------------------------------------


async def test_greeter_runs_end_to_end_on_one_member(autojump_clock: trio.testing.MockClock) -> None:
    async with one_member(Greeter()) as mgr:
        await mgr.start_workflow(
            graft.WorkflowTrigger(
                workflow_id="wf-001",
                initial_state=GreeterState(name="Ada"),
                initial_nodes=[graft.NodeConfig(name="greeter", config=GreeterConfig(message="Hello"))],
            )
        )
        status = await mgr.wait_for_workflow("wf-001", timeout=10)
        assert status.status is graft.WorkflowStatus.COMPLETED
        assert status.current_state == {"name": "Ada", "greeting": "Hello, Ada!"}
        assert [s.node_name for s in status.executed_steps] == ["greeter"]
        assert status.executed_steps[0].member_id == "solo"
        assert status.executed_steps[0].status is graft.StepStatus.COMPLETED
        assert (await mgr.get_workflow("wf-001")) == status
        listed = await mgr.list_workflows(status=graft.WorkflowStatus.COMPLETED)
        assert [w.workflow_id for w in listed] == ["wf-001"]
        assert await mgr.list_workflows(status=graft.WorkflowStatus.RUNNING) == []


async def test_starting_an_existing_workflow_raises(autojump_clock: trio.testing.MockClock) -> None:
    async with one_member(Greeter()) as mgr:
        await mgr.start_workflow(trigger("wf", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))
        with pytest.raises(graft.WorkflowExistsError):
            await mgr.start_workflow(trigger("wf", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))
        with pytest.raises(graft.WorkflowNotFoundError):
            await mgr.get_workflow("nope")
        with pytest.raises(graft.WorkflowNotFoundError):
            await mgr.pause_workflow("nope")


async def test_a_payload_that_does_not_fit_fails_the_workflow_naming_the_field(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with one_member(Greeter()) as mgr:
        await mgr.start_workflow(trigger("wf", "greeter", {"message": 42}, {"name": "Ada"}))
        status = await mgr.wait_for_workflow("wf", timeout=10)
        assert status.status is graft.WorkflowStatus.FAILED
        assert status.last_error is not None
        assert "$.message" in status.last_error and "expected a string" in status.last_error
        # Not retried: one attempt, and the step is kept as a dead letter.
        assert len(status.executed_steps) == 1
        assert [d.node_name for d in status.dead_letters] == ["greeter"]


class Hoarder(graft.Node[dict[str, Any], dict[str, Any]]):
    """Returns a state patch of `size` bytes."""

    name = "hoarder"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        return graft.NodeResult(data={"blob": "x" * config["size"]})


async def test_a_step_outcome_too_large_for_the_log_fails_the_workflow_and_harms_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with one_member(Hoarder(), Greeter()) as mgr:
        with pytest.raises(ProposalTooLarge):  # a trigger too large is refused at once
            await mgr.start_workflow(trigger("huge", "greeter", GreeterConfig("Hi"), {"name": "x" * 2**21}))
        await mgr.start_workflow(trigger("big", "hoarder", {"size": 2 * 1024 * 1024}))
        await mgr.start_workflow(trigger("small", "hoarder", {"size": 1000}))
        big = await mgr.wait_for_workflow("big", timeout=30)
        assert big.status is graft.WorkflowStatus.FAILED
        assert big.last_error is not None and "does not fit in a log entry" in big.last_error
        assert [d.node_name for d in big.dead_letters] == ["hoarder"]  # not retried
        small = await mgr.wait_for_workflow("small", timeout=30)
        assert small.status is graft.WorkflowStatus.COMPLETED and small.current_state == {"blob": "x" * 1000}
        assert mgr.health().serving


async def test_a_node_registered_after_start_runs_the_steps_already_queued(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with one_member() as mgr:
        await mgr.start_workflow(trigger("wf", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))
        await trio.sleep(5)
        assert (await mgr.get_workflow("wf")).pending_steps[0].status is graft.StepStatus.QUEUED
        mgr.register_node(Greeter())
        status = await mgr.wait_for_workflow("wf", timeout=10)
    assert status.current_state == {"name": "Bo", "greeting": "Hi, Bo!"}


async def test_terminal_workflows_are_removed_after_the_retention(autojump_clock: trio.testing.MockClock) -> None:
    async with one_member(Greeter(), retention=60.0) as mgr:
        await mgr.start_workflow(trigger("wf", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))
        done = await mgr.wait_for_workflow("wf", timeout=10)
        assert done.completed_at is not None
        await trio.sleep(59)
        assert (await mgr.get_workflow("wf")).status is graft.WorkflowStatus.COMPLETED
        await trio.sleep(2)  # the leader proposes a Tick at the deadline: nothing else is proposed
        with pytest.raises(graft.WorkflowNotFoundError):
            await mgr.get_workflow("wf")
        await mgr.start_workflow(trigger("wf", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))  # free again


async def test_an_error_in_the_body_of_async_with_comes_out_as_raised(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(graft.WorkflowExistsError):
        async with one_member(Greeter()) as mgr:
            await mgr.start_workflow(trigger("wf", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))
            await mgr.start_workflow(trigger("wf", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))
    assert not mgr.health().serving


# --- failures, retries, timeouts ------------------------------------------------------------------------


class Flaky(graft.Node[dict[str, Any], dict[str, Any]]):
    """Raises until it has been called `failures` times, then records the attempt that succeeded."""

    name = "flaky"
    retry = graft.RetryPolicy(max_attempts=5, initial_interval=1.0, backoff=2.0, max_interval=60.0, jitter=0.0)

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[tuple[int, float]] = []

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.calls.append((ctx.attempt, trio.current_time()))
        if len(self.calls) <= self.failures:
            raise RuntimeError(f"boom {len(self.calls)}")
        return graft.NodeResult(data={"succeeded_on": ctx.attempt})


async def test_failed_attempts_are_retried_with_backoff_then_succeed(autojump_clock: trio.testing.MockClock) -> None:
    flaky = Flaky(failures=2)
    async with one_member(flaky) as mgr:
        await mgr.start_workflow(trigger("wf", "flaky"))
        status = await mgr.wait_for_workflow("wf", timeout=60)
    assert status.status is graft.WorkflowStatus.COMPLETED
    assert status.current_state == {"succeeded_on": 3}
    assert [attempt for attempt, _ in flaky.calls] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(flaky.calls)]
    # Backoff 1 s then 2 s (no jitter), plus the little time a commit and a claim take.
    assert 1.0 <= gaps[0] < 1.5 and 2.0 <= gaps[1] < 2.5, gaps
    assert [s.status for s in status.executed_steps] == [graft.StepStatus.FAILED] * 2 + [graft.StepStatus.COMPLETED]
    assert status.executed_steps[0].error == "RuntimeError: boom 1"


class Strict(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "strict"

    def __init__(self) -> None:
        self.fail = True
        self.calls = 0

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.calls += 1
        if self.fail:
            raise graft.NonRetryableError("the input is wrong")
        return graft.NodeResult(data={"ok": True})


async def test_non_retryable_error_fails_the_workflow_and_retry_workflow_completes_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = Strict()
    async with one_member(node) as mgr:
        await mgr.start_workflow(trigger("wf", "strict"))
        failed = await mgr.wait_for_workflow("wf", timeout=60)
        assert failed.status is graft.WorkflowStatus.FAILED
        assert failed.last_error == "NonRetryableError: the input is wrong"
        assert node.calls == 1  # not retried, whatever the retry policy says
        assert [d.node_name for d in failed.dead_letters] == ["strict"]
        with pytest.raises(graft.InvalidTransitionError):
            await mgr.resume_workflow("wf")
        node.fail = False
        assert await mgr.retry_workflow("wf") is graft.WorkflowStatus.RUNNING
        done = await mgr.wait_for_workflow("wf", timeout=60)
    assert done.status is graft.WorkflowStatus.COMPLETED
    assert done.current_state == {"ok": True}
    assert done.dead_letters == () and node.calls == 2


class Sleepy(graft.Node[dict[str, Any], dict[str, Any]]):
    """Hangs on its first attempt (past its timeout), answers on the next."""

    name = "sleepy"
    timeout = 5.0
    retry = graft.RetryPolicy(max_attempts=3, initial_interval=1.0, jitter=0.0)

    def __init__(self) -> None:
        self.cancelled: list[int] = []

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        if ctx.attempt == 1:
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled.append(ctx.attempt)
        return graft.NodeResult(data={"attempt": ctx.attempt})


async def test_an_attempt_past_its_timeout_is_cancelled_and_retried(autojump_clock: trio.testing.MockClock) -> None:
    node = Sleepy()
    async with one_member(node) as mgr:
        start = trio.current_time()
        await mgr.start_workflow(trigger("wf", "sleepy"))
        status = await mgr.wait_for_workflow("wf", timeout=60)
    assert node.cancelled == [1]
    assert status.status is graft.WorkflowStatus.COMPLETED and status.current_state == {"attempt": 2}
    first = status.executed_steps[0]
    assert first.status is graft.StepStatus.FAILED and first.error is not None and "timed out" in first.error
    assert 6.0 <= trio.current_time() - start < 7.0  # 5 s timeout + 1 s backoff


# --- fan-out and fan-in, can_start ----------------------------------------------------------------------


class Split(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "split"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        branches = [graft.NextNode("branch", config={"n": n}) for n in range(4)]
        return graft.NodeResult(next_nodes=branches, join=graft.NextNode("join"))


class Branch(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "branch"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        await trio.sleep(1 + config["n"])  # they finish at different times
        return graft.NodeResult(data={"branches": {str(config["n"]): ctx.member_id}})


class Join(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "join"

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.seen.append(state)
        return graft.NodeResult(data={"joined": len(state["branches"])})


async def test_fan_out_runs_branches_in_parallel_and_the_join_once_after_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    join = Join()
    async with one_member(Split(), Branch(), join) as mgr:
        start = trio.current_time()
        await mgr.start_workflow(trigger("wf", "split"))
        status = await mgr.wait_for_workflow("wf", timeout=60)
    assert status.status is graft.WorkflowStatus.COMPLETED
    assert len(join.seen) == 1 and sorted(join.seen[0]["branches"]) == ["0", "1", "2", "3"]
    assert status.current_state["joined"] == 4
    assert trio.current_time() - start < 5  # in parallel: the longest branch takes 4 s


class Gate(graft.Node[dict[str, Any], dict[str, Any]]):
    """Runs only once the state says `open`."""

    name = "gate"

    def __init__(self) -> None:
        self.asked: list[bool] = []

    async def can_start(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> bool:
        self.asked.append(bool(state.get("open")))
        return bool(state.get("open"))

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        return graft.NodeResult(data={"passed_at": trio.current_time()})


class Opener(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "opener"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        await trio.sleep(10)
        return graft.NodeResult(data={"open": True, "opened_at": trio.current_time()})


async def test_can_start_parks_the_step_until_the_state_changes(autojump_clock: trio.testing.MockClock) -> None:
    gate = Gate()
    async with one_member(gate, Opener()) as mgr:
        await mgr.start_workflow(
            graft.WorkflowTrigger(
                workflow_id="wf",
                initial_state={},
                initial_nodes=[graft.NodeConfig(name="gate"), graft.NodeConfig(name="opener")],
            )
        )
        await trio.sleep(5)
        parked = await mgr.get_workflow("wf")
        assert [(s.node_name, s.status) for s in parked.pending_steps] == [("gate", graft.StepStatus.PARKED)]
        status = await mgr.wait_for_workflow("wf", timeout=60)
    assert status.status is graft.WorkflowStatus.COMPLETED
    assert status.current_state["passed_at"] >= status.current_state["opened_at"]
    assert gate.asked == [False, True]  # asked again only once the state changed: no busy loop


# --- lifecycle ------------------------------------------------------------------------------------------


class Step(graft.Node[dict[str, Any], dict[str, Any]]):
    """Waits for `release` (if set) and then asks for the next node named in its config."""

    name = "step"

    def __init__(self) -> None:
        self.release: trio.Event | None = None
        self.first_started = trio.Event()
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.started.append(config["label"])
        self.first_started.set()
        try:
            if self.release is not None:
                await self.release.wait()
        except trio.Cancelled:
            self.cancelled.append(config["label"])
            raise
        following = [graft.NextNode("step", config={"label": nxt}) for nxt in config.get("next", [])]
        return graft.NodeResult(data={config["label"]: True}, next_nodes=following)


async def test_pause_keeps_queued_steps_and_resume_continues(autojump_clock: trio.testing.MockClock) -> None:
    node = Step()
    node.release = trio.Event()
    async with one_member(node) as mgr:
        await mgr.start_workflow(trigger("wf", "step", {"label": "a", "next": ["b"]}))
        await node.first_started.wait()
        assert await mgr.pause_workflow("wf") is graft.WorkflowStatus.PAUSED
        node.release.set()  # the running step finishes and commits; its next node stays queued
        await trio.sleep(30)
        paused = await mgr.get_workflow("wf")
        assert paused.status is graft.WorkflowStatus.PAUSED
        assert paused.current_state == {"a": True}
        assert [(s.node_name, s.status) for s in paused.pending_steps] == [("step", graft.StepStatus.QUEUED)]
        assert node.started == ["a"]
        assert await mgr.resume_workflow("wf") is graft.WorkflowStatus.RUNNING
        done = await mgr.wait_for_workflow("wf", timeout=60)
    assert done.status is graft.WorkflowStatus.COMPLETED and done.current_state == {"a": True, "b": True}


async def test_cancel_cancels_the_running_attempt_and_drops_queued_steps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    node = Step()
    node.release = trio.Event()  # never set: the attempt runs until cancelled
    async with one_member(node) as mgr:
        await mgr.start_workflow(
            graft.WorkflowTrigger(
                workflow_id="wf",
                initial_state={},
                initial_nodes=[
                    graft.NodeConfig(name="step", config={"label": "a"}),
                    graft.NodeConfig(name="other", config={}),  # nobody runs it: stays queued
                ],
            )
        )
        await node.first_started.wait()
        assert await mgr.cancel_workflow("wf", reason="changed my mind") is graft.WorkflowStatus.CANCELLED
        status = await mgr.wait_for_workflow("wf", timeout=5)
        await trio.sleep(1)
        assert node.cancelled == ["a"]
        assert mgr.engine.stats().running == 0
        with pytest.raises(graft.InvalidTransitionError):
            await mgr.resume_workflow("wf")
    assert status.status is graft.WorkflowStatus.CANCELLED
    assert status.pending_steps == () and status.executing_steps == ()


# --- capacity -----------------------------------------------------------------------------------------


class Busy(graft.Node[dict[str, Any], dict[str, Any]]):
    """Counts how many of its attempts run at once."""

    def __init__(self, name: str, concurrency: int | None = None) -> None:
        self.name = name
        self.concurrency = concurrency
        self.now = 0
        self.peak = 0
        self.runs = 0

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.now += 1
        self.runs += 1
        self.peak = max(self.peak, self.now)
        try:
            await trio.sleep(1)
        finally:
            self.now -= 1
        return graft.NodeResult(data={self.name: True})


async def test_max_concurrent_steps_and_node_concurrency_caps_hold(autojump_clock: trio.testing.MockClock) -> None:
    wide, narrow = Busy("wide"), Busy("narrow", concurrency=2)
    both = [wide, narrow]
    async with one_member(wide, narrow, max_concurrent_steps=5, claim_batch=16) as mgr:
        for i in range(12):
            await mgr.start_workflow(trigger(f"w{i}", "wide"))
            await mgr.start_workflow(trigger(f"n{i}", "narrow"))
        for i in range(12):
            assert (await mgr.wait_for_workflow(f"w{i}", timeout=60)).status is graft.WorkflowStatus.COMPLETED
            assert (await mgr.wait_for_workflow(f"n{i}", timeout=60)).status is graft.WorkflowStatus.COMPLETED
    assert narrow.peak == 2
    assert wide.peak + narrow.peak >= 5 and wide.peak <= 5
    assert [n.runs for n in both] == [12, 12]


class Total:
    def __init__(self) -> None:
        self.now = 0
        self.peak = 0


async def test_the_member_never_runs_more_than_max_concurrent_steps(autojump_clock: trio.testing.MockClock) -> None:
    total = Total()

    class Counted(Busy):
        async def execute(
            self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]
        ) -> graft.NodeResult:
            total.now += 1
            total.peak = max(total.peak, total.now)
            try:
                return await super().execute(ctx, state, config)
            finally:
                total.now -= 1

    nodes = [Counted("a"), Counted("b"), Counted("c", concurrency=1)]
    async with one_member(*nodes, max_concurrent_steps=4) as mgr:
        for i in range(8):
            for node in nodes:
                await mgr.start_workflow(trigger(f"{node.name}{i}", node.name))
        for i in range(8):
            for node in nodes:
                await mgr.wait_for_workflow(f"{node.name}{i}", timeout=120)
    assert total.peak == 4
    assert nodes[2].peak == 1


# --- clusters -------------------------------------------------------------------------------------------


@attrs.define
class Member:
    manager: Manager
    scope: trio.CancelScope


@contextlib.asynccontextmanager
async def open_cluster(
    ids: list[str], setup: Callable[[Manager], object], network: MemoryNetwork | None = None, **kwargs: Any
) -> AsyncIterator[dict[str, Member]]:
    """Members on one private memory network, each in a cancel scope of its own (cancel it to kill it)."""
    network = network if network is not None else MemoryNetwork()
    addresses = {member_id: f"mem-{member_id}" for member_id in ids}
    members: dict[str, Member] = {}
    async with trio.open_nursery() as nursery:
        for member_id in ids:
            peers = {other: address for other, address in addresses.items() if other != member_id}
            mgr = make_manager(network, member_id, peers, **kwargs)
            setup(mgr)
            member = members[member_id] = Member(mgr, trio.CancelScope())

            async def run_member(member: Member = member, *, task_status: trio.TaskStatus[None]) -> None:
                with member.scope:
                    await member.manager.run(task_status=task_status)

            await nursery.start(run_member)
        yield members
        nursery.cancel_scope.cancel()


class Counter(graft.Node[dict[str, Any], dict[str, Any]]):
    """A chain of `steps` steps: each reads `count`, takes a while, writes `count + 1` and asks for the next.

    Every execution is recorded (user code runs at least once); the final `count` shows each step's effect
    was applied exactly once, in order."""

    name = "counter"
    retry = graft.RetryPolicy(max_attempts=3, initial_interval=0.5, jitter=0.0)

    def __init__(self, member_id: str, executions: list[tuple[str, str, int]], steps: int) -> None:
        self.member_id = member_id
        self.executions = executions
        self.steps = steps

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        assert ctx.member_id == self.member_id
        count = state.get("count", 0)
        self.executions.append((ctx.workflow_id, ctx.member_id, count))
        await trio.sleep(2)
        following = [graft.NextNode("counter")] if count + 1 < self.steps else []
        return graft.NodeResult(data={"count": count + 1}, next_nodes=following)


@pytest.mark.parametrize("victim_role", ["follower", "leader"])
async def test_three_members_spread_work_and_survive_the_loss_of_one_running_steps(
    autojump_clock: trio.testing.MockClock, victim_role: str
) -> None:
    executions: list[tuple[str, str, int]] = []
    steps, workflows = 3, 9

    def setup(mgr: Manager) -> None:
        mgr.register_node(Counter(mgr.node_id, executions, steps))

    ids = ["m1", "m2", "m3"]
    async with open_cluster(ids, setup, claim_lease=3.0, max_concurrent_steps=4, claim_batch=2) as members:
        leader = await members["m1"].manager.raft.wait_for_leader()
        victim = leader if victim_role == "leader" else next(i for i in ids if i != leader)
        observer = members[next(i for i in ids if i != victim)].manager
        async with observer.subscribe(graft.NodeStarted) as started:
            for i in range(workflows):
                await members[ids[i % 3]].manager.start_workflow(trigger(f"wf{i}", "counter"))
            # Kill the victim while it runs steps (its claims are applied: the observer saw them).
            async for event in started:
                if event.member_id == victim:
                    break
        killed_at = trio.current_time()
        members[victim].scope.cancel()
        for i in range(workflows):
            status = await observer.wait_for_workflow(f"wf{i}", timeout=120)
            assert status.status is graft.WorkflowStatus.COMPLETED, status
            assert status.current_state == {"count": steps}
            completed = [s for s in status.executed_steps if s.status is graft.StepStatus.COMPLETED]
            assert [s.attempt for s in completed] and len(completed) == steps  # each step's effect applied once
        info = observer.cluster_info()
    assert {member for _, member, _ in executions} == set(ids)  # the work spread over every member
    taken_over = [(wf, n) for wf, member, n in executions if member != victim and (wf, victim, n) in executions]
    assert taken_over, "no step the killed member was running was run again elsewhere"
    assert info.leader_id is not None and info.leader_id != victim
    assert trio.current_time() - killed_at < 30


class CuttableNetwork(MemoryNetwork):
    """A memory network that can cut members off (their messages, both ways, are lost)."""

    def __init__(self) -> None:
        super().__init__()
        self.cut: set[str] = set()

    def deliver(self, source: MemoryEndpoint, target_address: str, message: Message) -> None:
        target = self.endpoints.get(target_address)
        if source.node_id in self.cut or (target is not None and target.node_id in self.cut):
            self.dropped += 1
            return
        super().deliver(source, target_address, message)


class Stuck(graft.Node[dict[str, Any], dict[str, Any]]):
    """The first attempt hangs; later ones answer at once."""

    name = "stuck"

    def __init__(self, member_id: str, log: list[tuple[str, str, int]]) -> None:
        self.member_id = member_id
        self.log = log

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.log.append(("started", self.member_id, ctx.attempt))
        if ctx.attempt == 1:
            try:
                await trio.sleep(1000)
            except trio.Cancelled:
                self.log.append(("cancelled", self.member_id, ctx.attempt))
                raise
        return graft.NodeResult(data={"by": self.member_id, "attempt": ctx.attempt})


async def test_a_member_cut_off_loses_its_claim_and_cancels_the_attempt_when_it_learns_so(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[tuple[str, str, int]] = []
    network = CuttableNetwork()
    ids = ["a", "b", "c"]

    def setup(mgr: Manager) -> None:
        mgr.register_node(Stuck(mgr.node_id, log))

    async with open_cluster(ids, setup, network=network, claim_lease=3.0) as members:
        async with members["a"].manager.subscribe(graft.NodeStarted) as started:
            await members["a"].manager.start_workflow(trigger("wf", "stuck"))
            first = await started.__anext__()
        holder = first.member_id  # leader or follower: either way the others take the step over
        observer = members[next(i for i in ids if i != holder)].manager
        network.cut.add(holder)
        done = await observer.wait_for_workflow("wf", timeout=60)
        assert done.status is graft.WorkflowStatus.COMPLETED and done.current_state["attempt"] == 2
        assert done.current_state["by"] != holder
        assert ("cancelled", holder, 1) not in log  # it cannot know yet
        network.cut.clear()
        await trio.sleep(10)
        assert ("cancelled", holder, 1) in log  # it learned from the log (or its renewal) and stopped
        assert members[holder].manager.engine.stats().dropped == 1
        assert (await members[holder].manager.get_workflow("wf")) == done


class HangsOn(graft.Node[dict[str, Any], dict[str, Any]]):
    """Hangs when run on member `hang_on`, answers at once elsewhere."""

    name = "hangs"

    def __init__(self, member_id: str, hang_on: str, log: list[tuple[str, str, int]]) -> None:
        self.member_id = member_id
        self.hang_on = hang_on
        self.log = log

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.log.append(("started", self.member_id, ctx.attempt))
        if self.member_id == self.hang_on:
            try:
                await trio.sleep(1000)
            except trio.Cancelled:
                self.log.append(("cancelled", self.member_id, ctx.attempt))
                raise
        return graft.NodeResult(data={"by": self.member_id, "attempt": ctx.attempt})


async def test_leaving_async_with_hands_the_claims_back_at_once(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    ids = ["a", "b", "c"]
    log: list[tuple[str, str, int]] = []
    managers = {i: make_manager(network, i, {j: f"mem-{j}" for j in ids if j != i}, claim_lease=10.0) for i in ids}
    async with trio.open_nursery() as nursery:
        for i in ("a", "b"):
            await nursery.start(managers[i].run)
        async with managers["c"] as leaving:
            leaving.register_node(HangsOn("c", "c", log))  # only c runs the node at first
            async with leaving.subscribe(graft.NodeStarted) as started:
                await leaving.start_workflow(trigger("wf", "hangs"))
                await started.__anext__()
            for i in ("a", "b"):
                managers[i].register_node(HangsOn(i, "c", log))
            left_at = trio.current_time()
        done = await managers["a"].wait_for_workflow("wf", timeout=60)
        assert trio.current_time() - left_at < 2  # not after the 10 s lease: the claim was handed back
        nursery.cancel_scope.cancel()
    assert ("cancelled", "c", 1) in log
    assert done.status is graft.WorkflowStatus.COMPLETED and done.current_state["by"] in ("a", "b")
    assert done.current_state["attempt"] == 1  # a drain does not spend an attempt


async def test_a_restarted_member_hands_back_the_claims_of_its_previous_life(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    ids = ["a", "b", "c"]
    log: list[tuple[str, str, int]] = []
    storage = MemoryStorage()  # b's disk, kept across its crash

    def build(member_id: str, life: int = 1) -> Manager:
        peers = {other: f"mem-{other}" for other in ids if other != member_id}
        kwargs: dict[str, Any] = {"storage": storage} if member_id == "b" else {}
        return make_manager(network, member_id, peers, life, claim_lease=10.0, **kwargs)

    async with trio.open_nursery() as nursery:
        a = build("a")
        await nursery.start(a.run)
        await nursery.start(build("c").run)
        first_life = build("b")
        first_life.register_node(HangsOn("b", "b", log))  # only b runs the node; its first life hangs
        scope = trio.CancelScope()

        async def run_first_life(*, task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await first_life.run(task_status=task_status)

        await nursery.start(run_first_life)
        async with a.subscribe(graft.NodeStarted) as started:
            await a.start_workflow(trigger("wf", "hangs"))
            await started.__anext__()
        scope.cancel()  # b crashes while it runs the step
        await trio.sleep(0.5)
        crashed_at = trio.current_time()
        second_life = build("b", life=2)
        second_life.register_node(HangsOn("b", "nobody", log))
        await nursery.start(second_life.run)
        done = await a.wait_for_workflow("wf", timeout=60)
        assert trio.current_time() - crashed_at < 3  # well before the 10 s lease would have run out
        nursery.cancel_scope.cancel()
    assert done.status is graft.WorkflowStatus.COMPLETED and done.current_state["by"] == "b"
    lost = done.executed_steps[0]
    assert lost.status is graft.StepStatus.FAILED and lost.error is not None and "restarted" in lost.error


async def test_every_member_sees_every_event_once_in_log_order(autojump_clock: trio.testing.MockClock) -> None:
    def setup(mgr: Manager) -> None:
        mgr.register_node(Split())
        mgr.register_node(Branch())
        mgr.register_node(Join())

    async with open_cluster(["a", "b", "c"], setup) as members:
        seen: dict[str, list[Any]] = {member_id: [] for member_id in members}
        async with contextlib.AsyncExitStack() as stack:
            subscriptions = {
                member_id: await stack.enter_async_context(
                    member.manager.subscribe(
                        graft.WorkflowStarted, graft.WorkflowCompleted, graft.NodeStarted, graft.NodeCompleted
                    )
                )
                for member_id, member in members.items()
            }
            await members["b"].manager.start_workflow(trigger("wf1", "split"))
            await members["c"].manager.start_workflow(trigger("wf2", "split"))
            for member_id, subscription in subscriptions.items():
                completed = 0
                async for event in subscription:
                    seen[member_id].append(event)
                    if isinstance(event, graft.WorkflowCompleted):
                        completed += 1
                        if completed == 2:
                            break
    assert seen["a"] == seen["b"] == seen["c"]
    events = seen["a"]
    assert [type(e) for e in events].count(graft.NodeCompleted) == 2 * (1 + 4 + 1)
    assert len({repr(e) for e in events}) == len(events)  # once each
    assert [e.index for e in events] == sorted(e.index for e in events)  # in log order


async def test_broadcast_runs_the_handler_once_on_every_member(autojump_clock: trio.testing.MockClock) -> None:
    calls: list[tuple[str, Any, str]] = []
    done = trio.Event()

    def setup(mgr: Manager) -> None:
        async def handler(params: Any, origin: str) -> None:
            calls.append((mgr.node_id, params, origin))
            if len(calls) == 6:
                done.set()

        mgr.register_command_handler("flush", handler)

    async with open_cluster(["a", "b", "c"], setup) as members:
        await members["b"].manager.broadcast("flush", {"cache": "users"})
        await members["c"].manager.broadcast("flush", {"cache": "orders"})
        await done.wait()
        await trio.sleep(5)  # and no more calls come
    assert sorted((member, params["cache"], origin) for member, params, origin in calls) == sorted(
        (member, cache, origin) for member in "abc" for cache, origin in (("users", "b"), ("orders", "c"))
    )


async def test_cluster_info_and_health(autojump_clock: trio.testing.MockClock) -> None:
    async with open_cluster(["a", "b", "c"], lambda mgr: None) as members:
        leader = await members["a"].manager.raft.wait_for_leader()
        await members[leader].manager.broadcast("nothing")  # one entry of this term, applied everywhere
        for member_id, member in members.items():
            info = member.manager.cluster_info()
            assert info.member_id == member_id and info.leader_id == leader
            assert [m.member_id for m in info.members] == ["a", "b", "c"]
            health = member.manager.health()
            assert health.serving and health.has_leader and health.healthy
        members["c"].scope.cancel()
        await trio.sleep(1)
        assert not members["c"].manager.health().serving


async def test_members_see_leader_changes(autojump_clock: trio.testing.MockClock) -> None:
    async with open_cluster(["a", "b", "c"], lambda mgr: None) as members:
        old = await members["a"].manager.raft.wait_for_leader()
        watcher = members[next(i for i in members if i != old)].manager
        async with watcher.subscribe(graft.LeaderChanged) as changes:
            members[old].scope.cancel()
            async for event in changes:
                if event.leader_id not in (None, old):
                    break
        assert event.leader_id == watcher.cluster_info().leader_id
        assert event.term > 1


# --- events on one member -----------------------------------------------------------------------------


async def test_a_slow_subscriber_gets_an_overflow_marker_and_never_blocks_the_log(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with one_member(Greeter()) as mgr, mgr.subscribe(graft.WorkflowCompleted, capacity=3) as events:
        for i in range(8):  # nobody reads meanwhile: the log goes on regardless
            await mgr.start_workflow(trigger(f"wf{i}", "greeter", GreeterConfig("Hi"), GreeterState("Bo")))
        for i in range(8):
            await mgr.wait_for_workflow(f"wf{i}", timeout=10)
        received = []
        async for event in events:
            received.append(event)
            if len(received) == 4:
                break
    first = received[:3]
    assert all(isinstance(e, graft.WorkflowCompleted) for e in first)
    assert [e.index for e in first] == sorted(e.index for e in first)
    marker = received[3]
    assert isinstance(marker, graft.EventsDropped) and marker.count == 5
    assert first[-1].index < marker.first_index < marker.last_index


async def test_on_calls_the_handler_for_each_event_and_watch_follows_a_workflow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    completed: list[str] = []
    node = Step()
    async with one_member(node) as mgr:
        mgr.on(graft.WorkflowCompleted, lambda event: completed.append(event.workflow_id))
        await mgr.start_workflow(trigger("wf", "step", {"label": "a", "next": ["b"]}))
        snapshots = [snapshot async for snapshot in mgr.watch_workflow("wf")]
        await trio.sleep(1)
    assert completed == ["wf"]
    assert snapshots[-1].status is graft.WorkflowStatus.COMPLETED
    assert all(s.status is graft.WorkflowStatus.RUNNING for s in snapshots[:-1])
    states = [s.current_state for s in snapshots]
    assert {} in states and {"a": True} in states and states[-1] == {"a": True, "b": True}
    assert all(a != b for a, b in itertools.pairwise(snapshots))  # a snapshot per change, no repeats


# --- the example ----------------------------------------------------------------------------------------


def test_the_greeter_example_prints_the_spec_line() -> None:
    root = Path(__file__).resolve().parent.parent
    completed = subprocess.run(
        [sys.executable, "examples/greeter.py", "--bind", "127.0.0.1:0"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout.strip() == "WorkflowStatus.COMPLETED {'name': 'Ada', 'greeting': 'Hello, Ada!'}"


async def test_a_leader_leaving_gracefully_hands_leadership_over_first(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    ids = ["a", "b", "c"]
    managers = {i: make_manager(network, i, {j: f"mem-{j}" for j in ids if j != i}) for i in ids}
    async with trio.open_nursery() as nursery:
        leave = {i: trio.Event() for i in ids}
        for i in ids:

            async def run(i: str = i, *, task_status: trio.TaskStatus[None]) -> None:
                async with managers[i]:
                    task_status.started()
                    await leave[i].wait()

            await nursery.start(run)
        leader_id = await managers["a"].raft.wait_for_leader()
        others = [managers[i] for i in ids if i != leader_id]
        left_at = trio.current_time()
        leave[leader_id].set()  # its body returns and it leaves `async with`: the graceful path
        with trio.fail_after(10):
            while not any(m.raft.is_leader for m in others):
                await trio.sleep(0.01)
        # A transfer (TimeoutNow) is quicker than the shortest election timeout the survivors would wait.
        assert trio.current_time() - left_at < managers["a"].raft.config.election_timeout
        nursery.cancel_scope.cancel()


# --- replicated time ----------------------------------------------------------------------------------


class Delayer(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "delayer"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        return graft.NodeResult(next_nodes=[graft.NextNode("delayed", delay=5.0)])


class Delayed(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "delayed"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        return graft.NodeResult(data={"done": True})


async def test_timers_fire_on_time_after_failover_to_a_leader_whose_clock_is_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    ids = ["a", "b", "c"]
    clocks = {i: OffsetClock() for i in ids}
    managers = {i: make_manager(network, i, {j: f"mem-{j}" for j in ids if j != i}, clock=clocks[i]) for i in ids}
    scopes = {i: trio.CancelScope() for i in ids}
    async with trio.open_nursery() as nursery:
        for i in ids:
            managers[i].register_node(Delayer())
            managers[i].register_node(Delayed())

            async def run(i: str = i, *, task_status: trio.TaskStatus[None]) -> None:
                with scopes[i]:
                    await managers[i].run(task_status=task_status)

            await nursery.start(run)
        first = await managers["a"].raft.wait_for_leader()
        clocks[first].offset = 1000.0  # the first leader's clock runs 1,000 s ahead: so does the log's time
        await managers[first].start_workflow(trigger("wf-1", "delayed"))
        assert (await managers[first].wait_for_workflow("wf-1", timeout=10)).status is graft.WorkflowStatus.COMPLETED
        survivor = managers[next(i for i in ids if i != first)]
        async with survivor.subscribe(graft.LeaderChanged) as changes:
            scopes[first].cancel()
            async for change in changes:
                if change.leader_id not in (None, first):
                    break
        started = trio.current_time()
        await survivor.start_workflow(trigger("wf-2", "delayer"))
        # The new leader's clock is 1,000 s behind the log: the 5 s timer still fires after 5 s, not 1,005 s.
        view = await survivor.wait_for_workflow("wf-2", timeout=30)
        assert view.status is graft.WorkflowStatus.COMPLETED
        assert 5.0 <= trio.current_time() - started < 10.0
        assert view.completed_at is not None and view.completed_at > 1000.0  # the log's time never went back
        nursery.cancel_scope.cancel()


# --- spreading a light load ---------------------------------------------------------------------------


class Recorder(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "recorder"

    def __init__(self, ran_on: list[str]) -> None:
        self.ran_on = ran_on

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        self.ran_on.append(ctx.member_id)
        await trio.sleep(0.5)
        return graft.NodeResult(data={"ran_on": ctx.member_id})


async def run_one_at_a_time(leader_claim_delay: float) -> tuple[str, list[str]]:
    ran_on: list[str] = []
    async with open_cluster(["a", "b", "c"], lambda mgr: mgr.register_node(Recorder(ran_on))) as members:
        for member in members.values():
            member.manager.engine.leader_claim_delay = leader_claim_delay
        leader = await members["a"].manager.raft.wait_for_leader()
        for i in range(9):
            await members[leader].manager.start_workflow(trigger(f"wf-{i}", "recorder"))
            await members[leader].manager.wait_for_workflow(f"wf-{i}", timeout=10)
    return leader, ran_on


async def test_a_light_load_is_spread_over_the_followers_not_left_to_the_leader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    leader, ran_on = await run_one_at_a_time(leader_claim_delay=0.02)
    assert len(ran_on) == 9
    assert ran_on.count(leader) <= 3, ran_on  # (0 or 1 in practice; the margin is for scheduling details)
    # Which follower runs them is not up to the leader's wait: a follower that has just finished a step
    # claims again at once (its last claim came back full), and that claim can reach the log right after
    # the next workflow's start, so one follower may run them all (seen in a full-suite run).
    # Without the leader's wait its claims land first and it runs (nearly) everything: what this test guards.
    leader, ran_on = await run_one_at_a_time(leader_claim_delay=0.0)
    assert ran_on.count(leader) >= 6, ran_on
