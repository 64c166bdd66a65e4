"""The member's HTTP API (SPEC §4): health, readiness, Prometheus metrics and JSON views of the cluster and
its workflows, read-only, over HTTP/1.1.

Two halves, the way h11 splits protocol from I/O: `respond` turns one request (method and target) into a
`Response` using only the Manager's reads, and `serve_http` is the trio plumbing around it: one task per
connection under the listener's nursery, h11 for parsing, limits on what a client may send, and a timeout
on clients that send nothing. A connection that sends garbage gets a 4xx and is closed; nothing it does
reaches the other connections or the member.

Endpoints (all ``GET``; see docs/API.md):

- ``/health``: 200 while the member runs (JSON of `Manager.health()`), 503 once it does not;
- ``/ready``: 200 once the member knows a leader and has applied everything the leader had committed when
  asked (a ReadIndex barrier), else 503;
- ``/metrics``: Prometheus text exposition of this member's Raft, queue and engine numbers;
- ``/cluster``: JSON of `Manager.cluster_info()`, plus the node names this member has registered;
- ``/workflows?status=&limit=&offset=``: JSON list of workflow summaries (a linearizable read);
- ``/workflows/<id>``: JSON of `Manager.get_workflow(id)` (404 if there is none).
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import cattrs
import h11
import trio

from graft_trio.raft.errors import RaftError
from graft_trio.state import commands as c
from graft_trio.workflow.types import WorkflowNotFoundError, WorkflowStatus

if TYPE_CHECKING:
    from graft_trio.manager import Manager

logger = logging.getLogger(__name__)

MAX_REQUEST_HEAD_BYTES = 16 * 1024  # request line and headers; beyond it: 431
MAX_REQUEST_BODY_BYTES = 4 * 1024  # every endpoint is a GET: a body is read and ignored up to this; beyond: 413
IDLE_TIMEOUT = 10.0  # seconds a connection may go without sending anything before it is closed
READ_TIMEOUT = 10.0  # a read (/workflows) that the cluster cannot serve in this time is a 503
READY_TIMEOUT = 2.0  # how long /ready waits for its ReadIndex barrier before answering 503
MAX_LIST_LIMIT = 1000
RECEIVE_BYTES = 16 * 1024
SERVER_NAME = b"graft-trio"

RAFT_ROLES = ("follower", "pre-candidate", "candidate", "leader")
_json_converter = cattrs.Converter()


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, document: Any) -> Response:
    body = json.dumps(document, allow_nan=False, separators=(",", ":"), sort_keys=False).encode() + b"\n"
    return Response(status, body)


def error_response(status: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    response = json_response(status, {"error": message})
    return attrs.evolve(response, headers=headers)


def to_json(value: Any) -> Any:
    """A JSON-ready document from the Manager's attrs views (enums become their values)."""
    return _json_converter.unstructure(value)


# --- the protocol half: one request in, one response out ----------------------------------------------------


async def respond(manager: Manager, method: str, target: str) -> Response:
    """The response to ``method target``. Never raises for anything the client sent; an error of the member
    (no quorum, stopped) is a 503, a bug is a 500."""
    if not target.startswith("/"):
        return error_response(400, "the request target must be an absolute path")
    path, _, query_string = target.partition("?")
    try:
        query = urllib.parse.parse_qs(query_string, keep_blank_values=True, strict_parsing=bool(query_string))
    except ValueError:
        return error_response(400, f"malformed query string {query_string!r}")
    handler: _Handler
    if path in _ROUTES:
        handler = _ROUTES[path]
        argument = None
    elif path.startswith("/workflows/") and len(path) > len("/workflows/"):
        handler = _get_workflow
        argument = urllib.parse.unquote(path[len("/workflows/") :])
    else:
        return error_response(404, f"no such endpoint: {path}")
    if method != "GET":
        return error_response(405, f"{method} is not allowed here; use GET", headers=(("Allow", "GET"),))
    try:
        with manager.clock.move_on_after(READ_TIMEOUT):
            return await handler(manager, query, argument)
        return error_response(503, f"the member could not answer within {READ_TIMEOUT} s (no quorum?)")
    except _BadRequest as exc:
        return error_response(400, str(exc))
    except WorkflowNotFoundError as exc:
        return error_response(404, str(exc))
    except (RaftError, TimeoutError) as exc:
        return error_response(503, f"the member cannot answer now: {type(exc).__name__}: {exc}")


class _BadRequest(Exception):
    pass


_Handler = Callable[["Manager", Mapping[str, list[str]], str | None], Awaitable[Response]]


def _no_parameters(query: Mapping[str, list[str]], allowed: Iterable[str] = ()) -> None:
    unknown = sorted(set(query) - set(allowed))
    if unknown:
        raise _BadRequest(f"unknown query parameter(s): {', '.join(unknown)}")


def _one(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    if values is None:
        return None
    if len(values) != 1:
        raise _BadRequest(f"query parameter {name!r} given {len(values)} times")
    return values[0]


def _integer(query: Mapping[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    text = _one(query, name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise _BadRequest(f"{name} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise _BadRequest(f"{name} must be between {low} and {high}, got {value}")
    return value


async def _health(manager: Manager, query: Mapping[str, list[str]], _argument: str | None) -> Response:
    _no_parameters(query)
    health = manager.health()
    document = {**to_json(health), "healthy": health.healthy}
    return json_response(200 if health.serving else 503, document)


async def _ready(manager: Manager, query: Mapping[str, list[str]], _argument: str | None) -> Response:
    _no_parameters(query)
    health = manager.health()
    if not health.serving:
        return json_response(503, {"ready": False, "reason": "the member is not running"})
    if not health.has_leader:
        return json_response(503, {"ready": False, "reason": "no leader known"})
    # ReadIndex: answered once this member has applied what the leader had committed when we asked.
    with manager.clock.move_on_after(READY_TIMEOUT):
        try:
            await manager.read_barrier(timeout=READY_TIMEOUT)
        except (RaftError, TimeoutError) as exc:
            return json_response(503, {"ready": False, "reason": f"read barrier failed: {type(exc).__name__}"})
        return json_response(200, {"ready": True, "leader_id": manager.cluster_info().leader_id})
    return json_response(503, {"ready": False, "reason": f"not caught up with the leader within {READY_TIMEOUT} s"})


async def _metrics(manager: Manager, query: Mapping[str, list[str]], _argument: str | None) -> Response:
    _no_parameters(query)
    body = render_metrics(manager).encode()
    return Response(200, body, content_type="text/plain; version=0.0.4; charset=utf-8")


async def _cluster(manager: Manager, query: Mapping[str, list[str]], _argument: str | None) -> Response:
    _no_parameters(query)
    document = to_json(manager.cluster_info())
    document["registered_nodes"] = sorted(registered.name for registered in manager.registry)
    return json_response(200, document)


async def _list_workflows(manager: Manager, query: Mapping[str, list[str]], _argument: str | None) -> Response:
    _no_parameters(query, ("status", "limit", "offset"))
    status_text = _one(query, "status")
    status = None
    if status_text is not None:
        try:
            status = WorkflowStatus(status_text.lower())
        except ValueError:
            choices = ", ".join(s.value for s in WorkflowStatus)
            raise _BadRequest(f"status must be one of {choices}, got {status_text!r}") from None
    limit = _integer(query, "limit", MAX_LIST_LIMIT, 0, MAX_LIST_LIMIT)
    offset = _integer(query, "offset", 0, 0, 2**62)
    summaries = await manager.list_workflows(status, limit=limit, offset=offset)
    return json_response(200, to_json(summaries))


async def _get_workflow(manager: Manager, query: Mapping[str, list[str]], workflow_id: str | None) -> Response:
    _no_parameters(query)
    assert workflow_id is not None
    state = await manager.get_workflow(workflow_id)
    return json_response(200, to_json(state))


_ROUTES: dict[str, _Handler] = {
    "/health": _health,
    "/ready": _ready,
    "/metrics": _metrics,
    "/cluster": _cluster,
    "/workflows": _list_workflows,
}


# --- Prometheus text ------------------------------------------------------------------------------------------


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Exposition:
    """Prometheus text format 0.0.4: a HELP and a TYPE line per family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            rendered = ",".join(f'{key}="{_label_value(label)}"' for key, label in labels.items())
            self.lines.append(f"{name}{{{rendered}}} {_number(value)}" if rendered else f"{name} {_number(value)}")

    def one(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(manager: Manager) -> str:
    """This member's metrics, from its own applied state (no round trip: a scrape never waits for Raft)."""
    out = _Exposition()
    health = manager.health()
    out.one("graft_member_serving", "gauge", "1 while the member runs.", health.serving)
    status = manager.raft.status() if health.serving else None
    if status is not None:
        out.one("graft_raft_term", "gauge", "The member's current Raft term.", status.term)
        out.one("graft_raft_commit_index", "gauge", "Highest log index known to be committed.", status.commit_index)
        out.one("graft_raft_applied_index", "gauge", "Highest log index applied on this member.", status.applied_index)
        out.one("graft_raft_last_index", "gauge", "Index of the last entry in this member's log.", status.last_index)
        out.one("graft_raft_snapshot_index", "gauge", "Index of the member's latest snapshot.", status.snapshot_index)
        roles = [*RAFT_ROLES, *([status.role] if status.role not in RAFT_ROLES else [])]
        out.family(
            "graft_raft_role",
            "gauge",
            "1 for the member's current Raft role, 0 for the others.",
            [({"role": role}, role == status.role) for role in roles],
        )
        out.one("graft_raft_leader_known", "gauge", "1 if the member knows a leader.", status.leader_id is not None)
        voters = sum(1 for member in status.members if member.voter)
        out.family(
            "graft_raft_members",
            "gauge",
            "Members of the configuration in force on this member.",
            [({"voter": "true"}, voters), ({"voter": "false"}, len(status.members) - voters)],
        )
    stats = manager.state_machine.answer(c.Stats())
    if isinstance(stats, c.StatsView):
        out.family(
            "graft_workflows",
            "gauge",
            "Workflows in the replicated state, by status (as applied on this member).",
            [({"status": s.value}, stats.workflows.get(s.value, 0)) for s in WorkflowStatus],
        )
        out.family(
            "graft_steps",
            "gauge",
            "Steps in the replicated queue, by state (as applied on this member).",
            [
                ({"state": "ready"}, stats.ready),
                ({"state": "delayed"}, stats.delayed),
                ({"state": "claimed"}, stats.claimed),
                ({"state": "parked"}, stats.parked),
                ({"state": "dead"}, stats.dead),
            ],
        )
    depth = manager.state_machine.answer(c.QueueDepth())
    if isinstance(depth, c.QueueDepthView) and depth.nodes:
        out.family(
            "graft_queue_ready_steps",
            "gauge",
            "Claimable steps by node name (queue depth).",
            [({"node": node.node_name}, node.ready) for node in depth.nodes],
        )
    engine = manager.engine.stats()
    out.one("graft_engine_steps_running", "gauge", "Step attempts running on this member now.", engine.running)
    out.one("graft_engine_attempts_started_total", "counter", "Step attempts begun on this member.", engine.started)
    out.one(
        "graft_engine_outcomes_committed_total",
        "counter",
        "Outcomes of this member's attempts accepted by the log.",
        engine.committed,
    )
    out.one(
        "graft_engine_outcomes_dropped_total",
        "counter",
        "Outcomes of this member's attempts dropped (claim lost or revoked, attempt cancelled).",
        engine.dropped,
    )
    return out.text()


# --- the trio half ----------------------------------------------------------------------------------------------


async def serve_http(
    manager: Manager, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the HTTP API on `host`:`port` until cancelled. `await nursery.start(serve_http, ...)` returns
    the bound port once the listener accepts (pass port 0 for any free port)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        bound_port = int(listeners[0].socket.getsockname()[1])
    except BaseException:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
        raise
    logger.info("member %s: HTTP API on %s:%d", manager.node_id, host, bound_port)
    task_status.started(bound_port)

    async def handle(stream: trio.SocketStream) -> None:
        await serve_connection(manager, stream)

    await trio.serve_listeners(handle, listeners)


async def serve_connection(manager: Manager, stream: trio.abc.Stream) -> None:
    """Answer requests on one connection until the client closes it, goes idle or breaks the protocol.
    Never raises (but for cancellation): a failure here must not take down the listener's nursery."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    try:
        async with stream:
            while await _one_exchange(manager, connection, stream):
                connection.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    except Exception:
        logger.exception("member %s: HTTP connection failed", manager.node_id)


async def _one_exchange(manager: Manager, connection: h11.Connection, stream: trio.abc.Stream) -> bool:
    """Read one request and answer it; whether the connection may carry another."""
    try:
        request = await _next_event(manager, connection, stream)
        if request is None:
            return False
        assert isinstance(request, h11.Request), request
        # h11 enforces its limit only on a head still incomplete in its buffer; one that arrived whole
        # in a single read is measured here.
        head_bytes = len(request.target) + sum(len(name) + len(value) + 4 for name, value in request.headers)
        if head_bytes > MAX_REQUEST_HEAD_BYTES:
            await _send(connection, stream, error_response(431, "request head too large"), close=True)
            return False
        body_bytes = 0
        while True:
            event = await _next_event(manager, connection, stream)
            if event is None:
                return False
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.Data):
                body_bytes += len(event.data)
                if body_bytes > MAX_REQUEST_BODY_BYTES:
                    await _send(connection, stream, error_response(413, "request body too large"), close=True)
                    return False
    except h11.RemoteProtocolError as exc:
        if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            status = exc.error_status_hint if exc.error_status_hint >= 400 else 400
            await _send(connection, stream, error_response(status, f"bad request: {exc}"), close=True)
        return False
    try:
        response = await respond(manager, request.method.decode("ascii"), request.target.decode("ascii"))
    except UnicodeDecodeError:
        response = error_response(400, "the request line must be ASCII")
    except Exception:
        logger.exception("member %s: HTTP %r failed", manager.node_id, request.target)
        response = error_response(500, "internal error (logged on the member)")
    await _send(connection, stream, response, close=False)
    return connection.our_state is h11.DONE and connection.their_state is h11.DONE


async def _next_event(manager: Manager, connection: h11.Connection, stream: trio.abc.Stream) -> Any:
    """The next h11 event, or None when the client closed or went idle too long."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            with manager.clock.move_on_after(IDLE_TIMEOUT):
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    connection.receive_data(b"")  # so that h11 tells a truncated request from a clean close
                    continue
                connection.receive_data(bytes(data))
                continue
            return None  # idle
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        return event


async def _send(connection: h11.Connection, stream: trio.abc.Stream, response: Response, *, close: bool) -> None:
    headers = [
        ("Content-Type", response.content_type),
        ("Content-Length", str(len(response.body))),
        ("Cache-Control", "no-store"),
        ("Server", SERVER_NAME.decode()),
        *response.headers,
    ]
    if close:
        headers.append(("Connection", "close"))
    data = connection.send(h11.Response(status_code=response.status, headers=headers))
    assert data is not None
    body = connection.send(h11.Data(data=response.body))
    end = connection.send(h11.EndOfMessage())
    await stream.send_all(data + (body or b"") + (end or b""))
