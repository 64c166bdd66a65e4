"""The document pipeline on three members that are separate OS processes; the leader's process is SIGKILLed.

    .venv/bin/python examples/cluster.py [--documents 40] [--seed 7]

Run with no command, the program is the orchestrator: it starts three member processes (this same file, run
as ``member``) on free loopback TCP ports with a cluster secret and durable logs in a temporary directory,
starts the batch of document workflows (examples/document_pipeline.py) through one member, waits until about
half of the steps have run, SIGKILLs the process of the leader, measures the failover, checks on both
survivors that every workflow completed, prints a summary, and exits 1 if one did not.

A member runs a `graft.Manager` with the pipeline registered and takes orders from whoever started it on a
control channel of its own: one JSON object per line on stdin, one answer per line on stdout (``{"id": ...,
"ok": true, ...}``), answers in the order they are ready, so that several requests may be waiting at once.
It prints ``{"ready": "<id>"}`` once it serves, and leaves the cluster (handing its claims back) when stdin
closes. One can run members by hand and type requests::

    .venv/bin/python examples/cluster.py member --id n1 --bind 127.0.0.1:7201 \\
        --peers n2@127.0.0.1:7202,n3@127.0.0.1:7203 --data-dir ./data/n1 --cluster-secret s3cret
    {"id": 1, "op": "start", "doc_ids": ["doc-001", "doc-002"]}
    {"id": 2, "op": "wait_workflows", "doc_ids": ["doc-001", "doc-002"], "timeout": 30}

Requests (``op``): ``start`` (``doc_ids``, ``seed``), ``status`` (role, leader, log indexes), ``tally`` (the
member's event tally), ``wait_steps`` (``count``), ``wait_leader`` (``other_than``), ``wait_step_after``
(``index``: answers once a step committed past that log index is applied, with how long ago that was) and
``wait_workflows`` (``doc_ids``, ``timeout``: each workflow's status and a line about it, once all are
finished or the timeout has passed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio
from document_pipeline import (
    EVENT_TYPES,
    Tally,
    describe,
    document_ids,
    free_ports,
    ms,
    register_pipeline,
    trigger_for,
    wait_for_all,
)

import graft_trio as graft

CLUSTER_SECRET = "graft-trio-cluster-example"
CLAIM_LEASE = 2.0
STEPS_PER_DOCUMENT = 9  # about: 7 with one extraction pass, 11 with three
MAX_LINE = 1 << 20


async def read_lines(stream: trio.abc.ReceiveStream) -> AsyncIterator[bytes]:
    """The lines of a byte stream (without their newline), until it ends."""
    buffer = bytearray()
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            yield line
        if len(buffer) > MAX_LINE:
            raise ValueError(f"a line longer than {MAX_LINE} bytes")


# --- the member -------------------------------------------------------------------------------------------


class ControlledMember:
    """A Manager running the pipeline, answering the requests of the control channel."""

    def __init__(self, manager: graft.Manager, out: TextIO) -> None:
        self.manager = manager
        self.tally = Tally()
        self.out = out

    async def run(self) -> None:
        register_pipeline(self.manager)
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        subscription = self.manager.subscribe(*EVENT_TYPES, capacity=1_000_000)
        async with subscription as events, self.manager, trio.open_nursery() as nursery:
            nursery.start_soon(self.tally.consume, events)
            self.send({"ready": self.manager.node_id})
            async for line in read_lines(stdin):
                if line.strip():
                    nursery.start_soon(self.answer, line)
            nursery.cancel_scope.cancel()  # stdin closed: leave the cluster (the Manager hands its claims back)

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")) + "\n")
        self.out.flush()

    async def answer(self, line: bytes) -> None:
        request_id = None
        try:
            request = json.loads(line)
            request_id = request.get("id")
            reply = await self.execute(request)
            self.send({"id": request_id, "ok": True, **reply})
        except Exception as error:  # the answer says what went wrong; the member goes on
            self.send({"id": request_id, "ok": False, "error": type(error).__name__, "detail": str(error)})

    async def execute(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        mgr = self.manager
        if op == "start":
            started: list[str] = []
            existed: list[str] = []

            async def start(doc_id: str) -> None:
                try:
                    await mgr.start_workflow(trigger_for(doc_id, seed=int(request.get("seed", 7))))
                    started.append(doc_id)
                except graft.WorkflowExistsError:
                    existed.append(doc_id)

            async with trio.open_nursery() as nursery:
                for doc_id in request["doc_ids"]:
                    nursery.start_soon(start, str(doc_id))
            return {"started": sorted(started), "existed": sorted(existed)}
        if op == "status":
            status = mgr.raft.status()
            return {
                "member": mgr.node_id,
                "role": status.role,
                "leader": status.leader_id,
                "term": status.term,
                "commit_index": status.commit_index,
                "last_index": status.last_index,
                "running": mgr.engine.stats().running,
            }
        if op == "tally":
            if "completed" in request:  # wait (a few s at most) for the events still on their way
                await self.tally.settle(int(request["completed"]), int(request["steps"]))
            return self.tally.counts()
        if op == "wait_steps":
            await self.tally.wait_for_steps(int(request["count"]))
            return {"steps": self.tally.steps}
        if op == "wait_leader":
            other_than = request.get("other_than")
            while True:  # polled every 5 ms: the orchestrator measures how long this takes
                leader = mgr.cluster_info().leader_id
                if leader is not None and leader != other_than:
                    return {"leader": leader}
                await trio.sleep(0.005)
        if op == "wait_step_after":
            applied_at = await self.tally.wait_for_step_after(int(request["index"]))
            return {"seconds_ago": time.perf_counter() - applied_at}
        if op == "wait_workflows":
            doc_ids = [str(doc_id) for doc_id in request["doc_ids"]]
            results = []
            for workflow in await wait_for_all(mgr, doc_ids, timeout=float(request.get("timeout", 60))):
                completed = sum(1 for s in workflow.executed_steps if s.status is graft.StepStatus.COMPLETED)
                results.append(
                    {
                        "workflow_id": workflow.workflow_id,
                        "status": workflow.status.value,
                        "outcome": workflow.current_state.get("outcome"),
                        "steps": completed,
                        "retried": len(workflow.executed_steps) - completed,
                        "line": describe(workflow),
                    }
                )
            return {"results": results}
        raise ValueError(f"unknown op {op!r}")


def parse_peers(text: str) -> dict[str, str]:
    """``n2@127.0.0.1:7202,n3@127.0.0.1:7203`` -> ``{"n2": "127.0.0.1:7202", ...}``."""
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        member_id, sep, address = item.partition("@")
        if not sep or not member_id or not address:
            raise argparse.ArgumentTypeError(f"peer {item!r} is not written id@host:port")
        peers[member_id] = address
    return peers


def run_member(args: argparse.Namespace) -> int:
    manager = graft.Manager(
        args.id,
        args.bind,
        args.data_dir,
        transport="tcp",
        peers=args.peers,
        cluster_secret=args.cluster_secret,
        claim_lease=args.claim_lease,
        max_concurrent_steps=8,
    )
    trio.run(ControlledMember(manager, sys.stdout).run)
    return 0


# --- the orchestrator -------------------------------------------------------------------------------------


class MemberError(Exception):
    """A member answered a request with an error, or died before answering."""


@attrs.define(eq=False)
class MemberProcess:
    """A member process and the orchestrator's end of its control channel."""

    member_id: str
    address: str
    data_dir: Path
    process: trio.Process | None = None
    ready: trio.Event = attrs.Factory(trio.Event)
    killed: bool = False
    _next_id: int = 0
    _waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = attrs.Factory(dict)
    _send_lock: trio.Lock = attrs.Factory(trio.Lock)

    async def start(self, peers: str, nursery: trio.Nursery, log: TextIO) -> None:
        command = [
            sys.executable, __file__, "member",
            "--id", self.member_id,
            "--bind", self.address,
            "--peers", peers,
            "--data-dir", str(self.data_dir),
            "--cluster-secret", CLUSTER_SECRET,
            "--claim-lease", str(CLAIM_LEASE),
        ]  # fmt: skip
        self.process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
        nursery.start_soon(self._read_answers)

    async def _read_answers(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        try:
            async for line in read_lines(self.process.stdout):
                message = json.loads(line)
                if "ready" in message:
                    self.ready.set()
                    continue
                channel = self._waiting.pop(message.get("id"), None)
                if channel is not None:
                    channel.send_nowait(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            for channel in self._waiting.values():
                channel.close()  # the member is gone: whoever waits learns it
            self._waiting.clear()

    async def call(self, op: str, **params: Any) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin is not None
        self._next_id += 1
        request_id = self._next_id
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[request_id] = send
        line = json.dumps({"id": request_id, "op": op, **params}) + "\n"
        async with self._send_lock:
            await self.process.stdin.send_all(line.encode())
        try:
            answer = await receive.receive()
        except trio.EndOfChannel:
            raise MemberError(f"{self.member_id} died before answering {op}") from None
        if not answer.get("ok"):
            raise MemberError(f"{self.member_id} could not {op}: {answer.get('error')}: {answer.get('detail')}")
        return answer

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()  # SIGKILL: no goodbye, no claims handed back
        self.killed = True

    async def leave(self) -> None:
        """Close the control channel (the member leaves the cluster and exits) and wait for the process."""
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.aclose()
        with trio.move_on_after(10):
            await self.process.wait()
            return
        self.process.kill()
        await self.process.wait()


async def leading_member(members: Sequence[MemberProcess]) -> MemberProcess:
    """The member whose own status says it leads (asked every 10 ms while an election runs)."""
    while True:
        for member in members:
            if not member.killed and (await member.call("status"))["role"] == "leader":
                return member
        await trio.sleep(0.01)


async def orchestrate(count: int, seed: int) -> int:
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graft-cluster-") as data_root:
        root = Path(data_root)
        members = [
            MemberProcess(f"n{number}", f"127.0.0.1:{port}", root / f"n{number}")
            for number, port in enumerate(free_ports(3), start=1)
        ]
        logs = [open(root / f"{member.member_id}.log", "w") for member in members]  # noqa: SIM115
        try:
            async with trio.open_nursery() as nursery:
                for member, log in zip(members, logs, strict=True):
                    peers = ",".join(f"{m.member_id}@{m.address}" for m in members if m is not member)
                    await member.start(peers, nursery, log)
                with trio.fail_after(30):
                    for member in members:
                        await member.ready.wait()
                addresses = ", ".join(member.address for member in members)
                print(f"3 member processes serving on {addresses} after {time.perf_counter() - began:.1f} s")
                status = await run_batch(members, count, seed, began)
                for member in members:
                    if not member.killed:
                        await member.leave()
                nursery.cancel_scope.cancel()
        except BaseException:
            for log, member in zip(logs, members, strict=True):
                log.flush()
                tail = (root / f"{member.member_id}.log").read_text()[-2000:]
                print(f"--- last lines of {member.member_id}'s log ---\n{tail}", file=sys.stderr)
            raise
        finally:
            for member in members:
                if member.process is not None and member.process.returncode is None:
                    member.process.kill()
            for log in logs:
                log.close()
    return status


async def run_batch(members: Sequence[MemberProcess], count: int, seed: int, began: float) -> int:
    def stamp() -> str:
        return f"[{time.perf_counter() - began:5.1f}s]"

    with trio.fail_after(30):
        leader = (await members[0].call("wait_leader"))["leader"]
    control = next(member for member in members if member.member_id != leader)
    print(f"{stamp()} leader: {leader}; starting {count} workflows through {control.member_id}")
    ids = document_ids(count)
    with trio.fail_after(30):
        started = await control.call("start", doc_ids=ids, seed=seed)
        print(f"{stamp()} started {len(started['started'])} workflows")
        await control.call("wait_steps", count=count * STEPS_PER_DOCUMENT // 2)
        victim = await leading_member(members)
        victim_id = victim.member_id
        if victim is control:  # leadership moved to it meanwhile: talk to another member from now on
            control = next(member for member in members if member is not victim)
    tally = await control.call("tally")
    victim.kill()
    killed_at = time.perf_counter()
    print(
        f"{stamp()} SIGKILLed the leader {victim_id} (pid {victim.process.pid if victim.process else '?'}) "
        f"after {tally['steps']} steps"
    )
    survivors = [member for member in members if member is not victim]
    failover: dict[str, float] = {}
    with trio.fail_after(30):
        # Whatever the survivors hold now was appended before the kill; a step committed past it was
        # committed by a new leader.
        last_indexes = [(await member.call("status"))["last_index"] for member in survivors]

        async def measure_election() -> None:
            new_leader = (await control.call("wait_leader", other_than=victim_id))["leader"]
            failover["election"] = time.perf_counter() - killed_at
            print(f"{stamp()} new leader: {new_leader}, known {ms(failover['election'])} after the kill")

        async def measure_first_commit() -> None:
            answer = await control.call("wait_step_after", index=max(last_indexes))
            failover["commit"] = time.perf_counter() - answer["seconds_ago"] - killed_at
            print(f"{stamp()} first step committed after the kill: {ms(failover['commit'])} after it")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(measure_election)
            nursery.start_soon(measure_first_commit)

    with trio.fail_after(60):
        views = {member.member_id: await member.call("wait_workflows", doc_ids=ids, timeout=50) for member in survivors}
        results = views[control.member_id]["results"]
        recorded_steps = sum(r["steps"] for r in results)
        tally = await control.call("tally", completed=len(ids), steps=recorded_steps)
    elapsed = time.perf_counter() - began
    completed = [r for r in results if r["status"] == "completed"]
    for result in results:
        if result["status"] != "completed":
            print(f"  NOT COMPLETED: {result['line']}")
    summaries = {
        json.dumps([(r["workflow_id"], r["status"], r["outcome"]) for r in view["results"]]) for view in views.values()
    }
    agree = len(summaries) == 1
    outcomes: dict[str, int] = {}
    for result in completed:
        outcomes[str(result["outcome"])] = outcomes.get(str(result["outcome"]), 0) + 1
    print("summary:")
    print(
        f"  {len(completed)}/{count} workflows completed ({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))})"
        f"; the survivors {'agree' if agree else 'DISAGREE'} on every workflow"
    )
    print(
        f"  {tally['steps']} steps (workflow records: {recorded_steps}), {tally['retries']} failed attempts retried "
        f"({tally['lost']} lost with the killed leader); steps per member: "
        + " ".join(f"{member_id}:{n}" for member_id, n in tally["steps_by_member"].items())
    )
    print(
        f"  failover: {victim_id} killed at {killed_at - began:.1f} s; new leader known after "
        f"{ms(failover['election'])}; first step committed after {ms(failover['commit'])}; total {elapsed:.1f} s"
    )
    ok = len(completed) == count and agree and tally["steps"] == recorded_steps
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--documents", type=int, default=40, help="how many document workflows to run")
    parser.add_argument("--seed", type=int, default=7, help="seed of the documents and of their failures")
    commands = parser.add_subparsers(dest="command")
    member = commands.add_parser("member", help="run one member, controlled on stdin/stdout")
    member.add_argument("--id", required=True, help="this member's id")
    member.add_argument("--bind", required=True, help="host:port for Raft traffic")
    member.add_argument("--peers", type=parse_peers, default={}, help="id@host:port,... of the other members")
    member.add_argument("--data-dir", default=None, help="where the log lives (default: memory)")
    member.add_argument("--cluster-secret", default=None, help="shared secret the members authenticate with")
    member.add_argument("--claim-lease", type=float, default=CLAIM_LEASE, help="seconds a dead member's claim lasts")
    args = parser.parse_args()
    if args.command == "member":
        return run_member(args)
    return trio.run(orchestrate, args.documents, args.seed)


if __name__ == "__main__":
    sys.exit(main())
