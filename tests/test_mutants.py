"""Every planted Raft bug is caught by the simulator, and the same seeds pass without it.

The seeds below were found by ``python -m sims run --seeds 500 --mutant NAME`` (see docs/SIMULATION.md
for the rates). Runs are deterministic, so a seed keeps failing as long as the code it exercises is
unchanged; when a change to the engine or the simulator moves the failing seeds, run that campaign again
and put a seed it reports here. A mutant that no longer fails anywhere in 500 seeds is a real regression
of the simulator.
"""

from __future__ import annotations

import pytest

from sims.cli import run_one
from sims.mutants import MUTANTS

CAUGHT = {
    "ack-before-sync": (20, "acknowledged-durability"),
    "batch-reversed": (0, "linearizability"),
    "commit-old-term": (3, "leader-commit-rule"),
    "forget-vote": (24, "vote-safety"),
    "stale-read": (37, "linearizability"),
}


def test_every_mutant_has_a_seed() -> None:
    assert sorted(CAUGHT) == sorted(MUTANTS)


@pytest.mark.parametrize("mutant", sorted(CAUGHT))
def test_mutant_is_caught_and_its_seed_passes_without_it(mutant: str) -> None:
    seed, checker = CAUGHT[mutant]
    planted = run_one(seed, 5, mutant)
    assert not planted.ok, f"mutant {mutant} no longer caught on seed {seed}: rerun its campaign"
    assert checker in {violation.checker for violation in planted.violations}
    clean = run_one(seed, 5, None)
    assert clean.ok, [str(v) for v in clean.violations]
