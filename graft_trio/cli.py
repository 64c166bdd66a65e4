"""The `graft-trio` command (SPEC §4): `node` runs a member, `status` asks a member how the cluster is,
`demo` runs the demo from the source tree.

Every `node` flag has an environment variable (`GRAFT_NODE_ID`, ...) used when the flag is absent, so a
deployment can configure members by environment alone; a flag given on the command line wins. Errors in
the configuration are reported as one line naming the flag and its variable, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import h11
import trio

from graft_trio.http_api import serve_http
from graft_trio.manager import Manager
from graft_trio.state.events import LeaderChanged

logger = logging.getLogger("graft_trio.cli")

EXIT_OK = 0
EXIT_UNREACHABLE = 1  # status: the member did not answer
EXIT_FAILED = 1  # node: the member could not run (a port in use, ...)
EXIT_USAGE = 2
TRANSPORTS = ("tcp", "websocket", "memory")
DEMO_PATH = Path(__file__).resolve().parent.parent / "examples" / "demo.py"
MAX_STATUS_RESPONSE_BYTES = 1 << 20


class CliError(Exception):
    """A configuration or usage error: printed as one line, exit status 2."""


# --- configuration of `node` ----------------------------------------------------------------------------


@attrs.frozen
class NodeSettings:
    node_id: str
    raft_addr: str
    peers: dict[str, str]
    transport: str
    data_dir: str | None
    http_host: str
    http_port: int | None
    cluster_secret: str | None = attrs.field(repr=False)
    app: str | None
    log_level: str
    join: bool = False  # the peers are a running cluster: ask it to add this member


# flag destination -> environment variable
NODE_ENV = {
    "node_id": "GRAFT_NODE_ID",
    "raft_addr": "GRAFT_RAFT_ADDR",
    "http_host": "GRAFT_HTTP_HOST",
    "http_port": "GRAFT_HTTP_PORT",
    "data_dir": "GRAFT_DATA_DIR",
    "peers": "GRAFT_PEERS",
    "transport": "GRAFT_TRANSPORT",
    "cluster_secret": "GRAFT_CLUSTER_SECRET",
    "app": "GRAFT_APP",
    "log_level": "GRAFT_LOG_LEVEL",
    "join": "GRAFT_JOIN",
}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _setting(args: argparse.Namespace, environ: Mapping[str, str], dest: str, default: str | None = None) -> str | None:
    value = getattr(args, dest)
    if value is None:
        value = environ.get(NODE_ENV[dest]) or None
    return default if value is None else str(value)


def _required(args: argparse.Namespace, environ: Mapping[str, str], dest: str) -> str:
    value = _setting(args, environ, dest)
    if value is None or not value.strip():
        raise CliError(f"{_flag(dest)} (or {NODE_ENV[dest]}) is required")
    return value.strip()


def parse_port(text: str, what: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise CliError(f"{what} must be a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise CliError(f"{what} must be a port number in 0..65535, got {port}")
    return port


def check_host_port(address: str, what: str) -> None:
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise CliError(f"{what} must be host:port, got {address!r}")
    parse_port(port, what)


def parse_peers(text: str, *, network: bool = True) -> dict[str, str]:
    """Peers written ``node-2@127.0.0.1:7101,node-3@127.0.0.1:7102`` (empty: none). With `network`,
    every address must be host:port."""
    peers: dict[str, str] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        node_id, at, address = item.partition("@")
        node_id, address = node_id.strip(), address.strip()
        if not at or not node_id or not address:
            raise CliError(
                f"peer {item!r} is not written id@address; peers are written "
                "node-2@127.0.0.1:7101,node-3@127.0.0.1:7102"
            )
        if network:
            check_host_port(address, f"the address of peer {node_id!r}")
        if node_id in peers:
            raise CliError(f"peer {node_id!r} is listed twice")
        peers[node_id] = address
    return peers


def node_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> NodeSettings:
    """The `node` command's settings: each flag, else its environment variable, else its default."""
    node_id = _required(args, environ, "node_id")
    raft_addr = _required(args, environ, "raft_addr")
    transport = (_setting(args, environ, "transport", "tcp") or "tcp").strip()
    if transport not in TRANSPORTS:
        raise CliError(f"--transport (or GRAFT_TRANSPORT) must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
    network = transport != "memory"
    if network:
        check_host_port(raft_addr, "--raft-addr (or GRAFT_RAFT_ADDR)")
    peers = parse_peers(_setting(args, environ, "peers", "") or "", network=network)
    if node_id in peers:
        # One GRAFT_PEERS list for the whole cluster is convenient: this member's own entry is dropped.
        if peers[node_id] != raft_addr:
            raise CliError(
                f"--peers lists this member {node_id!r} at {peers[node_id]!r}, but --raft-addr is {raft_addr!r}"
            )
        del peers[node_id]
    http_port_text = _setting(args, environ, "http_port")
    http_port = None
    if http_port_text is not None and http_port_text.strip():
        http_port = parse_port(http_port_text.strip(), "--http-port (or GRAFT_HTTP_PORT)")
    log_level = (_setting(args, environ, "log_level", "INFO") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise CliError(f"--log-level (or GRAFT_LOG_LEVEL) must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    join_text = (_setting(args, environ, "join", "") or "").strip().lower()
    if join_text not in ("", "0", "1", "false", "true", "no", "yes", "off", "on"):
        raise CliError(f"--join (or GRAFT_JOIN) must be 1 or 0 (true/false, yes/no, on/off), got {join_text!r}")
    return NodeSettings(
        node_id=node_id,
        raft_addr=raft_addr,
        peers=peers,
        transport=transport,
        data_dir=_setting(args, environ, "data_dir"),
        http_host=_setting(args, environ, "http_host", "127.0.0.1") or "127.0.0.1",
        http_port=http_port,
        cluster_secret=_setting(args, environ, "cluster_secret"),
        app=_setting(args, environ, "app"),
        log_level=log_level,
        join=join_text in ("1", "true", "yes", "on"),
    )


AppFunction = Callable[[Manager], Any]


def load_app(spec: str) -> AppFunction:
    """The function named by ``module:function`` (``package.module:object.attribute`` also works)."""
    module_name, colon, attribute_path = spec.partition(":")
    module_name, attribute_path = module_name.strip(), attribute_path.strip()
    if not colon or not module_name or not attribute_path:
        raise CliError(f"--app must be written module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CliError(
                f"--app {spec}: no module named {exc.name!r} (searched sys.path, which starts with the "
                f"current directory {os.getcwd()!r})"
            ) from None
        raise CliError(f"--app {spec}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise CliError(f"--app {spec}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from exc
    target: Any = module
    for part in attribute_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise CliError(f"--app {spec}: module {module_name!r} has no attribute {attribute_path!r}") from None
    if not callable(target):
        raise CliError(f"--app {spec}: {attribute_path!r} is a {type(target).__name__}, not a function")
    function: AppFunction = target
    return function


async def _setup_app(app: AppFunction, manager: Manager) -> None:
    """Call the user's function with the Manager (before it starts); it may be sync or async."""
    result = app(manager)
    if inspect.isawaitable(result):
        await result


def build_manager(settings: NodeSettings) -> Manager:
    return Manager(
        settings.node_id,
        settings.raft_addr,
        settings.data_dir,
        transport=settings.transport,
        peers=settings.peers,
        join=settings.join,
        cluster_secret=settings.cluster_secret,
    )


async def run_node(
    settings: NodeSettings,
    app: AppFunction | None,
    *,
    task_status: trio.TaskStatus[int | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one member until SIGTERM or SIGINT, then leave gracefully (`Manager.__aexit__`: running
    attempts are handed back). `task_status.started` gets the bound HTTP port (None without HTTP)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        manager = build_manager(settings)
        manager.on(LeaderChanged, _print_leader)
        if app is not None:
            try:
                await _setup_app(app, manager)
            except Exception as exc:  # a node the registry refuses, a bug in the user's function
                raise CliError(f"--app {settings.app} raised {type(exc).__name__}: {exc}") from exc
        async with manager, trio.open_nursery() as nursery:
            http_port: int | None = None
            if settings.http_port is not None:
                http_port = await nursery.start(serve_http, manager, settings.http_host, settings.http_port)
            where = f", HTTP API on http://{settings.http_host}:{http_port}" if http_port is not None else ""
            print(f"graft-trio node {settings.node_id} running: raft on {settings.raft_addr}{where}", flush=True)
            task_status.started(http_port)
            async for signum in signals:
                logger.info("member %s: %s received, leaving", settings.node_id, signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    print(f"graft-trio node {settings.node_id} stopped", flush=True)


def _print_leader(event: LeaderChanged) -> None:
    """One stdout line per change of leader, for the person or the script that watches the member."""
    leader = event.leader_id if event.leader_id is not None else "none known"
    print(f"leader: {leader} (term {event.term})", flush=True)


def command_node(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    settings = node_settings(args, environ)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.data_dir is None:
        logger.warning("no --data-dir (or GRAFT_DATA_DIR): the log is kept in memory and lost when the member stops")
    app = None
    if settings.app is not None:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # `--app mymodule:setup` finds ./mymodule.py, as `python -m` would
        app = load_app(settings.app)
    try:
        trio.run(run_node, settings, app)
    except (OSError, BaseExceptionGroup) as exc:
        # A port in use, a data directory we may not write...: one line, not a traceback of the nurseries.
        errors = _only_os_errors(exc)
        if errors is None:
            raise
        print(f"graft-trio node: cannot run member {settings.node_id}: {'; '.join(errors)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _only_os_errors(exc: BaseException) -> list[str] | None:
    """The messages of the OSErrors `exc` is made of, or None if it holds anything else."""
    if isinstance(exc, BaseExceptionGroup):
        messages: list[str] = []
        for inner in exc.exceptions:
            found = _only_os_errors(inner)
            if found is None:
                return None
            messages.extend(found)
        return messages
    return [str(exc)] if isinstance(exc, OSError) else None


# --- `status` -----------------------------------------------------------------------------------------------


class Unreachable(Exception):
    pass


def parse_http_address(text: str) -> tuple[str, int]:
    address = text.strip()
    for scheme in ("http://", "HTTP://"):
        if address.startswith(scheme):
            address = address[len(scheme) :]
    address = address.rstrip("/")
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        raise CliError(f"--http must be host:port, got {text!r}")
    return host.strip("[]"), parse_port(port, "--http")


async def http_get_json(host: str, port: int, target: str, timeout: float) -> tuple[int, Any]:
    """GET `target` and decode its JSON body; `Unreachable` if that fails for any reason."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                client = h11.Connection(h11.CLIENT)
                request = client.send(
                    h11.Request(method="GET", target=target, headers=[("Host", host), ("Connection", "close")])
                )
                assert request is not None
                await stream.send_all(request + (client.send(h11.EndOfMessage()) or b""))
                status = 0
                body = bytearray()
                while True:
                    event = client.next_event()
                    if event is h11.NEED_DATA:
                        client.receive_data(bytes(await stream.receive_some(65536)))
                    elif isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_STATUS_RESPONSE_BYTES:
                            raise Unreachable(f"{target}: response larger than {MAX_STATUS_RESPONSE_BYTES} bytes")
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        break
        return status, json.loads(body)
    except trio.TooSlowError:
        raise Unreachable(f"no answer from {host}:{port} within {timeout} s") from None
    except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
        raise Unreachable(f"cannot reach {host}:{port}: {exc}") from None
    except ValueError as exc:
        raise Unreachable(f"{host}:{port}{target} did not answer JSON: {exc}") from None


def format_status(cluster: Mapping[str, Any], health: Mapping[str, Any]) -> str:
    """The answers of /cluster and /health, for a person."""
    member_id = cluster["member_id"]
    leader = cluster.get("leader_id") or "none known"
    verdict = "healthy" if health.get("healthy") else "UNHEALTHY"
    details = [
        "serving" if health.get("serving") else "not serving",
        "leader known" if health.get("has_leader") else "no leader",
        f"applied lag {health.get('applied_lag', '?')}",
    ]
    lines = [
        f"member    {member_id} ({cluster['role']}, term {cluster['term']})",
        f"health    {verdict} ({', '.join(details)})",
        f"leader    {leader}",
        f"log       commit {cluster['commit_index']}, applied {cluster['applied_index']}",
    ]
    engine = cluster.get("engine") or {}
    if engine:
        lines.append(
            f"engine    {engine.get('running', 0)} running, {engine.get('started', 0)} started, "
            f"{engine.get('committed', 0)} committed, {engine.get('dropped', 0)} dropped"
        )
    nodes = cluster.get("registered_nodes")
    if nodes is not None:
        lines.append(f"nodes     {', '.join(nodes) if nodes else '(none registered)'}")
    members = cluster.get("members", [])
    lines.append(f"members   {len(members)}")
    width = max((len(m["member_id"]) for m in members), default=0)
    for member in members:
        tags = ["voter" if member["voter"] else "learner"]
        if member["member_id"] == cluster.get("leader_id"):
            tags.append("leader")
        if member["member_id"] == member_id:
            tags.append("this member")
        lines.append(f"  {member['member_id']:<{width}}  {member['address']}  {', '.join(tags)}")
    return "\n".join(lines)


def command_status(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    host, port = parse_http_address(args.http)
    try:
        (_, cluster), (_, health) = trio.run(_fetch_status, host, port, args.timeout)
    except Unreachable as exc:
        print(f"graft-trio status: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps({"cluster": cluster, "health": health}, indent=2))
    else:
        try:
            print(format_status(cluster, health))
        except (KeyError, TypeError) as exc:
            print(f"graft-trio status: unexpected answer from {host}:{port}: {exc!r}", file=sys.stderr)
            return EXIT_UNREACHABLE
    return EXIT_OK


async def _fetch_status(host: str, port: int, timeout: float) -> tuple[tuple[int, Any], tuple[int, Any]]:
    cluster = await http_get_json(host, port, "/cluster", timeout)
    if cluster[0] != 200:
        raise Unreachable(f"{host}:{port}/cluster answered {cluster[0]}: {cluster[1]}")
    health = await http_get_json(host, port, "/health", timeout)  # 503 is an answer too: not serving
    return cluster, health


# --- `demo` -------------------------------------------------------------------------------------------------


def command_demo(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    if not DEMO_PATH.is_file():
        print(
            f"graft-trio demo: the demo is examples/demo.py in the graft-trio source tree, and it is not next to "
            f"this installation ({DEMO_PATH}). Clone the repository and run `make demo`, or "
            "`python examples/demo.py` from its top directory.",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return subprocess.call([sys.executable, str(DEMO_PATH), *args.demo_args])


# --- the parser ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graft-trio", description="graft-trio: a workflow engine replicated by Raft.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{node,status,demo}")

    node = commands.add_parser(
        "node",
        help="run a cluster member",
        description="Run one member of a graft-trio cluster until SIGTERM or SIGINT. Every flag falls back to "
        "the environment variable named in its help.",
    )
    node.add_argument("--node-id", help="this member's id, unique in the cluster (GRAFT_NODE_ID)")
    node.add_argument("--raft-addr", help="host:port the member listens on for Raft (GRAFT_RAFT_ADDR)")
    node.add_argument(
        "--peers", help="the other founding members: node-2@127.0.0.1:7101,node-3@127.0.0.1:7102 (GRAFT_PEERS)"
    )
    node.add_argument(
        "--join",
        action="store_const",
        const="1",
        help="join the running cluster whose members --peers lists, instead of founding one (GRAFT_JOIN=1)",
    )
    node.add_argument("--transport", help=f"one of {', '.join(TRANSPORTS)}; default tcp (GRAFT_TRANSPORT)")
    node.add_argument("--data-dir", help="where the log and snapshots are kept; default: memory (GRAFT_DATA_DIR)")
    node.add_argument("--http-port", help="serve the HTTP API on this port; 0 for any (GRAFT_HTTP_PORT)")
    node.add_argument("--http-host", help="address the HTTP API binds; default 127.0.0.1 (GRAFT_HTTP_HOST)")
    node.add_argument(
        "--cluster-secret", help="shared secret members authenticate each other with (GRAFT_CLUSTER_SECRET)"
    )
    node.add_argument(
        "--app", help="module:function called with the Manager to register nodes and connectors (GRAFT_APP)"
    )
    node.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR; default INFO (GRAFT_LOG_LEVEL)")
    node.set_defaults(handler=command_node)

    status = commands.add_parser("status", help="show a member's view of the cluster (via its HTTP API)")
    status.add_argument("--http", required=True, metavar="HOST:PORT", help="the member's HTTP API, e.g. 127.0.0.1:8080")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the member (default 5)")
    status.add_argument("--json", action="store_true", help="print the raw JSON of /cluster and /health")
    status.set_defaults(handler=command_status)

    demo = commands.add_parser(
        "demo",
        help="run examples/demo.py from the source tree",
        description="Run examples/demo.py from the source tree; any further arguments are passed on to it.",
    )
    demo.set_defaults(handler=command_demo)
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The `graft-trio` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":
        args.demo_args = extra  # everything after `demo` is the demo's
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Callable[[argparse.Namespace, Mapping[str, str]], int] = args.handler
    try:
        return handler(args, os.environ if environ is None else environ)
    except CliError as exc:
        print(f"graft-trio {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
