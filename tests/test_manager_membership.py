"""Membership from the Manager: a member that starts with ``join=True`` asks its way into a running cluster
(learner, then voter), `add_member` / `remove_member` work on any member, and subscribers see
`MemberJoined` / `MemberLeft`. Real RaftNodes on a private memory network, autojump clock."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

import graft_trio as graft
from graft_trio import cli
from graft_trio.manager import Manager
from graft_trio.raft import MemoryStorage
from graft_trio.raft.errors import MembershipChangeError
from graft_trio.raft.messages import MembershipRequest, Message
from graft_trio.raft.node import RaftConfig
from tests.test_manager import Counter, Member, make_manager, open_cluster, trigger
from tests.transport_helpers import NETWORK_TRANSPORTS, free_tcp_addresses
from transports.memory import MemoryEndpoint, MemoryNetwork

FOUNDERS = ["m1", "m2", "m3"]
GUARD = 300.0  # seconds of (virtual) time after which a wait for an event fails the test instead of hanging


class RecordingNetwork(MemoryNetwork):
    """A memory network that counts the membership requests each member sends."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[str, int] = {}

    def deliver(self, source: MemoryEndpoint, target_address: str, message: Message) -> None:
        if isinstance(message, MembershipRequest):
            self.requests[source.node_id] = self.requests.get(source.node_id, 0) + 1
        super().deliver(source, target_address, message)


@contextlib.asynccontextmanager
async def running(manager: Manager) -> AsyncIterator[Member]:
    """Run `manager` in a cancel scope of its own (cancel it to kill the member)."""
    member = Member(manager, trio.CancelScope())
    async with trio.open_nursery() as nursery:

        async def run(*, task_status: trio.TaskStatus[None]) -> None:
            with member.scope:
                await manager.run(task_status=task_status)

        await nursery.start(run)
        yield member
        nursery.cancel_scope.cancel()


def founders_addresses() -> dict[str, str]:
    return {member_id: f"mem-{member_id}" for member_id in FOUNDERS}


async def voter_in(manager: Manager, member_id: str, events: Any) -> None:
    """Wait (on `events`, a MemberJoined subscription) until `member_id` is a voter as `manager` applied it."""
    if any(m.member_id == member_id and m.voter for m in manager.cluster_info().members):
        return
    with trio.fail_after(GUARD):
        async for event in events:
            if isinstance(event, graft.MemberJoined) and event.member_id == member_id and event.voter:
                return


def members_of(manager: Manager) -> dict[str, bool]:
    return {m.member_id: m.voter for m in manager.cluster_info().members}


async def test_a_member_started_with_join_becomes_a_voter_and_runs_steps(
    autojump_clock: trio.testing.MockClock,
) -> None:
    executions: list[tuple[str, str, int]] = []
    steps = 3

    def setup(mgr: Manager) -> None:
        mgr.register_node(Counter(mgr.node_id, executions, steps))

    network = RecordingNetwork()
    options: dict[str, Any] = {"max_concurrent_steps": 2, "claim_batch": 1}
    async with open_cluster(FOUNDERS, setup, network, **options) as members:
        first = members["m1"].manager
        for i in range(4):
            await members[FOUNDERS[i % 3]].manager.start_workflow(trigger(f"before{i}", "counter"))
        joiner = make_manager(network, "m4", founders_addresses(), join=True, **options)
        setup(joiner)
        async with (
            first.subscribe(graft.MemberJoined) as joined,
            joiner.subscribe(graft.MemberJoined) as seen,
            running(joiner),
        ):
            await voter_in(first, "m4", joined)
            # The joiner applied the whole log: every founder, then itself as a learner and as a voter.
            learned: list[tuple[str, bool]] = []
            with trio.fail_after(GUARD):
                async for event in seen:
                    learned.append((event.member_id, event.voter))
                    if learned[-1] == ("m4", True):
                        break
            assert learned == [("m1", True), ("m2", True), ("m3", True), ("m4", False), ("m4", True)]
            for i in range(12):
                await joiner.start_workflow(trigger(f"after{i}", "counter"))
            for workflow_id in [*(f"before{i}" for i in range(4)), *(f"after{i}" for i in range(12))]:
                status = await joiner.wait_for_workflow(workflow_id, timeout=120)
                assert status.status is graft.WorkflowStatus.COMPLETED, status
                assert status.current_state == {"count": steps}
            assert members_of(joiner) == {"m1": True, "m2": True, "m3": True, "m4": True}
            assert members_of(first) == members_of(joiner)
    assert any(member == "m4" for _, member, _ in executions), "the joined member ran no step"
    assert network.requests.get("m4", 0) >= 1
    assert not {"m1", "m2", "m3"} & set(network.requests)  # founders never ask: nothing was asked of them


async def test_a_restarted_member_that_joined_does_not_ask_again(autojump_clock: trio.testing.MockClock) -> None:
    network = RecordingNetwork()
    storage = MemoryStorage()
    async with open_cluster(FOUNDERS, lambda mgr: None, network) as members:
        first = members["m1"].manager
        async with first.subscribe(graft.MemberJoined) as joined:
            joiner = make_manager(network, "m4", founders_addresses(), join=True, storage=storage)
            async with running(joiner) as member:
                await voter_in(first, "m4", joined)
                member.scope.cancel()
        asked = network.requests["m4"]
        await first.start_workflow(trigger("while m4 is down", "nobody-runs-this"))
        again = make_manager(network, "m4", founders_addresses(), life=2, join=True, storage=storage)
        async with running(again):
            await again.read_barrier()  # it is a member again: it reaches the leader and applies
            await again.read_barrier()
            assert members_of(again)["m4"] is True
        assert network.requests["m4"] == asked


async def test_add_member_called_on_a_follower_adds_a_learner_or_a_voter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with open_cluster(FOUNDERS, lambda mgr: None, network) as members:
        leader = await members["m1"].manager.raft.wait_for_leader()
        follower = members[next(i for i in FOUNDERS if i != leader)].manager
        # Members that know no one: they wait to be added (and ask nobody).
        voter = make_manager(network, "v", {}, join=True)
        learner = make_manager(network, "l", {}, join=True)
        async with running(voter), running(learner):
            await follower.add_member("v", "mem-v")
            await follower.add_member("l", "mem-l", voter=False)
            assert members_of(follower) == {"m1": True, "m2": True, "m3": True, "v": True, "l": False}
            await voter.read_barrier()
            await learner.read_barrier()
            assert members_of(voter) == members_of(learner) == members_of(follower)
            # Asking again is harmless; the same id at another address is refused and changes nothing.
            await follower.add_member("v", "mem-v")
            with pytest.raises(MembershipChangeError, match="at 'mem-v'"):
                await follower.add_member("v", "mem-elsewhere")
            assert members_of(follower)["v"] is True
            assert members_of(members[leader].manager) == members_of(follower)


@pytest.mark.parametrize("asked_on", ["follower", "leader"])
async def test_removing_a_follower_and_then_the_leader_keeps_the_cluster_running_workflows(
    autojump_clock: trio.testing.MockClock, asked_on: str
) -> None:
    executions: list[tuple[str, str, int]] = []

    def setup(mgr: Manager) -> None:
        mgr.register_node(Counter(mgr.node_id, executions, 2))

    ids = ["a", "b", "c", "d"]
    async with open_cluster(ids, setup) as members:
        leader = await members["a"].manager.raft.wait_for_leader()
        followers = [i for i in ids if i != leader]
        observer_id = followers[-1]
        observer = members[observer_id].manager
        asker = members[leader if asked_on == "leader" else followers[1]].manager
        async with observer.subscribe(graft.MemberLeft, graft.MemberJoined) as events:
            await observer.start_workflow(trigger("wf0", "counter"))
            await asker.remove_member(followers[0])
            await asker.remove_member(leader)  # on the leader itself too: it steps down once that commits
            removed = {followers[0], leader}
            left: list[str] = []
            with trio.fail_after(GUARD):
                async for event in events:
                    if isinstance(event, graft.MemberLeft):
                        left.append(event.member_id)
                        if len(left) == 2:
                            break
            assert left == [followers[0], leader]
            for member_id in removed:
                members[member_id].scope.cancel()  # the operator stops the removed members
            remaining = {i: True for i in ids if i not in removed}
            assert members_of(observer) == remaining
            await observer.start_workflow(trigger("wf1", "counter"))
            for workflow_id in ("wf0", "wf1"):
                status = await observer.wait_for_workflow(workflow_id, timeout=120)
                assert status.status is graft.WorkflowStatus.COMPLETED, status
            new_leader = observer.cluster_info().leader_id
            assert new_leader is not None and new_leader not in removed


async def test_join_requests_to_a_wrong_or_unknown_cluster_are_harmless(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = RecordingNetwork()
    async with open_cluster(FOUNDERS, lambda mgr: None, network) as members:
        first = members["m1"].manager
        before = members_of(first)
        # "zz" is not who listens at mem-m1 (the message names a member that is not there), and nothing
        # listens at mem-ghost.
        stray = make_manager(network, "x", {"zz": "mem-m1", "ghost": "mem-ghost"}, join=True)
        async with running(stray):
            await trio.sleep(60)  # a minute of asking
            assert network.requests["x"] >= 2  # it kept asking, with backoff
            assert stray.cluster_info().leader_id is None and not stray.health().has_leader
            for member in members.values():
                assert members_of(member.manager) == before
            await first.start_workflow(trigger("wf", "greeter-less"))
            await first.cancel_workflow("wf")  # the cluster still commits
        assert members_of(first) == before


def test_the_node_command_takes_join_from_its_flag_or_graft_join() -> None:
    def settings(argv: list[str], environ: dict[str, str]) -> cli.NodeSettings:
        args = cli.build_parser().parse_args(["node", "--node-id", "d", "--raft-addr", "h:4", *argv])
        return cli.node_settings(args, environ)

    peers = ["--peers", "a@h:1,b@h:2"]
    assert not settings(peers, {}).join
    assert settings([*peers, "--join"], {}).join
    assert settings(peers, {"GRAFT_JOIN": "1"}).join and settings(peers, {"GRAFT_JOIN": "true"}).join
    assert not settings(peers, {"GRAFT_JOIN": "0"}).join
    assert settings([*peers, "--join"], {"GRAFT_JOIN": "0"}).join  # the flag wins
    with pytest.raises(cli.CliError, match=r"--join \(or GRAFT_JOIN\) must be 1 or 0"):
        settings(peers, {"GRAFT_JOIN": "maybe"})
    assert cli.build_manager(settings([*peers, "--join"], {})).raft.join


@pytest.mark.parametrize("transport", NETWORK_TRANSPORTS)
async def test_a_member_joins_over_a_network_transport_through_a_follower(transport: str) -> None:
    """The real wire: the requests and answers are encoded, authenticated and, from a follower, forwarded."""
    addresses = dict(zip([*FOUNDERS, "m4"], free_tcp_addresses(4), strict=True))
    founders = {member_id: addresses[member_id] for member_id in FOUNDERS}
    config = RaftConfig(tick_interval=0.02, durable=False)
    options: dict[str, Any] = {"cluster_secret": "membership", "transport_options": {"backoff_max": 0.2}}

    def member(member_id: str, peers: dict[str, str], **kwargs: Any) -> Manager:
        return Manager(
            member_id, addresses[member_id], None, transport=transport, peers=peers, raft_config=config, **options,
            **kwargs,
        )

    async with contextlib.AsyncExitStack() as stack:
        managers = [await stack.enter_async_context(member(i, founders)) for i in FOUNDERS]
        with trio.fail_after(20):
            leader = await managers[0].raft.wait_for_leader()
        follower = next(i for i in FOUNDERS if i != leader)
        joiner = await stack.enter_async_context(member("m4", {follower: founders[follower]}, join=True))
        with trio.fail_after(20):
            async with managers[0].subscribe(graft.MemberJoined) as joined:
                await voter_in(managers[0], "m4", joined)
            await joiner.read_barrier()
            assert members_of(joiner) == {"m1": True, "m2": True, "m3": True, "m4": True}
            await joiner.remove_member(follower)
            assert follower not in members_of(joiner)
