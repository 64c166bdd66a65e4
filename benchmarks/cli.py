"""The benchmarks' command line.

    python -m benchmarks sim [--seeds N] [--start S]
    python -m benchmarks storage [--batches N] [--repeat R] [--dir PATH]
    python -m benchmarks codec [--seconds S] [--repeat R]

Each command is the `main` of its module; the arguments after the command's name are passed on to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from benchmarks import codec, sim, storage


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="graft-trio's benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    # add_help=False: `--help` after a command's name reaches that command's own parser.
    commands.add_parser("sim", add_help=False, help="simulator speed (virtual seconds per wall second)")
    commands.add_parser("storage", add_help=False, help="durable append throughput: segmented log vs SQLite")
    commands.add_parser("codec", add_help=False, help="wire codec: binary vs cattrs + JSON")
    args, rest = parser.parse_known_args(argv)
    if args.command == "sim":
        return sim.main(rest)
    if args.command == "codec":
        return codec.main(rest)
    return storage.main(rest)
