"""The main demo: a three-member graft-trio cluster on loopback TCP runs a batch of document workflows and
loses its leader halfway.

    make demo
    # or, once .venv exists:
    .venv/bin/python examples/demo.py [--documents 40] [--seed 7]

One trio process runs three `graft.Manager`s (n1, n2, n3), each under a cancel scope of its own, over the
``tcp`` transport on free loopback ports, authenticated with a cluster secret, with durable logs (fsync) in a
temporary directory. Every member registers the document pipeline of examples/document_pipeline.py and
subscribes to the cluster's events (`mgr.subscribe`): every member sees every event, so each keeps its own
tally of workflows, steps, retries and which member ran each step. The demo

1. waits for the first leader; then documents arrive one every 50 ms, each started round-robin through
   the members (a follower forwards its proposals to the leader; a start whose member died is made again
   on another one);
2. prints a progress line every half second: workflows completed / running / failed, steps run, failed attempts
   retried, steps per member, the leader;
3. once about half of the expected steps have run, kills the leader (cancels its scope: a crash, it hands
   nothing back) and measures the failover: the time until a survivor knows a new leader, and until the
   first step committed by the new leader is applied. The steps the dead leader was running come back
   when their claims' lease (2 s here) runs out, and run again on a survivor;
4. waits for every workflow on a survivor and prints a summary. It exits 1 if a workflow did not complete,
   or if the events disagree with the workflows' records.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio
from document_pipeline import (
    EVENT_TYPES,
    Tally,
    document_ids,
    free_ports,
    ms,
    recorded_steps,
    register_pipeline,
    summarize,
    trigger_for,
    wait_for_all,
)

import graft_trio as graft
from graft_trio.raft import NodeStoppedError

CLUSTER_SECRET = "graft-trio-demo-secret"
CLAIM_LEASE = 2.0  # how long the steps of a crashed member stay claimed before another member takes them
STEPS_PER_DOCUMENT = 9  # about: 7 with one extraction pass, 11 with three
ARRIVAL_INTERVAL = 0.05  # seconds between two documents


@attrs.define(eq=False)
class Member:
    manager: graft.Manager
    tally: Tally = attrs.Factory(Tally)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    stopped: trio.Event = attrs.Factory(trio.Event)

    @property
    def member_id(self) -> str:
        return self.manager.node_id

    @property
    def alive(self) -> bool:
        return not self.stopped.is_set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the member and its tally under `scope`; cancelling the scope is a crash."""
        try:
            with self.scope:
                # Subscribed before the member starts, so the tally sees the log from its first entry.
                subscription = self.manager.subscribe(*EVENT_TYPES, capacity=1_000_000)
                async with subscription as events, trio.open_nursery() as nursery:
                    await nursery.start(self.manager.run)
                    nursery.start_soon(self.tally.consume, events)
                    task_status.started()
        finally:
            self.stopped.set()

    async def kill(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


def build_cluster(data_root: Path) -> list[Member]:
    addresses = {f"n{number}": f"127.0.0.1:{port}" for number, port in enumerate(free_ports(3), start=1)}
    members = []
    for member_id, address in addresses.items():
        manager = graft.Manager(
            member_id,
            address,
            str(data_root / member_id),
            transport="tcp",
            peers={peer: peer_address for peer, peer_address in addresses.items() if peer != member_id},
            cluster_secret=CLUSTER_SECRET,
            claim_lease=CLAIM_LEASE,
            max_concurrent_steps=8,
        )
        register_pipeline(manager)
        members.append(Member(manager))
    return members


async def wait_for_leader(members: Sequence[Member], *, other_than: str | None = None) -> str:
    """The leader's id, once a live member knows one that is not `other_than` (polled every 5 ms: the demo
    measures how long this takes)."""
    while True:
        for member in members:
            if member.alive:
                leader = member.manager.cluster_info().leader_id
                if leader is not None and leader != other_than:
                    return leader
        await trio.sleep(0.005)


async def start_document(members: Sequence[Member], first: int, doc_id: str, seed: int) -> None:
    """Start the document's workflow through `members[first]`, or the next live member if that one is gone.

    A start that raced with the death of its member may have been committed anyway: trying again on another
    member then raises `WorkflowExistsError`, which means it was started.
    """
    for offset in range(len(members)):
        member = members[(first + offset) % len(members)]
        if not member.alive:
            continue
        try:
            await member.manager.start_workflow(trigger_for(doc_id, seed=seed))
        except graft.WorkflowExistsError:
            return
        except NodeStoppedError:
            continue
        return
    raise RuntimeError(f"no live member to start {doc_id}")


async def feed_documents(members: Sequence[Member], ids: Sequence[str], seed: int) -> None:
    """Documents arrive one every `ARRIVAL_INTERVAL`; each is started round-robin through the members (a
    follower forwards the proposal to the leader), without waiting for the previous start."""
    async with trio.open_nursery() as nursery:
        for number, doc_id in enumerate(ids):
            nursery.start_soon(start_document, members, number, doc_id, seed)
            await trio.sleep(ARRIVAL_INTERVAL)


async def leading_member(members: Sequence[Member]) -> Member:
    """The live member that is leader now (not merely believed to be by another one)."""
    while True:
        for member in members:
            if member.alive and member.manager.cluster_info().role == "leader":
                return member
        await trio.sleep(0.005)


def spread(counts: dict[str, int]) -> str:
    return " ".join(f"{member_id}:{n}" for member_id, n in sorted(counts.items()))


async def report_progress(members: Sequence[Member], total: int, began: float) -> None:
    """A line every half second, from the tally of a live member."""
    while True:
        await trio.sleep(0.5)
        reporter = next(member for member in members if member.alive)
        tally = reporter.tally
        leader = reporter.manager.cluster_info().leader_id
        running = tally.started - tally.completed - tally.failed
        print(
            f"[{time.perf_counter() - began:5.1f}s] workflows {tally.completed}/{total} completed, "
            f"{running} running, {tally.failed} failed | {tally.steps} steps, {tally.retries} retries | "
            f"per member {spread(tally.steps_by_member)} | leader {leader}",
            flush=True,
        )


async def main(count: int, seed: int) -> int:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graft-demo-") as data_root:
        members = build_cluster(Path(data_root))
        print(
            "graft-trio demo: 3 members (n1, n2, n3) on loopback TCP with a cluster secret, durable logs; "
            f"{count} document workflows"
        )
        async with trio.open_nursery() as nursery:
            for member in members:
                await nursery.start(member.run)
            first_leader = await wait_for_leader(members)
            print(f"leader elected: {first_leader} after {ms(time.perf_counter() - began)}")
            ids = document_ids(count)
            nursery.start_soon(report_progress, members, count, began)
            nursery.start_soon(feed_documents, members, ids, seed)

            # Kill the leader once about half of the work is done.
            await members[0].tally.wait_for_steps(count * STEPS_PER_DOCUMENT // 2)
            victim = await leading_member(members)
            victim_id = victim.member_id
            survivors = [member for member in members if member is not victim]
            last_index = victim.manager.raft.status().last_index  # anything past this was committed after the kill
            step_after_kill = survivors[0].tally.wait_for_step_after
            running_on_victim = victim.manager.engine.stats().running
            killed_at = time.perf_counter()
            await victim.kill()
            print(
                f"[{killed_at - began:5.1f}s] killed the leader {victim_id} "
                f"(steps running on it: {running_on_victim}; its last log index: {last_index})",
                flush=True,
            )
            failover: dict[str, float] = {}

            async def measure_election() -> None:
                new_leader = await wait_for_leader(survivors, other_than=victim_id)
                failover["election"] = time.perf_counter() - killed_at
                print(f"new leader: {new_leader}, known {ms(failover['election'])} after the kill", flush=True)

            async def measure_first_commit() -> None:
                failover["commit"] = await step_after_kill(last_index) - killed_at
                print(f"first step committed after the kill: {ms(failover['commit'])} after it", flush=True)

            async with trio.open_nursery() as measuring:
                measuring.start_soon(measure_election)
                measuring.start_soon(measure_first_commit)

            observer = survivors[0]
            results = await wait_for_all(observer.manager, ids, timeout=60)
            elapsed = time.perf_counter() - began
            tally = observer.tally
            await tally.settle(count, recorded_steps(results))
            nursery.cancel_scope.cancel()

    print("summary:")
    status = summarize(results, elapsed)
    recorded = recorded_steps(results)
    agree = tally.steps == recorded and tally.completed == count and tally.dropped == 0
    print(
        f"  events seen by {observer.member_id}: {tally.completed} workflows completed, {tally.steps} steps "
        f"({'agreeing' if agree else 'DISAGREEING'} with the workflow records: {recorded}), {tally.retries} retries "
        f"(of which attempts lost with the killed leader: {tally.lost})"
    )
    print(f"  steps per member: {spread(tally.steps_by_member)}")
    print(
        f"  failover: leader {victim_id} killed at {killed_at - began:.1f} s; new leader known after "
        f"{ms(failover['election'])}; first step committed after {ms(failover['commit'])}"
    )
    return status if agree else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=40, help="how many document workflows to run")
    parser.add_argument("--seed", type=int, default=7, help="seed of the documents and of their failures")
    args = parser.parse_args()
    sys.exit(trio.run(main, args.documents, args.seed))
