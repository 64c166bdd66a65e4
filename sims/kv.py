"""The replicated key-value state machine of the simulator's workload (the tests use it too)."""

from __future__ import annotations

import functools
import json

from graft_trio.raft import StateMachine


class KeyValue(StateMachine):
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def apply(self, index: int, command: bytes) -> bytes:
        op, key, value = _decode(command)
        if op == "put":
            self.data[key] = value
        elif op == "append":
            self.data[key] = self.data.get(key, "") + value
        return self.data.get(key, "").encode()

    def query(self, query: bytes) -> bytes:
        return self.data.get(query.decode(), "").encode()

    def snapshot(self) -> bytes:
        return json.dumps(self.data, sort_keys=True).encode()

    def restore(self, snapshot: bytes) -> None:
        self.data = json.loads(snapshot)


@functools.lru_cache(maxsize=4096)
def _decode(command: bytes) -> tuple[str, str, str]:
    """(op, key, value) of a command; cached, as every member applies the same commands."""
    op = json.loads(command)
    return op["op"], op["key"], op.get("value", "")


def put(key: str, value: str) -> bytes:
    return json.dumps({"op": "put", "key": key, "value": value}).encode()


def append(key: str, value: str) -> bytes:
    return json.dumps({"op": "append", "key": key, "value": value}).encode()


def get(key: str) -> bytes:
    return key.encode()
