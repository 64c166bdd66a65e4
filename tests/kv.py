"""The tests' key-value state machine: the simulator's, re-exported."""

from sims.kv import KeyValue, append, put

__all__ = ["KeyValue", "append", "put"]
