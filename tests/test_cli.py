"""The `graft-trio` command: settings from flags and environment, --app loading, and a real member run as
a subprocess (TCP transport, HTTP API) that `status` reads and SIGTERM stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio

from graft_trio import cli
from graft_trio.cli import CliError, load_app, main, node_settings, parse_peers

REPO = Path(__file__).resolve().parent.parent


def settings(argv: list[str], environ: dict[str, str] | None = None) -> cli.NodeSettings:
    args = cli.build_parser().parse_args(["node", *argv])
    return node_settings(args, environ or {})


# --- settings ---------------------------------------------------------------------------------------------


def test_flags_alone_configure_a_member() -> None:
    s = settings(
        [
            "--node-id",
            "node-1",
            "--raft-addr",
            "127.0.0.1:7100",
            "--peers",
            "node-2@127.0.0.1:7101",
            "--http-port",
            "8080",
            "--data-dir",
            "/data",
            "--transport",
            "websocket",
            "--cluster-secret",
            "s3",
        ]
    )
    assert (s.node_id, s.raft_addr, s.peers) == ("node-1", "127.0.0.1:7100", {"node-2": "127.0.0.1:7101"})
    assert (s.http_port, s.data_dir, s.transport, s.cluster_secret) == (8080, "/data", "websocket", "s3")
    assert "s3" not in repr(s)  # the secret stays out of logs


def test_environment_is_used_when_a_flag_is_absent() -> None:
    environ = {
        "GRAFT_NODE_ID": "env-node",
        "GRAFT_RAFT_ADDR": "10.0.0.1:7100",
        "GRAFT_HTTP_PORT": "9000",
        "GRAFT_DATA_DIR": "/var/lib/graft",
        "GRAFT_PEERS": "b@10.0.0.2:7100,c@10.0.0.3:7100",
        "GRAFT_TRANSPORT": "websocket",
        "GRAFT_CLUSTER_SECRET": "from-env",
    }
    s = settings([], environ)
    assert s.node_id == "env-node" and s.raft_addr == "10.0.0.1:7100"
    assert s.http_port == 9000 and s.data_dir == "/var/lib/graft" and s.transport == "websocket"
    assert s.peers == {"b": "10.0.0.2:7100", "c": "10.0.0.3:7100"}
    assert s.cluster_secret == "from-env"


def test_a_flag_wins_over_its_environment_variable() -> None:
    environ = {
        "GRAFT_NODE_ID": "env-node",
        "GRAFT_RAFT_ADDR": "10.0.0.1:7100",
        "GRAFT_HTTP_PORT": "9000",
        "GRAFT_TRANSPORT": "websocket",
        "GRAFT_PEERS": "b@10.0.0.2:7100",
    }
    s = settings(["--node-id", "flag-node", "--http-port", "9100", "--transport", "tcp", "--peers", ""], environ)
    assert (s.node_id, s.raft_addr, s.http_port) == ("flag-node", "10.0.0.1:7100", 9100)
    assert (s.transport, s.peers) == ("tcp", {})  # an empty --peers still wins


def test_defaults() -> None:
    s = settings(["--node-id", "a", "--raft-addr", "127.0.0.1:7100"])
    assert (s.transport, s.peers, s.http_port, s.data_dir, s.http_host) == ("tcp", {}, None, None, "127.0.0.1")


def test_own_entry_in_peers_is_dropped_but_must_match_the_raft_address() -> None:
    s = settings(["--node-id", "a", "--raft-addr", "h:1", "--peers", "a@h:1,b@h:2"])
    assert s.peers == {"b": "h:2"}
    with pytest.raises(CliError, match="lists this member 'a' at 'h:9'"):
        settings(["--node-id", "a", "--raft-addr", "h:1", "--peers", "a@h:9,b@h:2"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--raft-addr", "h:1"], r"--node-id \(or GRAFT_NODE_ID\) is required"),
        (["--node-id", "a"], r"--raft-addr \(or GRAFT_RAFT_ADDR\) is required"),
        (["--node-id", "a", "--raft-addr", "nohost"], "must be host:port"),
        (["--node-id", "a", "--raft-addr", "h:1", "--http-port", "http"], "must be a port number"),
        (["--node-id", "a", "--raft-addr", "h:1", "--http-port", "70000"], "in 0..65535"),
        (["--node-id", "a", "--raft-addr", "h:1", "--transport", "carrier-pigeon"], "must be one of tcp, websocket"),
    ],
)
def test_bad_settings_name_the_flag_and_variable(argv: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message):
        settings(argv)


def test_peers_format() -> None:
    assert parse_peers("") == {}
    assert parse_peers(" node-2@127.0.0.1:7101 , node-3@127.0.0.1:7102,") == {
        "node-2": "127.0.0.1:7101",
        "node-3": "127.0.0.1:7102",
    }
    assert parse_peers("m@anything", network=False) == {"m": "anything"}  # the memory transport's addresses


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node-2=127.0.0.1:7101", "is not written id@address; peers are written node-2@127.0.0.1:7101,node-3@"),
        ("@127.0.0.1:7101", "is not written id@address"),
        ("node-2@", "is not written id@address"),
        ("node-2@127.0.0.1", "the address of peer 'node-2' must be host:port"),
        ("node-2@127.0.0.1:port", "must be a port number"),
        ("a@h:1,a@h:2", "peer 'a' is listed twice"),
    ],
)
def test_bad_peers_are_refused_with_the_expected_format(text: str, message: str) -> None:
    with pytest.raises(CliError, match=message):
        parse_peers(text)


def test_main_reports_a_bad_setting_in_one_line_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["node", "--raft-addr", "h:1"], environ={}) == 2
    assert capsys.readouterr().err == "graft-trio node: error: --node-id (or GRAFT_NODE_ID) is required\n"


# --- --app ------------------------------------------------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "good_app.py").write_text("def setup(manager):\n    manager.seen = True\nvalue = 3\n")
    (tmp_path / "broken_app.py").write_text("import not_a_module_anywhere_xyz\n")
    (tmp_path / "raising_app.py").write_text("raise RuntimeError('boom at import')\n")
    (tmp_path / "refused_app.py").write_text("def setup(manager):\n    manager.register_node(object())\n")
    return tmp_path


def test_app_loads_a_function(app_dir: Path) -> None:
    function = load_app("good_app:setup")

    class Target:
        seen = False

    target: Any = Target()
    function(target)
    assert target.seen is True


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("good_app", "must be written module:function"),
        ("good_app:", "must be written module:function"),
        ("no_such_module_xyz:setup", "no module named 'no_such_module_xyz'"),
        ("good_app:missing", "module 'good_app' has no attribute 'missing'"),
        ("good_app:value", "'value' is a int, not a function"),
        ("broken_app:setup", "importing 'broken_app' failed: No module named 'not_a_module_anywhere_xyz'"),
        ("raising_app:setup", "importing 'raising_app' failed: RuntimeError: boom at import"),
    ],
)
def test_app_loading_errors_are_clear(app_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(CliError, match=message):
        load_app(spec)


# --- demo -------------------------------------------------------------------------------------------------


def test_demo_without_the_source_tree_says_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "DEMO_PATH", tmp_path / "examples" / "demo.py")
    assert main(["demo"]) == 2
    assert "examples/demo.py in the graft-trio source tree" in capsys.readouterr().err


def test_demo_runs_the_demo_with_its_arguments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = tmp_path / "demo.py"
    marker = tmp_path / "ran"
    demo.write_text(
        f"import sys, pathlib\npathlib.Path({str(marker)!r}).write_text(' '.join(sys.argv[1:]))\nraise SystemExit(5)\n"
    )
    monkeypatch.setattr(cli, "DEMO_PATH", demo)
    assert main(["demo", "--fast", "x"]) == 5
    assert marker.read_text() == "--fast x"


# --- status -----------------------------------------------------------------------------------------------


def test_status_of_an_unreachable_member_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["status", "--http", f"127.0.0.1:{port}", "--timeout", "5"]) == 1
    assert f"cannot reach 127.0.0.1:{port}" in capsys.readouterr().err


# --- a real member ------------------------------------------------------------------------------------------


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise AssertionError(f"the member exited before printing a line; output so far: {bytes(buffer)!r}")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


async def _get(port: int, target: str) -> tuple[int, Any]:
    status, document = await cli.http_get_json("127.0.0.1", port, target, timeout=5)
    return status, document


async def test_node_subprocess_serves_status_and_stops_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "cli_test_app.py").write_text(
        textwrap.dedent(
            """
            import graft_trio as graft

            class Echo(graft.Node[dict, dict]):
                name = "echo"

                async def execute(self, ctx, state, config):
                    return graft.NodeResult(data={"echoed": True})

            def setup(manager):
                manager.register_node(Echo())
            """
        )
    )
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "GRAFT_CLUSTER_SECRET": "test-secret",
        "GRAFT_DATA_DIR": str(tmp_path / "data"),
    }
    command = [
        sys.executable,
        "-m",
        "graft_trio",
        "node",
        "--node-id",
        "cli-1",
        "--raft-addr",
        "127.0.0.1:0",
        "--transport",
        "tcp",
        "--http-port",
        "0",
        "--app",
        "cli_test_app:setup",
    ]
    process = await trio.lowlevel.open_process(
        command, cwd=str(tmp_path), env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        buffer = bytearray()
        running = leader = ""
        with trio.fail_after(30):  # the two lines come in either order
            while not (running and leader):
                line = await _read_line(process.stdout, buffer)
                running = line if line.startswith("graft-trio node ") else running
                leader = line if line.startswith("leader: ") else leader
        assert running.startswith("graft-trio node cli-1 running: raft on 127.0.0.1:0, HTTP API on http://127.0.0.1:")
        assert leader.startswith("leader: cli-1 (term ")
        port = int(running.rsplit(":", 1)[1])
        assert await _get(port, "/ready") == (200, {"ready": True, "leader_id": "cli-1"})

        status = await trio.run_process(
            [sys.executable, "-m", "graft_trio", "status", "--http", f"127.0.0.1:{port}"],
            env=environ,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert status.returncode == 0, status.stderr
        printed = status.stdout.decode()
        assert "member    cli-1 (leader, term" in printed
        assert "health    healthy (serving, leader known" in printed
        assert "nodes     echo" in printed
        assert "cli-1  127.0.0.1:0  voter, leader, this member" in printed

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            returncode = await process.wait()
        assert process.stderr is not None
        errors = await process.stderr.receive_some(1 << 20)
        assert returncode == 0, errors
        assert "SIGTERM received" in errors.decode()
        with trio.fail_after(5):
            assert await _read_line(process.stdout, buffer) == "graft-trio node cli-1 stopped"
        assert (tmp_path / "data").is_dir()  # GRAFT_DATA_DIR was used
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_node_on_a_port_in_use_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["node", "--node-id", "busy", "--raft-addr", f"127.0.0.1:{port}", "--log-level", "ERROR"]
        assert main(argv, environ={}) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("graft-trio node: cannot run member busy: ")
    assert "in use" in err


def test_an_app_function_that_raises_is_reported_in_one_line(app_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["node", "--node-id", "a", "--raft-addr", "mem-a", "--transport", "memory", "--app", "refused_app:setup"]
    assert main(argv, environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("graft-trio node: error: --app refused_app:setup raised NodeRegistrationError: ")
