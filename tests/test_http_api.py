"""The HTTP API against a real one-member Manager (memory storage and transport) on a loopback port."""

from __future__ import annotations

import contextlib
import json
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import attrs
import h11
import pytest
import trio

import graft_trio as graft
from graft_trio.http_api import MAX_REQUEST_BODY_BYTES, MAX_REQUEST_HEAD_BYTES, serve_http
from graft_trio.manager import Manager
from transports.memory import MemoryNetwork, MemoryTransport


@attrs.define
class Named:
    name: str
    greeting: str | None = None


class Greeter(graft.Node[Named, dict[str, Any]]):
    name = "greeter"

    async def execute(self, ctx: graft.NodeContext, state: Named, config: dict[str, Any]) -> graft.NodeResult:
        return graft.NodeResult(data={"greeting": f"Hello, {state.name}!"})


class Failing(graft.Node[dict[str, Any], dict[str, Any]]):
    name = "failing"

    async def execute(self, ctx: graft.NodeContext, state: dict[str, Any], config: dict[str, Any]) -> graft.NodeResult:
        raise graft.NonRetryableError("always fails")


def make_manager(node_id: str = "solo", peers: dict[str, str] | None = None) -> Manager:
    return Manager(
        node_id,
        f"mem-{node_id}",
        None,
        transport=MemoryTransport(MemoryNetwork()),
        peers=peers,
        rng=random.Random(7),
        request_timeout=5.0,
    )


@contextlib.asynccontextmanager
async def http_server(mgr: Manager) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(serve_http, mgr, "127.0.0.1", 0)
        yield port
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def running(*nodes: graft.Node[Any, Any]) -> AsyncIterator[tuple[Manager, int]]:
    mgr = make_manager()
    for node in nodes:
        mgr.register_node(node)
    async with mgr, http_server(mgr) as port:
        await wait_for_leader(mgr)
        yield mgr, port


async def wait_for_leader(mgr: Manager) -> None:
    # A one-member cluster elects itself after one election timeout; wait on the member's own reads.
    await mgr.list_workflows(limit=0)


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def request(port: int, target: str, method: str = "GET", body: bytes = b"") -> Reply:
    """One request on a fresh connection, with an h11 client."""
    client = h11.Connection(h11.CLIENT)
    headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body)))]
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        out = client.send(h11.Request(method=method, target=target, headers=headers))
        assert out is not None
        out += client.send(h11.Data(data=body)) or b""
        out += client.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)
        return await read_reply(client, stream)


async def read_reply(client: h11.Connection, stream: trio.SocketStream) -> Reply:
    status = 0
    headers: dict[str, str] = {}
    body = b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = {name.decode(): value.decode() for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return Reply(status, headers, body)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, close our side, and read until the server closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(data)
            await stream.send_eof()
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
        return received


# --- the endpoints ----------------------------------------------------------------------------------------


async def test_health_is_200_with_the_members_health_while_it_runs() -> None:
    async with running() as (_mgr, port):
        reply = await request(port, "/health")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"serving": True, "has_leader": True, "applied_lag": 0, "healthy": True}


async def test_health_and_ready_are_503_when_the_member_does_not_run() -> None:
    mgr = make_manager()
    async with http_server(mgr) as port:
        health = await request(port, "/health")
        ready = await request(port, "/ready")
        reads = [await request(port, target) for target in ("/workflows", "/workflows/x", "/cluster")]
        metrics = await request(port, "/metrics")
    assert [reply.status for reply in reads] == [503, 503, 503]
    assert "not running" in reads[0].json()["error"]
    assert parse_prometheus(metrics.body.decode())[("graft_member_serving", frozenset())] == 0
    assert health.status == 503
    assert health.json()["serving"] is False
    assert ready.status == 503
    assert ready.json()["ready"] is False


async def test_ready_is_200_once_the_member_has_a_leader_and_caught_up() -> None:
    async with running() as (_mgr, port):
        reply = await request(port, "/ready")
    assert reply.status == 200
    assert reply.json() == {"ready": True, "leader_id": "solo"}


async def test_ready_is_503_without_a_leader() -> None:
    # Two founding peers that never answer: no quorum, so no leader is ever elected.
    mgr = make_manager("lonely", peers={"gone-1": "mem-gone-1", "gone-2": "mem-gone-2"})
    async with mgr, http_server(mgr) as port:
        ready = await request(port, "/ready")
        health = await request(port, "/health")
    assert ready.status == 503
    assert ready.json() == {"ready": False, "reason": "no leader known"}
    assert health.status == 200  # alive, only not ready
    assert health.json()["has_leader"] is False


async def test_cluster_shows_the_member_its_peers_and_registered_nodes() -> None:
    async with running(Greeter()) as (_mgr, port):
        reply = await request(port, "/cluster")
    assert reply.status == 200
    document = reply.json()
    assert document["member_id"] == "solo"
    assert document["role"] == "leader"
    assert document["leader_id"] == "solo"
    assert document["term"] >= 1
    assert document["applied_index"] >= 1
    assert document["members"] == [{"member_id": "solo", "address": "mem-solo", "voter": True}]
    assert set(document["engine"]) == {"running", "started", "committed", "dropped"}
    assert document["registered_nodes"] == ["greeter"]


async def test_workflows_lists_and_filters_by_status() -> None:
    async with running(Greeter(), Failing()) as (mgr, port):
        await mgr.start_workflow(trigger("ok", "greeter", {"name": "Ada"}))
        await mgr.start_workflow(trigger("bad", "failing", {}))
        await mgr.wait_for_workflow("ok", timeout=10)
        await mgr.wait_for_workflow("bad", timeout=10)
        everything = await request(port, "/workflows")
        completed = await request(port, "/workflows?status=completed")
        failed = await request(port, "/workflows?status=FAILED")
        paged = await request(port, "/workflows?limit=1&offset=1")
    assert everything.status == 200
    assert [w["workflow_id"] for w in everything.json()] == ["ok", "bad"]
    assert [(w["workflow_id"], w["status"]) for w in completed.json()] == [("ok", "completed")]
    [bad] = failed.json()
    assert bad["workflow_id"] == "bad" and bad["status"] == "failed" and "always fails" in bad["last_error"]
    assert set(bad) == {"workflow_id", "status", "started_at", "completed_at", "last_error"}
    assert [w["workflow_id"] for w in paged.json()] == ["bad"]


async def test_workflow_by_id_and_404_for_an_unknown_one() -> None:
    async with running(Greeter()) as (mgr, port):
        await mgr.start_workflow(trigger("wf/1 é", "greeter", {"name": "Ada"}))
        await mgr.wait_for_workflow("wf/1 é", timeout=10)
        found = await request(port, "/workflows/wf%2F1%20%C3%A9")
        missing = await request(port, "/workflows/nope")
    assert found.status == 200
    document = found.json()
    assert document["workflow_id"] == "wf/1 é"
    assert document["status"] == "completed"
    assert document["current_state"] == {"name": "Ada", "greeting": "Hello, Ada!"}
    [step] = document["executed_steps"]
    assert step["node_name"] == "greeter" and step["status"] == "completed" and step["member_id"] == "solo"
    assert missing.status == 404
    assert "nope" in missing.json()["error"]


# --- /metrics ---------------------------------------------------------------------------------------------

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*=\"(?:[^\"\\]|\\.)*\",?)*)\})?"
    r" (?P<value>[-+]?(?:[0-9.eE+-]+|Inf|NaN))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every non-comment line must be `name{labels} value`; returns {(name, labels): value}."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[1] in ("HELP", "TYPE"), line
            if parts[1] == "TYPE":
                assert parts[3] in ("gauge", "counter"), line
                typed.add(parts[2])
            continue
        match = _SAMPLE.match(line)
        assert match is not None, f"not a Prometheus sample: {line!r}"
        assert match["name"] in typed, f"sample before its TYPE line: {line!r}"
        labels = frozenset(_LABEL.findall(match["labels"] or ""))
        key = (match["name"], labels)
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(match["value"])
    return samples


def test_the_prometheus_parser_rejects_what_is_not_a_sample() -> None:
    with pytest.raises(AssertionError):
        parse_prometheus("# TYPE x gauge\nx{a=b} 1\n")
    with pytest.raises(AssertionError):
        parse_prometheus("# TYPE x gauge\nx 1 2 3\n")
    assert parse_prometheus('# TYPE x gauge\nx{a="b\\"c"} 1\n') == {("x", frozenset({("a", 'b\\"c')})): 1.0}


async def test_metrics_are_prometheus_text_with_real_numbers() -> None:
    async with running(Greeter(), Failing()) as (mgr, port):
        await mgr.start_workflow(trigger("ok", "greeter", {"name": "Ada"}))
        await mgr.start_workflow(trigger("bad", "failing", {}))
        await mgr.wait_for_workflow("ok", timeout=10)
        await mgr.wait_for_workflow("bad", timeout=10)
        reply = await request(port, "/metrics")
        info = mgr.cluster_info()
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(reply.body.decode())

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("graft_member_serving") == 1
    assert value("graft_raft_term") == info.term
    assert value("graft_raft_commit_index") >= 1
    assert value("graft_raft_applied_index") <= value("graft_raft_commit_index")
    assert value("graft_raft_role", role="leader") == 1
    assert value("graft_raft_role", role="follower") == 0
    assert value("graft_raft_leader_known") == 1
    assert value("graft_raft_members", voter="true") == 1
    assert value("graft_workflows", status="completed") == 1
    assert value("graft_workflows", status="failed") == 1
    assert value("graft_workflows", status="running") == 0
    assert value("graft_steps", state="dead") == 1
    assert value("graft_steps", state="ready") == 0
    assert value("graft_engine_steps_running") == 0
    assert value("graft_engine_attempts_started_total") == 2
    assert value("graft_engine_outcomes_committed_total") == 2


# --- what a client gets wrong -----------------------------------------------------------------------------


async def test_unknown_path_is_404_and_other_methods_are_405() -> None:
    async with running() as (_mgr, port):
        unknown = await request(port, "/nope")
        post = await request(port, "/health", method="POST", body=b"{}")
        delete = await request(port, "/workflows/x", method="DELETE")
        trailing = await request(port, "/workflows/")
    assert unknown.status == 404
    assert post.status == 405 and post.headers["allow"] == "GET"
    assert delete.status == 405
    assert trailing.status == 404


@pytest.mark.parametrize(
    "target",
    [
        "/workflows?status=sleeping",
        "/workflows?limit=-1",
        "/workflows?limit=x",
        "/workflows?colour=red",
        "/workflows?status=running&status=failed",
        "/health?x",
        "/health?verbose=1",
        "*",
    ],
)
async def test_bad_query_or_target_is_400(target: str) -> None:
    async with running() as (_mgr, port):
        reply = await request(port, target)
    assert reply.status == 400, reply
    assert reply.json()["error"]


async def test_a_garbage_request_gets_400_and_the_server_serves_the_next_one() -> None:
    async with running() as (_mgr, port):
        answer = await raw_exchange(port, b"\x00\x01garbage that is not HTTP\r\n\r\n")
        truncated = await raw_exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n")  # closed mid-request
        after = await request(port, "/health")
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert truncated.startswith(b"HTTP/1.1 400 ")  # the half-closed client may still read the answer
    assert after.status == 200


async def test_oversized_head_is_431_and_oversized_body_413() -> None:
    async with running() as (_mgr, port):
        big_head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_REQUEST_HEAD_BYTES + 1) + b"\r\n\r\n"
        head_answer = await raw_exchange(port, big_head)
        body_answer = await request(port, "/health", body=b"b" * (MAX_REQUEST_BODY_BYTES + 1))
        after = await request(port, "/health")
    assert head_answer.startswith(b"HTTP/1.1 431 ")
    assert body_answer.status == 413
    assert after.status == 200


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with running() as (_mgr, port):
        client = h11.Connection(h11.CLIENT)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        statuses = []
        async with stream:
            for target in ("/health", "/nope", "/cluster"):
                data = client.send(h11.Request(method="GET", target=target, headers=[("Host", "x")]))
                assert data is not None
                await stream.send_all(data + (client.send(h11.EndOfMessage()) or b""))
                statuses.append((await read_reply(client, stream)).status)
                client.start_next_cycle()
    assert statuses == [200, 404, 200]


async def test_a_stalled_connection_does_not_block_others() -> None:
    async with running() as (_mgr, port):
        stalled = await trio.open_tcp_stream("127.0.0.1", port)
        async with stalled:
            await stalled.send_all(b"GET /health HTTP/1.1\r\nHo")
            reply = await request(port, "/health")
    assert reply.status == 200


def trigger(workflow_id: str, node: str, state: dict[str, Any]) -> graft.WorkflowTrigger:
    return graft.WorkflowTrigger(
        workflow_id=workflow_id, initial_state=state, initial_nodes=[graft.NodeConfig(name=node)]
    )


async def test_a_manager_with_an_http_port_serves_the_api_itself() -> None:
    mgr = Manager(
        "solo",
        "mem-solo",
        None,
        transport=MemoryTransport(MemoryNetwork()),
        rng=random.Random(7),
        http_port=0,
    )
    with trio.fail_after(10):
        async with mgr:
            await wait_for_leader(mgr)
            assert mgr.http_bound_port is not None
            reply = await request(mgr.http_bound_port, "/ready")
            assert reply.status == 200, reply
            assert (await request(mgr.http_bound_port, "/cluster")).json()["member_id"] == "solo"
