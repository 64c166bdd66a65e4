"""Three OS processes of examples/kv_cluster.py on loopback: kill -9 of the leader loses nothing acknowledged.

These are end-to-end tests with real processes, real sockets, real fsync and the real clock, so they wait on
conditions (a member's ``ready`` line, a status answer) under `trio.fail_after` guards, never on sleeps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from kv_cluster import KvClient

REPO_ROOT = Path(__file__).resolve().parent.parent
SECRET = "kv-cluster-test-secret"
TRANSPORTS = ["tcp", "websocket"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define(eq=False)
class MemberProcess:
    node_id: str
    raft_address: str
    client_address: str
    data_dir: Path
    process: trio.Process | None = None
    output: list[str] = attrs.Factory(list)


@attrs.define(eq=False)
class KvCluster:
    members: list[MemberProcess]
    transport: str
    nursery: trio.Nursery
    snapshot_threshold: int | None = None

    def peers_of(self, member: MemberProcess) -> str:
        return ",".join(f"{m.node_id}@{m.raft_address}" for m in self.members if m is not member)

    async def start(self, member: MemberProcess) -> None:
        command = [
            sys.executable,
            "examples/kv_cluster.py",
            "member",
            "--id", member.node_id,
            "--address", member.raft_address,
            "--client", member.client_address,
            "--peers", self.peers_of(member),
            "--data-dir", str(member.data_dir),
            "--transport", self.transport,
            "--cluster-secret", SECRET,
        ]  # fmt: skip
        if self.snapshot_threshold is not None:
            command += ["--snapshot-threshold", str(self.snapshot_threshold)]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        process = await trio.lowlevel.open_process(
            command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        member.process = process
        ready = trio.Event()
        self.nursery.start_soon(self._pump_output, member, process, ready)
        with trio.fail_after(20):
            await ready.wait()

    async def _pump_output(self, member: MemberProcess, process: trio.Process, ready: trio.Event) -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                member.output.append(text)
                if text.startswith("ready "):
                    ready.set()
        if not ready.is_set():
            raise AssertionError(f"{member.node_id} exited before it was ready:\n" + "\n".join(member.output))

    def kill(self, member: MemberProcess) -> None:
        assert member.process is not None
        member.process.kill()  # SIGKILL: no shutdown code runs

    async def status(self, member: MemberProcess) -> dict[str, Any]:
        async with KvClient([member.client_address], attempts_per_member=1) as client:
            return await client.status()

    async def leader(self, candidates: list[MemberProcess]) -> MemberProcess:
        """The member that the candidates agree leads, once they do."""
        while True:
            with trio.move_on_after(0.5):
                for member in candidates:
                    status = await self.status(member)
                    if status["role"] == "leader":
                        return member
            await trio.sleep(0.05)

    async def wait_applied(self, member: MemberProcess, index: int) -> dict[str, Any]:
        while True:
            status = await self.status(member)
            if status["applied_index"] >= index:
                return status
            await trio.sleep(0.05)


@asynccontextmanager
async def kv_cluster(tmp_path: Path, transport: str, snapshot_threshold: int | None = None) -> AsyncIterator[KvCluster]:
    members = [
        MemberProcess(f"n{i}", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", tmp_path / f"n{i}")
        for i in (1, 2, 3)
    ]
    async with trio.open_nursery() as nursery:
        cluster = KvCluster(members, transport, nursery, snapshot_threshold)
        try:
            async with trio.open_nursery() as starting:
                for member in members:
                    starting.start_soon(cluster.start, member)
            yield cluster
        finally:
            for member in members:
                if member.process is not None and member.process.returncode is None:
                    member.process.kill()
            for member in members:
                if member.process is not None:
                    with trio.CancelScope(shield=True):
                        await member.process.wait()


async def write_stream(
    client: KvClient,
    prefix: str,
    count: int,
    acknowledged: dict[str, str],
    milestones: dict[int, trio.Event] | None = None,
    batch: int = 1,
) -> None:
    """Write `count` keys one after another; `milestones[n]` is set once n of them are acknowledged. With
    `batch`, each `batch`-th write is a `put_many` of `batch` keys instead (one log entry)."""
    i = 0
    while i < count:
        if batch > 1 and i % (2 * batch) == batch:
            items = {f"{prefix}{j}": f"v{j}" for j in range(i, min(i + batch, count))}
            await client.put_many(items)
        else:
            items = {f"{prefix}{i}": f"v{i}"}
            await client.put(*next(iter(items.items())))
        acknowledged.update(items)
        for _ in items:
            i += 1
            if milestones is not None and i in milestones:
                milestones[i].set()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_kill_9_of_the_leader_loses_nothing_acknowledged(tmp_path: Path, transport: str) -> None:
    with trio.fail_after(90):
        async with kv_cluster(tmp_path, transport) as cluster:
            addresses = [m.client_address for m in cluster.members]
            acknowledged: dict[str, str] = {}
            async with KvClient(addresses, attempts_per_member=20) as client:
                await write_stream(client, "before-", 40, acknowledged)
                leader = await cluster.leader(cluster.members)
                survivors = [m for m in cluster.members if m is not leader]

                # Kill the leader while writes are in flight on a client that talks to it.
                busy_members = [leader.client_address, *(m.client_address for m in survivors)]
                milestones = {20: trio.Event(), 80: trio.Event()}
                async with KvClient(busy_members, attempts_per_member=40) as busy, trio.open_nursery() as nursery:
                    nursery.start_soon(write_stream, busy, "during-", 10_000, acknowledged, milestones, 5)
                    await milestones[20].wait()
                    cluster.kill(leader)
                    await milestones[80].wait()
                    nursery.cancel_scope.cancel()

                new_leader = await cluster.leader(survivors)
                assert new_leader is not leader
                await write_stream(client, "after-", 40, acknowledged)

                # Everything acknowledged is there, read linearizably through the survivors.
                async with KvClient([m.client_address for m in survivors]) as reader:
                    for key, value in acknowledged.items():
                        assert await reader.get(key) == value, key

                # The killed member restarts on its data dir and catches up.
                commit = (await cluster.status(new_leader))["commit_index"]
                await cluster.start(leader)
                with trio.fail_after(20):
                    status = await cluster.wait_applied(leader, commit)
                # A write in flight when the busy client stopped may have been applied unacknowledged.
                assert status["keys"] >= len(acknowledged)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_restarted_member_catches_up_through_install_snapshot(tmp_path: Path, transport: str) -> None:
    threshold = 40
    with trio.fail_after(90):
        async with kv_cluster(tmp_path, transport, snapshot_threshold=threshold) as cluster:
            addresses = [m.client_address for m in cluster.members]
            acknowledged: dict[str, str] = {}
            async with KvClient(addresses, attempts_per_member=20) as client:
                await write_stream(client, "a-", 20, acknowledged)
                leader = await cluster.leader(cluster.members)
                lagging = next(m for m in cluster.members if m is not leader)
                behind_at = (await cluster.status(lagging))["applied_index"]
                cluster.kill(lagging)
                assert lagging.process is not None
                await lagging.process.wait()

                # While it is down, the others write and compact their logs well past where it stopped.
                await write_stream(client, "b-", 6 * threshold, acknowledged)
                leader_status = await cluster.status(leader)
                assert leader_status["snapshot_index"] - threshold > behind_at, leader_status

                await cluster.start(lagging)
                with trio.fail_after(20):
                    status = await cluster.wait_applied(lagging, leader_status["commit_index"])
                assert status["keys"] == len(acknowledged)
                # Its own log stopped at `behind_at`; the leader no longer had the entries after it, so it
                # can only have caught up through a snapshot.
                assert status["snapshot_index"] > behind_at
                async with KvClient([lagging.client_address]) as reader:
                    for key in ("a-0", f"b-{6 * threshold - 1}"):
                        assert await reader.get(key) == acknowledged[key]
