"""Encode+decode throughput of the wire formats considered for Raft messages, measured on this machine.

(a) the versioned binary codec that `graft_trio.raft.codec.encode_message` / `decode_message` implement;
(b) cattrs' JSON preconf converter, with the `Message` union tagged by `configure_tagged_union`:
    unstructure + json.dumps, then json.loads + structure;
(c) pickle (highest protocol), as a reference only: it cannot be read safely from a peer.

Each figure is one message encoded and decoded again (a full trip through the wire format), for a typical
AppendEntries (10 entries of 100 bytes) and a Heartbeat; the best of several runs is kept.

    python -m benchmarks.codec [--seconds 0.3] [--repeat 5]

docs/WIRE.md records a run.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import platform
import sys
import time
from collections.abc import Callable

from cattrs.preconf.json import make_converter
from cattrs.strategies import configure_tagged_union

from graft_trio.raft.codec import decode_message, encode_message
from graft_trio.raft.messages import AppendEntries, Entry, Heartbeat, Message

ENTRIES = 10
ENTRY_BYTES = 100

Encode = Callable[[Message], bytes]
Decode = Callable[[bytes], Message]


def typical_messages() -> dict[str, Message]:
    entries = tuple(
        Entry(term=7, index=1_000 + i, data=bytes(range(ENTRY_BYTES)), request_id=f"req-{1_000 + i:08d}-client-3")
        for i in range(ENTRIES)
    )
    return {
        "AppendEntries(10x100B)": AppendEntries(
            source="node-1",
            target="node-2",
            term=7,
            prev_log_index=999,
            prev_log_term=7,
            entries=entries,
            leader_commit=998,
        ),
        "Heartbeat": Heartbeat(source="node-1", target="node-2", term=7, commit=1_009),
    }


def codecs() -> dict[str, tuple[Encode, Decode]]:
    converter = make_converter()
    configure_tagged_union(Message, converter)

    def cattrs_encode(message: Message) -> bytes:
        return json.dumps(converter.unstructure(message, Message)).encode()

    def cattrs_decode(data: bytes) -> Message:
        message: Message = converter.structure(json.loads(data), Message)  # type: ignore[arg-type]
        return message

    def pickle_encode(message: Message) -> bytes:
        return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)

    def pickle_decode(data: bytes) -> Message:
        message: Message = pickle.loads(data)
        return message

    return {
        "binary": (encode_message, decode_message),
        "cattrs-json": (cattrs_encode, cattrs_decode),
        "pickle": (pickle_encode, pickle_decode),
    }


def round_trips_per_second(encode: Encode, decode: Decode, message: Message, seconds: float) -> float:
    """Round trips per second over a run of about `seconds`."""
    count = 0
    batch = 100
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            decode(encode(message))
        count += batch
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.codec", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed run (default 0.3)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the best is kept (default 5)")
    args = parser.parse_args(argv)

    messages = typical_messages()
    formats = codecs()
    for name, (encode, decode) in formats.items():
        for message in messages.values():
            if decode(encode(message)) != message:
                print(f"{name} does not round-trip {type(message).__name__}", file=sys.stderr)
                return 1

    print(f"{platform.platform()}, Python {platform.python_version()}")
    print(f"encode+decode round trips per second (best of {args.repeat}), encoded size in bytes:")
    names = list(formats)
    print(f"{'message':>22} | " + " | ".join(f"{name:>18}" for name in names) + " | binary / cattrs")
    ratios: list[float] = []
    for label, message in messages.items():
        cells = []
        figures: dict[str, float] = {}
        for name, (encode, decode) in formats.items():
            figures[name] = max(
                round_trips_per_second(encode, decode, message, args.seconds) for _ in range(args.repeat)
            )
            cells.append(f"{figures[name]:>10,.0f} ({len(encode(message)):>4})")
        ratio = figures["binary"] / figures["cattrs-json"]
        ratios.append(ratio)
        print(f"{label:>22} | " + " | ".join(f"{cell:>18}" for cell in cells) + f" | {ratio:.2f}x")
    # One figure for both shapes of message: the geometric mean of the per-message ratios.
    print(f"ratio_binary_vs_cattrs: {math.prod(ratios) ** (1 / len(ratios)):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
