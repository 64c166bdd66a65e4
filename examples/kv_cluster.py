"""A replicated key-value store on `graft_trio.raft`, one OS process per member, and a small client.

Start three members (each in its own terminal, or in the background), then talk to any of them::

    .venv/bin/python examples/kv_cluster.py member --id n1 --address 127.0.0.1:7101 --client 127.0.0.1:8101 \\
        --peers n2@127.0.0.1:7102,n3@127.0.0.1:7103 --data-dir ./data/n1 --transport tcp --cluster-secret s3cret
    # ... n2 and n3 likewise ...
    .venv/bin/python examples/kv_cluster.py client --members 127.0.0.1:8101,127.0.0.1:8102 put colour blue
    .venv/bin/python examples/kv_cluster.py client --members 127.0.0.1:8101,127.0.0.1:8102 get colour
    .venv/bin/python examples/kv_cluster.py client --members 127.0.0.1:8101 put-many size L shape round

A member serves clients on its ``--client`` address with a tiny protocol: each frame is a 4-byte big-endian
length and a JSON object. A request carries an ``id`` chosen by the client (responses come back as they
complete, so a client may pipeline many requests on one connection) and an ``op``: ``put`` / ``delete``
(replicated through `RaftNode.propose`, forwarded to the leader by a follower), ``put_many`` (``items``, a
list of ``[key, value]``, replicated together through `RaftNode.propose_many`: one log entry, all or none),
``get`` (a linearizable `RaftNode.read`), or ``status``. A write carries a ``request_id`` that the client
keeps when it retries on another member, so a write retried after a failover is applied once.

When a member is serving it prints one line ``ready <client address>`` on stdout; tests and benchmarks wait
for it.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import secrets
import struct
import sys
from collections.abc import Sequence
from functools import partial
from typing import Any

import attrs
import trio

from graft_trio.raft import (
    NodeStoppedError,
    NoQuorumError,
    NotLeaderError,
    ProposalTimeout,
    RaftConfig,
    RaftError,
    RaftNode,
    StateMachine,
    open_storage,
)

_LENGTH = struct.Struct(">I")
MAX_CLIENT_FRAME = 1024 * 1024


class KeyValueStore(StateMachine):
    """The replicated state: a dict of strings. Commands are JSON: ``{"op": "put", "key": k, "value": v}``."""

    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def apply(self, index: int, command: bytes) -> bytes:
        op = json.loads(command)
        if op["op"] == "put":
            self.data[op["key"]] = op["value"]
        elif op["op"] == "delete":
            self.data.pop(op["key"], None)
        return str(index).encode()

    def query(self, query: bytes) -> bytes:
        value = self.data.get(query.decode())
        return json.dumps(value).encode()

    def snapshot(self) -> bytes:
        return json.dumps(self.data, sort_keys=True).encode()

    def restore(self, snapshot: bytes) -> None:
        self.data = json.loads(snapshot)


# --- framing, shared by member and client ---------------------------------------------------------------


class FrameReader:
    """Frames off a byte stream: length-prefixed JSON objects."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> dict[str, Any] | None:
        """The next frame, or None at a clean end of stream."""
        while True:
            if len(self._buffer) >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(self._buffer)
                if length > MAX_CLIENT_FRAME:
                    raise ValueError(f"client frame of {length} bytes exceeds {MAX_CLIENT_FRAME}")
                end = _LENGTH.size + length
                if len(self._buffer) >= end:
                    body = bytes(self._buffer[_LENGTH.size : end])
                    del self._buffer[:end]
                    frame = json.loads(body)
                    if not isinstance(frame, dict):
                        raise ValueError("client frame is not a JSON object")
                    return frame
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                if self._buffer:
                    raise ValueError("connection closed inside a frame")
                return None
            self._buffer += chunk


def encode_frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


# --- the member -------------------------------------------------------------------------------------------


def parse_peers(text: str) -> dict[str, str]:
    """``n2@127.0.0.1:7102,n3@127.0.0.1:7103`` -> ``{"n2": "127.0.0.1:7102", ...}``."""
    peers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        node_id, sep, address = item.partition("@")
        if not sep or not node_id or not address:
            raise argparse.ArgumentTypeError(f"peer {item!r} is not written id@host:port")
        peers[node_id] = address
    return peers


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@attrs.define
class MemberOptions:
    node_id: str
    address: str
    client: str
    peers: dict[str, str]
    data_dir: str | None
    transport: str
    cluster_secret: str | None
    durable: bool = True
    snapshot_threshold: int | None = None


class KvMember:
    def __init__(self, options: MemberOptions) -> None:
        config = RaftConfig(durable=options.durable)
        if options.snapshot_threshold is not None:
            config = attrs.evolve(
                config,
                snapshot_threshold=options.snapshot_threshold,
                snapshot_trailing=min(config.snapshot_trailing, options.snapshot_threshold // 2),
            )
        transport_options: dict[str, Any] = {}
        if options.cluster_secret is not None:
            transport_options["cluster_secret"] = options.cluster_secret
        self.options = options
        self.store = KeyValueStore()
        self.node = RaftNode(
            options.node_id,
            options.address,
            options.peers,
            state_machine=self.store,
            storage=open_storage(options.data_dir),
            transport=options.transport,
            config=config,
            transport_options=transport_options,
        )

    async def run(self) -> None:
        host, port = split_host_port(self.options.client)
        async with self.node, trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, self._serve_client, port, host=host))
            bound = listeners[0].socket.getsockname()
            print(f"ready {bound[0]}:{bound[1]}", flush=True)

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        reader = FrameReader(stream)
        send_lock = trio.Lock()
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    request = await reader.next()
                    if request is None:
                        break
                    nursery.start_soon(self._answer, stream, send_lock, request)
        except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a broken or misbehaving client: drop its connection, nothing else
        finally:
            await stream.aclose()

    async def _answer(self, stream: trio.SocketStream, send_lock: trio.Lock, request: dict[str, Any]) -> None:
        response: dict[str, Any] = {"id": request.get("id")}
        try:
            response.update(await self._execute(request))
        except (NotLeaderError, ProposalTimeout, NoQuorumError, NodeStoppedError, RaftError) as error:
            response.update(ok=False, error=type(error).__name__, detail=str(error))
        except (KeyError, TypeError, ValueError) as error:
            response.update(ok=False, error="BadRequest", detail=str(error))
        async with send_lock:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode_frame(response))

    async def _execute(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        timeout = float(request.get("timeout", 5.0))
        if op in ("put", "delete"):
            command = {"op": op, "key": str(request["key"])}
            if op == "put":
                command["value"] = str(request["value"])
            request_id = request.get("request_id")
            result = await self.node.propose(
                json.dumps(command, separators=(",", ":")).encode(),
                timeout=timeout,
                request_id=None if request_id is None else str(request_id),
            )
            return {"ok": True, "index": int(result)}
        if op == "put_many":
            commands = [
                json.dumps({"op": "put", "key": str(key), "value": str(value)}, separators=(",", ":")).encode()
                for key, value in request["items"]
            ]
            request_id = request.get("request_id")
            results = await self.node.propose_many(
                commands, timeout=timeout, request_id=None if request_id is None else str(request_id)
            )
            return {"ok": True, "index": int(results[0]) if results else 0}
        if op == "get":
            value = json.loads(await self.node.read(str(request["key"]).encode(), timeout=timeout))
            return {"ok": True, "value": value}
        if op == "status":
            status = self.node.status()
            return {
                "ok": True,
                "node_id": status.node_id,
                "role": status.role,
                "term": status.term,
                "leader_id": status.leader_id,
                "commit_index": status.commit_index,
                "applied_index": status.applied_index,
                "snapshot_index": status.snapshot_index,
                "keys": len(self.store.data),
            }
        raise ValueError(f"unknown op {op!r}")


# --- the client -------------------------------------------------------------------------------------------


class KvError(Exception):
    """A request failed on every member tried, or the member answered with an error."""


class KvConnection:
    """One pipelined connection to one member: many requests in flight, answers matched by id."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._reader = FrameReader(stream)
        self._ids = itertools.count(1)
        self._pending: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._send_lock = trio.Lock()
        self.closed = False

    async def run_receiver(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while (frame := await self._reader.next()) is not None:
                channel = self._pending.pop(frame.get("id", -1), None)
                if channel is not None:
                    channel.send_nowait(frame)
        except (ValueError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.closed = True
            for channel in self._pending.values():
                channel.close()
            self._pending.clear()

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.closed:
            raise trio.BrokenResourceError("connection closed")
        request_id = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._pending[request_id] = send
        async with self._send_lock:
            await self.stream.send_all(encode_frame({**request, "id": request_id}))
        try:
            return await receive.receive()
        except trio.EndOfChannel:
            raise trio.BrokenResourceError("connection closed before the answer") from None


class KvClient:
    """Talks to whichever member answers; retries a write on the next member with the same request id."""

    RETRYABLE = frozenset({"NotLeaderError", "ProposalTimeout", "NoQuorumError", "NodeStoppedError"})

    def __init__(self, members: Sequence[str], *, attempts_per_member: int = 3, retry_pause: float = 0.1) -> None:
        self.members = list(members)
        self.attempts = attempts_per_member * len(self.members)
        self.retry_pause = retry_pause
        self._current = 0
        self._connection: KvConnection | None = None
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> KvClient:
        self._nursery_manager = trio.open_nursery()
        self._nursery = await self._nursery_manager.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._nursery_manager.__aexit__(*exc_info)

    async def _connect(self) -> KvConnection:
        if self._connection is not None and not self._connection.closed:
            return self._connection
        assert self._nursery is not None, "use the client as `async with KvClient(...)`"
        host, port = split_host_port(self.members[self._current])
        stream = await trio.open_tcp_stream(host, port)
        connection = KvConnection(stream)
        await self._nursery.start(connection.run_receiver)
        self._connection = connection
        return connection

    async def _next_member(self) -> None:
        if self._connection is not None:
            await self._connection.stream.aclose()  # its receiver ends and fails what is still pending
        self._connection = None
        self._current = (self._current + 1) % len(self.members)

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        last_error = "no member tried"
        for _ in range(self.attempts):
            try:
                connection = await self._connect()
                response = await connection.request(request)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
                last_error = f"{self.members[self._current]}: {error}"
                await self._next_member()
                await trio.sleep(self.retry_pause)
                continue
            if response.get("ok"):
                return response
            last_error = f"{self.members[self._current]}: {response.get('error')}: {response.get('detail')}"
            if response.get("error") not in self.RETRYABLE:
                raise KvError(last_error)
            await self._next_member()
            await trio.sleep(self.retry_pause)
        raise KvError(f"gave up after {self.attempts} attempts; last: {last_error}")

    async def put(self, key: str, value: str, *, timeout: float = 5.0) -> int:
        request_id = secrets.token_hex(12)  # kept across retries: the write is applied once
        request = {"op": "put", "key": key, "value": value, "request_id": request_id, "timeout": timeout}
        response = await self.call(request)
        return int(response["index"])

    async def put_many(self, items: dict[str, str], *, timeout: float = 5.0) -> int:
        """Write several keys in one log entry: all of them or none, even across a failover."""
        request_id = secrets.token_hex(12)
        request = {"op": "put_many", "items": list(items.items()), "request_id": request_id, "timeout": timeout}
        response = await self.call(request)
        return int(response["index"])

    async def delete(self, key: str, *, timeout: float = 5.0) -> int:
        request_id = secrets.token_hex(12)
        response = await self.call({"op": "delete", "key": key, "request_id": request_id, "timeout": timeout})
        return int(response["index"])

    async def get(self, key: str, *, timeout: float = 5.0) -> str | None:
        response = await self.call({"op": "get", "key": key, "timeout": timeout})
        value = response["value"]
        return None if value is None else str(value)

    async def status(self) -> dict[str, Any]:
        return await self.call({"op": "status"})


# --- command line -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    member = commands.add_parser("member", help="run one member")
    member.add_argument("--id", required=True, help="this member's id")
    member.add_argument("--address", required=True, help="host:port for Raft traffic")
    member.add_argument("--client", required=True, help="host:port where clients connect")
    member.add_argument("--peers", type=parse_peers, default={}, help="id@host:port,... of the other members")
    member.add_argument("--data-dir", default=None, help="where the log and snapshots live (default: memory)")
    member.add_argument("--transport", default="tcp", help="tcp, websocket or memory (default tcp)")
    member.add_argument("--cluster-secret", default=None, help="shared secret the members authenticate with")
    member.add_argument("--non-durable", action="store_true", help="acknowledge writes before fsync")
    member.add_argument("--snapshot-threshold", type=int, default=None, help="entries between snapshots")
    client = commands.add_parser("client", help="send one request")
    client.add_argument("--members", required=True, help="host:port,... client addresses of members")
    client.add_argument("op", choices=["put", "put-many", "get", "delete", "status"])
    client.add_argument("args", nargs="*")
    return parser


async def run_client(members: list[str], op: str, args: list[str]) -> int:
    async with KvClient(members) as client:
        try:
            if op == "put" and len(args) == 2:
                print(f"ok (log index {await client.put(args[0], args[1])})")
            elif op == "put-many" and args and len(args) % 2 == 0:
                items = dict(zip(args[::2], args[1::2], strict=True))
                print(f"ok (log index {await client.put_many(items)})")
            elif op == "delete" and len(args) == 1:
                print(f"ok (log index {await client.delete(args[0])})")
            elif op == "get" and len(args) == 1:
                value = await client.get(args[0])
                print("(not set)" if value is None else value)
            elif op == "status" and not args:
                print(json.dumps(await client.status(), indent=2))
            else:
                needs = {"put": "KEY VALUE", "put-many": "KEY VALUE [KEY VALUE ...]", "status": "nothing"}
                print(f"usage: client {op} needs {needs.get(op, 'KEY')}")
                return 2
        except KvError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "member":
        options = MemberOptions(
            node_id=args.id,
            address=args.address,
            client=args.client,
            peers=args.peers,
            data_dir=args.data_dir,
            transport=args.transport,
            cluster_secret=args.cluster_secret,
            durable=not args.non_durable,
            snapshot_threshold=args.snapshot_threshold,
        )
        trio.run(KvMember(options).run)
        return 0
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    return trio.run(run_client, members, args.op, list(args.args))


if __name__ == "__main__":
    sys.exit(main())
