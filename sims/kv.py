"""The replicated key-value state machine of the simulator's workload (the tests use it too)."""

from __future__ import annotations

import json

from graft_trio.raft import StateMachine


class KeyValue(StateMachine):
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def apply(self, index: int, command: bytes) -> bytes:
        op = json.loads(command)
        key = op["key"]
        if op["op"] == "put":
            self.data[key] = op["value"]
        elif op["op"] == "append":
            self.data[key] = self.data.get(key, "") + op["value"]
        return self.data.get(key, "").encode()

    def query(self, query: bytes) -> bytes:
        return self.data.get(query.decode(), "").encode()

    def snapshot(self) -> bytes:
        return json.dumps(self.data, sort_keys=True).encode()

    def restore(self, snapshot: bytes) -> None:
        self.data = json.loads(snapshot)


def put(key: str, value: str) -> bytes:
    return json.dumps({"op": "put", "key": key, "value": value}).encode()


def append(key: str, value: str) -> bytes:
    return json.dumps({"op": "append", "key": key, "value": value}).encode()


def get(key: str) -> bytes:
    return key.encode()
