"""A document-processing workflow: fan-out and a join, a conditional branch, a bounded loop, retried failures.

    .venv/bin/python examples/document_pipeline.py [--documents 40] [--seed 7]

Each document runs through typed nodes (attrs state and configs)::

    ingest ──┬── validate ──┐
             └── analyze  ──┴─> route (the join) ──> ocr | nlp ──> quality ──> finalize
                                                       ^               │
                                                       └── another pass┘  (until the score reaches the
                                                                           threshold, at most max_passes)

- `ingest` reads the document's metadata and fans out to `validate` and `analyze`, which run in parallel
  (on any member), and names `route` as the join: it runs once, after both branches have finished.
- `route` reads what both branches wrote and decides by the document's kind: scans and photos go to `ocr`,
  text and forms to `nlp`.
- `quality` scores the extraction; below the threshold it sends the document back for another pass (with
  an idempotency key per pass), and after `max_passes` it finalizes it as ``needs_review``.
- The downstream "services" fail now and then: for each (document, node, pass) a seeded RNG decides how
  many attempts fail before the service answers (0 to 2), and each node's `RetryPolicy` (4 attempts,
  50 ms backoff) absorbs them. Everything random is drawn from the workflow's own `seed` and the document
  id, so a run is reproducible on any member, in any process, whoever runs which step.

`register_pipeline(mgr)` registers the nodes on a Manager and `trigger_for(doc_id, ...)` builds a trigger;
examples/demo.py and examples/cluster.py reuse both, and the helpers at the end (`Tally`, `wait_for_all`,
`free_ports`, `ms`). As a program it runs a batch on a one-member Manager
(memory transport, log in memory) and prints one line per workflow and a summary; it exits 1 if a workflow
did not complete.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import random
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import attrs
import trio

import graft_trio as graft
from graft_trio.events import Subscription

SOURCES = ("scanner", "camera", "email", "upload")
OCR_KINDS = ("scan", "photo")
FLAKY_RETRY = graft.RetryPolicy(max_attempts=4, initial_interval=0.05, backoff=2.0, max_interval=0.5)


# --- the workflow's state and the nodes' configs -----------------------------------------------------------


@attrs.define
class Validation:
    ok: bool
    issues: list[str]


@attrs.define
class Analysis:
    kind: str  # scan, photo, text or form
    language: str
    words: int
    clarity: float  # how legible the source is, 0..1: the first extraction pass scores about this


@attrs.define
class Extraction:
    method: str  # ocr or nlp
    passes: int
    score: float


@attrs.define
class DocumentState:
    """One document's workflow state: what the trigger gives, then what each node adds."""

    doc_id: str
    source: str
    size_kb: int
    seed: int
    quality_threshold: float
    max_passes: int
    pages: int | None = None
    checksum: str | None = None
    validation: Validation | None = None
    analysis: Analysis | None = None
    route: str | None = None
    extraction: Extraction | None = None
    scores: dict[str, float] = attrs.Factory(dict)  # pass number -> score
    outcome: str | None = None  # accepted or needs_review
    finalized_by: str | None = None


@attrs.frozen
class IngestConfig:
    uri: str


@attrs.frozen
class ValidateConfig:
    max_pages: int = 400


@attrs.frozen
class AnalyzeConfig:
    sample_pages: int = 3


@attrs.frozen
class RouteConfig:
    ocr_kinds: tuple[str, ...] = OCR_KINDS


@attrs.frozen
class PassConfig:
    pass_number: int


@attrs.frozen
class QualityConfig:
    method: str
    pass_number: int


@attrs.frozen
class FinalizeConfig:
    outcome: str


# --- what makes the run reproducible ---------------------------------------------------------------------


class ServiceUnavailable(Exception):
    """A downstream service failed this attempt; a later attempt may succeed."""


def draw(state: DocumentState, *what: object) -> random.Random:
    """An RNG for one decision about one document, seeded by the workflow's seed: the same on every member."""
    return random.Random("/".join(str(part) for part in (state.seed, state.doc_id, *what)))


async def call_service(ctx: graft.NodeContext, state: DocumentState, service: str, pass_number: int = 1) -> None:
    """Take a little while, like a remote call; fail the first attempts of this step as the seed says."""
    rng = draw(state, service, pass_number)
    failures = rng.choices((0, 1, 2), weights=(80, 15, 5))[0]
    await trio.sleep(rng.uniform(0.02, 0.1))
    if ctx.attempt <= failures:
        raise ServiceUnavailable(f"{service} unavailable (attempt {ctx.attempt} of {ctx.workflow_id})")


# --- the nodes -------------------------------------------------------------------------------------------


class Ingest(graft.Node[DocumentState, IngestConfig]):
    name = "ingest"
    retry = FLAKY_RETRY
    timeout = 5.0

    async def execute(self, ctx: graft.NodeContext, state: DocumentState, config: IngestConfig) -> graft.NodeResult:
        await call_service(ctx, state, "storage")
        pages = max(1, state.size_kb // 60)
        checksum = hashlib.sha256(f"{config.uri}:{state.size_kb}".encode()).hexdigest()[:16]
        return graft.NodeResult(
            data={"pages": pages, "checksum": checksum},
            next_nodes=[
                graft.NextNode("validate", config=ValidateConfig()),
                graft.NextNode("analyze", config=AnalyzeConfig()),
            ],
            join=graft.NextNode("route", config=RouteConfig()),
        )


class Validate(graft.Node[DocumentState, ValidateConfig]):
    name = "validate"
    retry = FLAKY_RETRY
    timeout = 5.0

    async def execute(self, ctx: graft.NodeContext, state: DocumentState, config: ValidateConfig) -> graft.NodeResult:
        await call_service(ctx, state, "validator")
        if state.pages is None or state.checksum is None:
            raise graft.NonRetryableError(f"{state.doc_id} was not ingested: no pages or checksum")
        issues: list[str] = []
        if state.pages > config.max_pages:
            issues.append(f"{state.pages} pages, more than {config.max_pages}")
        if state.size_kb > 2000:
            issues.append("large file")
        return graft.NodeResult(data=patch(validation=Validation(ok=not issues, issues=issues)))


class Analyze(graft.Node[DocumentState, AnalyzeConfig]):
    name = "analyze"
    retry = FLAKY_RETRY
    timeout = 5.0

    async def execute(self, ctx: graft.NodeContext, state: DocumentState, config: AnalyzeConfig) -> graft.NodeResult:
        await call_service(ctx, state, "classifier")
        rng = draw(state, "analysis")
        kind = {
            "scanner": "scan",
            "camera": "photo",
            "email": "text",
            "upload": rng.choice(("scan", "text", "form")),
        }[state.source]
        analysis = Analysis(
            kind=kind,
            language=rng.choice(("en", "en", "de", "fr")),
            words=(state.pages or 1) * rng.randint(150, 450),
            clarity=round(rng.uniform(0.45, 0.95), 3),
        )
        return graft.NodeResult(data=patch(analysis=analysis))


class Route(graft.Node[DocumentState, RouteConfig]):
    """The join of `validate` and `analyze`: decides the extraction method from the document's kind."""

    name = "route"
    retry = FLAKY_RETRY

    async def execute(self, ctx: graft.NodeContext, state: DocumentState, config: RouteConfig) -> graft.NodeResult:
        if state.validation is None or state.analysis is None:
            raise graft.NonRetryableError(f"route ran before both branches of {state.doc_id} finished")
        method = "ocr" if state.analysis.kind in config.ocr_kinds else "nlp"
        return graft.NodeResult(
            data={"route": method}, next_nodes=[graft.NextNode(method, config=PassConfig(pass_number=1))]
        )


class Extract(graft.Node[DocumentState, PassConfig]):
    """One extraction pass; every pass after the first scores a little better (a slower, finer setting)."""

    retry = FLAKY_RETRY
    timeout = 5.0
    gain_per_pass = 0.12

    async def execute(self, ctx: graft.NodeContext, state: DocumentState, config: PassConfig) -> graft.NodeResult:
        await call_service(ctx, state, self.name, config.pass_number)
        assert state.analysis is not None
        noise = draw(state, self.name, "score", config.pass_number).uniform(-0.03, 0.03)
        score = round(min(1.0, state.analysis.clarity + self.gain_per_pass * (config.pass_number - 1) + noise), 3)
        extraction = Extraction(method=self.name, passes=config.pass_number, score=score)
        return graft.NodeResult(
            data=patch(extraction=extraction, scores={str(config.pass_number): score}),
            next_nodes=[graft.NextNode("quality", config=QualityConfig(self.name, config.pass_number))],
        )


class Ocr(Extract):
    name = "ocr"


class Nlp(Extract):
    name = "nlp"


class Quality(graft.Node[DocumentState, QualityConfig]):
    """The loop: below the threshold the document goes back for another pass, at most `max_passes` in all."""

    name = "quality"
    retry = FLAKY_RETRY

    async def execute(self, ctx: graft.NodeContext, state: DocumentState, config: QualityConfig) -> graft.NodeResult:
        score = state.scores[str(config.pass_number)]
        if score >= state.quality_threshold:
            following = graft.NextNode("finalize", config=FinalizeConfig("accepted"))
        elif config.pass_number < state.max_passes:
            again = config.pass_number + 1
            following = graft.NextNode(
                config.method, config=PassConfig(pass_number=again), idempotency_key=f"{config.method}-pass-{again}"
            )
        else:
            following = graft.NextNode("finalize", config=FinalizeConfig("needs_review"))
        return graft.NodeResult(next_nodes=[following])


class Finalize(graft.Node[DocumentState, FinalizeConfig]):
    name = "finalize"
    retry = FLAKY_RETRY

    async def execute(self, ctx: graft.NodeContext, state: DocumentState, config: FinalizeConfig) -> graft.NodeResult:
        await call_service(ctx, state, "archive")
        return graft.NodeResult(data={"outcome": config.outcome, "finalized_by": ctx.member_id})


def patch(**fields: Any) -> dict[str, Any]:
    """A state patch naming only `fields`, checked against `DocumentState` (a typo fails here, not later)."""
    known = {field.name for field in attrs.fields(DocumentState)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"DocumentState has no field {', '.join(unknown)}")
    return fields


NODES: tuple[type[graft.Node[Any, Any]], ...] = (Ingest, Validate, Analyze, Route, Ocr, Nlp, Quality, Finalize)


def register_pipeline(mgr: graft.Manager) -> None:
    """Register every node of the pipeline on `mgr`."""
    for node_class in NODES:
        mgr.register_node(node_class())


def trigger_for(
    doc_id: str, *, seed: int = 7, quality_threshold: float = 0.8, max_passes: int = 3
) -> graft.WorkflowTrigger:
    """The trigger of one document's workflow (its id is the document id). The document's source and size
    are drawn from `seed` and the id, so the same batch is the same documents in every run."""
    rng = random.Random(f"{seed}/{doc_id}/document")
    state = DocumentState(
        doc_id=doc_id,
        source=rng.choice(SOURCES),
        size_kb=rng.randint(40, 2400),
        seed=seed,
        quality_threshold=quality_threshold,
        max_passes=max_passes,
    )
    return graft.WorkflowTrigger(
        workflow_id=doc_id,
        initial_state=state,
        initial_nodes=[graft.NodeConfig(name="ingest", config=IngestConfig(uri=f"s3://inbox/{doc_id}.pdf"))],
        metadata={"pipeline": "documents"},
    )


def document_ids(count: int) -> list[str]:
    return [f"doc-{number:03d}" for number in range(1, count + 1)]


# --- reporting and event tallies, shared with demo.py and cluster.py ----------------------------------


async def wait_for_all(mgr: graft.Manager, workflow_ids: Sequence[str], timeout: float) -> list[graft.WorkflowState]:
    """Each workflow once it is finished, or as it is when `timeout` seconds (for them all) have passed."""
    deadline = time.perf_counter() + timeout
    results = []
    for workflow_id in workflow_ids:
        try:
            results.append(await mgr.wait_for_workflow(workflow_id, timeout=max(deadline - time.perf_counter(), 0)))
        except TimeoutError:
            results.append(await mgr.get_workflow(workflow_id))
    return results


def describe(workflow: graft.WorkflowState) -> str:
    """One line about a finished document workflow."""
    state = workflow.current_state
    extraction = state.get("extraction") or {}
    analysis = state.get("analysis") or {}
    completed = sum(1 for step in workflow.executed_steps if step.status is graft.StepStatus.COMPLETED)
    failed = len(workflow.executed_steps) - completed
    score = extraction.get("score")
    line = (
        f"{workflow.workflow_id}  {workflow.status.value:<9}  {analysis.get('kind', '?'):<5} -> "
        f"{state.get('route', '?'):<3}  passes={extraction.get('passes', '?')} "
        f"score={'?' if score is None else format(score, '.3f')}  {state.get('outcome', '-'):<12}  "
        f"steps={completed} retried={failed}"
    )
    if workflow.last_error:
        line += f"  error: {workflow.last_error}"
    return line


EVENT_TYPES = (
    graft.WorkflowStarted,
    graft.WorkflowCompleted,
    graft.WorkflowFailed,
    graft.NodeCompleted,
    graft.NodeFailed,
)


@attrs.define(eq=False)
class Tally:
    """What one member learns from the events it applies (`EVENT_TYPES`, the same on every member, in log
    order): feed it with `consume(subscription)`, read its counts, wait for one to be reached."""

    started: int = 0
    completed: int = 0
    failed: int = 0
    steps: int = 0
    retries: int = 0  # failed attempts that were retried
    lost: int = 0  # of which attempts were lost with their member (the claim's lease expired)
    steps_by_member: dict[str, int] = attrs.Factory(dict)
    dropped: int = 0  # events missed because this subscriber fell behind (never expected here)
    step_indexes: list[int] = attrs.Factory(list)  # the log index of each step's commit, in order
    step_times: list[float] = attrs.Factory(list)  # and the `time.perf_counter()` when this member applied it
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def consume(self, events: Subscription) -> None:
        async for event in events:
            if isinstance(event, graft.EventsDropped):
                self.dropped += event.count
            elif isinstance(event, graft.WorkflowStarted):
                self.started += 1
            elif isinstance(event, graft.WorkflowCompleted):
                self.completed += 1
            elif isinstance(event, graft.WorkflowFailed):
                self.failed += 1
            elif isinstance(event, graft.NodeFailed) and not event.dead_lettered:
                self.retries += 1
                self.lost += event.lease_expired
            elif isinstance(event, graft.NodeCompleted):
                self.steps += 1
                self.steps_by_member[event.member_id] = self.steps_by_member.get(event.member_id, 0) + 1
                self.step_indexes.append(event.index)
                self.step_times.append(time.perf_counter())
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for_steps(self, count: int) -> None:
        while self.steps < count:
            await self._changed.wait()

    async def settle(self, completed: int, steps: int, timeout: float = 5.0) -> None:
        """Wait (at most `timeout` s) until `completed` workflows and `steps` steps were counted: a member's
        subscription hands over the events of an entry a moment after its apply, so a read that shows every
        workflow done can come before the last events are counted."""
        with trio.move_on_after(timeout):
            while self.completed < completed or self.steps < steps:
                await self._changed.wait()

    async def wait_for_step_after(self, index: int) -> float:
        """The `time.perf_counter()` at which this member applied the first step committed at a log index
        past `index`, once it has."""
        while not self.step_indexes or self.step_indexes[-1] <= index:
            await self._changed.wait()
        return self.step_times[bisect.bisect_right(self.step_indexes, index)]

    def counts(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "completed": self.completed,
            "failed": self.failed,
            "steps": self.steps,
            "retries": self.retries,
            "lost": self.lost,
            "steps_by_member": dict(sorted(self.steps_by_member.items())),
            "dropped": self.dropped,
        }


# --- the program ------------------------------------------------------------------------------------------


async def main(count: int, seed: int) -> int:
    mgr = graft.Manager("solo", "solo", None, transport="memory")
    register_pipeline(mgr)
    started = time.perf_counter()
    async with mgr:
        ids = document_ids(count)
        for doc_id in ids:
            await mgr.start_workflow(trigger_for(doc_id, seed=seed))
        results = await wait_for_all(mgr, ids, timeout=60)
    for workflow in results:
        print(describe(workflow))
    return summarize(results, time.perf_counter() - started)


def recorded_steps(results: Sequence[graft.WorkflowState]) -> int:
    """The steps the workflows' records show completed."""
    return sum(1 for w in results for s in w.executed_steps if s.status is graft.StepStatus.COMPLETED)


def summarize(results: Sequence[graft.WorkflowState], elapsed: float) -> int:
    """Print the batch summary; 0 if every workflow completed, else 1."""
    completed = [w for w in results if w.status is graft.WorkflowStatus.COMPLETED]
    steps = recorded_steps(results)
    retried = sum(1 for w in results for s in w.executed_steps if s.status is graft.StepStatus.FAILED)
    outcomes: dict[str, int] = {}
    for workflow in completed:
        outcome = str(workflow.current_state.get("outcome"))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    spread = ", ".join(f"{outcome} {n}" for outcome, n in sorted(outcomes.items()))
    print(
        f"{len(results)} workflows: {len(completed)} completed, {len(results) - len(completed)} not; "
        f"{steps} steps, {retried} failed attempts retried; {spread}; {elapsed:.2f} s"
    )
    return 0 if len(completed) == len(results) else 1


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (held open together, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=40, help="how many documents to process")
    parser.add_argument("--seed", type=int, default=7, help="seed of the documents and of the failures")
    args = parser.parse_args()
    sys.exit(trio.run(main, args.documents, args.seed))
