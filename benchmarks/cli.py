"""The benchmarks' command line.

    python -m benchmarks sim [--seeds N] [--start S]
    python -m benchmarks storage [--batches N] [--repeat R] [--dir PATH]
    python -m benchmarks codec [--seconds S] [--repeat R]
    python -m benchmarks raft --vs pysyncobj [--seconds S] [--window W] [--batch B] [--serial N] [--quick]
    python -m benchmarks workflows [--workflows N] [--window W] [--serial N] [--members 1,3] [--quick] [--profile DIR]

Each command is the `main` of its module; the arguments after the command's name are passed on to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from benchmarks import codec, raft, sim, storage, workflows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="graft-trio's benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    # add_help=False: `--help` after a command's name reaches that command's own parser.
    commands.add_parser("sim", add_help=False, help="simulator speed (virtual seconds per wall second)")
    commands.add_parser("storage", add_help=False, help="durable append throughput: segmented log vs SQLite")
    commands.add_parser("codec", add_help=False, help="wire codec: binary vs cattrs + JSON")
    commands.add_parser("raft", add_help=False, help="Raft over TCP processes: graft-trio vs PySyncObj")
    commands.add_parser("workflows", add_help=False, help="workflows/s and latency on 1 and 3 durable members")
    args, rest = parser.parse_known_args(argv)
    if args.command == "sim":
        return sim.main(rest)
    if args.command == "codec":
        return codec.main(rest)
    if args.command == "raft":
        return raft.main(rest)
    if args.command == "workflows":
        return workflows.main(rest)
    return storage.main(rest)
