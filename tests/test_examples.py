"""The runnable examples run, exit 0 and print what examples/README.md says they print."""

from __future__ import annotations

import re
import subprocess
import sys
import time
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


def run_example(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def test_document_pipeline_completes_every_document_through_branches_loops_and_retries() -> None:
    first = run_example("examples/document_pipeline.py").stdout.splitlines()
    *documents, summary = first
    assert re.fullmatch(r"40 workflows: 40 completed, 0 not; \d+ steps, \d+ failed attempts retried; .*", summary)
    assert len(documents) == 40 and all(" completed " in line for line in documents), documents
    # Both branches of the join's decision, and the quality loop: one pass, several, and its bound.
    assert any("-> ocr" in line for line in documents) and any("-> nlp" in line for line in documents)
    assert any("passes=1 " in line for line in documents) and any("passes=3 " in line for line in documents)
    assert any("needs_review" in line for line in documents) and any("accepted" in line for line in documents)
    retried = [int(n) for n in re.findall(r"retried=(\d+)", "\n".join(documents))]
    assert len(retried) == 40 and sum(retried) > 0  # failures happened, and the retries absorbed them
    # Seeded: the same documents take the same paths, fail the same attempts and score the same.
    again = run_example("examples/document_pipeline.py").stdout.splitlines()
    assert again[:-1] == documents


def test_simple_validation_repairs_in_a_loop_and_fails_what_it_cannot_repair() -> None:
    out = run_example("examples/simple_validation.py").stdout
    assert "customer-1: completed after 0 repairs" in out
    assert "customer-2: completed after 3 repairs ['email-not-normalized', 'phone-not-e164', 'country-not-iso']" in out
    assert "validate -> repair -> validate -> repair -> validate -> repair -> validate -> done" in out
    assert "customer-3: failed after 0 repairs [];" in out and "cannot repair missing-name" in out


def test_demo_runs_the_batch_on_three_tcp_members_and_survives_the_loss_of_its_leader() -> None:
    started = time.monotonic()
    out = run_example("examples/demo.py").stdout
    assert time.monotonic() - started < 40, "the demo must finish in well under a minute"
    assert re.search(r"workflows \d+/40 completed, \d+ running, 0 failed \| \d+ steps", out), out  # progress
    killed = re.search(r"killed the leader (n\d)", out)
    elected = re.search(r"new leader: (n\d), known \d+ ms after the kill", out)
    assert killed and elected and killed.group(1) != elected.group(1), out
    assert re.search(r"first step committed after the kill: \d+ ms after it", out), out
    assert "40 workflows: 40 completed, 0 not;" in out
    assert "agreeing with the workflow records" in out
    assert re.search(r"failover: leader n\d killed at [\d.]+ s; new leader known after \d+ ms", out), out


def test_cluster_of_processes_survives_sigkill_of_the_leader() -> None:
    out = run_example("examples/cluster.py", timeout=90).stdout
    killed = re.search(r"SIGKILLed the leader (n\d)", out)
    elected = re.search(r"new leader: (n\d), known \d+ ms after the kill", out)
    assert killed and elected and killed.group(1) != elected.group(1), out
    assert "40/40 workflows completed" in out and "the survivors agree on every workflow" in out, out
    steps = re.search(r"(\d+) steps \(workflow records: (\d+)\)", out)
    assert steps and steps.group(1) == steps.group(2), out
