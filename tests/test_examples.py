"""The runnable examples run, exit 0 and print what examples/README.md says they print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_raft_demo_survives_the_loss_of_its_leader() -> None:
    completed = subprocess.run(
        [sys.executable, "examples/raft_demo.py"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "new leader elected:" in completed.stdout
    assert "reads agree" in completed.stdout
