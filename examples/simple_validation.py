"""Validate, repair what fails and validate again: a workflow with a loop, on one member.

    .venv/bin/python examples/simple_validation.py

Each customer record runs ``validate``. A record that passes goes to ``done``; one that fails goes to
``repair`` with the list of problems, which fixes the first one it knows how to fix and sends the record back
to ``validate``, one problem per round. A problem that has no fix (a missing name) makes ``repair`` raise
`graft.NonRetryableError`, which fails the workflow at once with that message as its ``last_error``; so does
a record still invalid after `MAX_ROUNDS` rounds, which keeps the loop bounded.

It prints one line per record (status, rounds of repair, the final record or the error) and exits 1 unless
every workflow ended COMPLETED or FAILED.
"""

from __future__ import annotations

import sys

import attrs
import trio

import graft_trio as graft

MAX_ROUNDS = 5


@attrs.define
class Customer:
    name: str
    email: str
    phone: str
    country: str


@attrs.define
class RecordState:
    record: Customer
    repairs: list[str] = attrs.Factory(list)
    valid: bool | None = None


@attrs.frozen
class ValidateConfig:
    round: int = 0


@attrs.frozen
class RepairConfig:
    round: int
    problems: list[str]


def problems_of(customer: Customer) -> list[str]:
    """What is wrong with the record, in a fixed order: one code per problem."""
    problems: list[str] = []
    if not customer.name.strip():
        problems.append("missing-name")
    if customer.email != customer.email.strip().lower():
        problems.append("email-not-normalized")
    if "@" not in customer.email:
        problems.append("email-without-at")
    if not customer.phone.startswith("+") or not customer.phone[1:].isdigit():
        problems.append("phone-not-e164")
    if len(customer.country) != 2 or not customer.country.isupper():
        problems.append("country-not-iso")
    return problems


FIXES = {
    "email-not-normalized": lambda c: attrs.evolve(c, email=c.email.strip().lower()),
    "phone-not-e164": lambda c: attrs.evolve(c, phone="+" + "".join(ch for ch in c.phone if ch.isdigit())),
    "country-not-iso": lambda c: attrs.evolve(c, country=c.country.strip()[:2].upper()),
}


class Validate(graft.Node[RecordState, ValidateConfig]):
    name = "validate"

    async def execute(self, ctx: graft.NodeContext, state: RecordState, config: ValidateConfig) -> graft.NodeResult:
        problems = problems_of(state.record)
        if not problems:
            return graft.NodeResult(data={"valid": True}, next_nodes=[graft.NextNode("done")])
        if config.round >= MAX_ROUNDS:
            raise graft.NonRetryableError(f"still invalid after {config.round} rounds of repair: {problems}")
        repair = RepairConfig(round=config.round + 1, problems=problems)
        return graft.NodeResult(data={"valid": False}, next_nodes=[graft.NextNode("repair", config=repair)])


class Repair(graft.Node[RecordState, RepairConfig]):
    name = "repair"

    async def execute(self, ctx: graft.NodeContext, state: RecordState, config: RepairConfig) -> graft.NodeResult:
        fixable = [problem for problem in config.problems if problem in FIXES]
        if not fixable:
            raise graft.NonRetryableError(f"cannot repair {', '.join(config.problems)}")
        problem = fixable[0]
        fixed = FIXES[problem](state.record)
        return graft.NodeResult(
            data={"record": attrs.asdict(fixed), "repairs": [*state.repairs, problem]},
            next_nodes=[graft.NextNode("validate", config=ValidateConfig(round=config.round))],
        )


class Done(graft.Node[RecordState, None]):
    name = "done"

    async def execute(self, ctx: graft.NodeContext, state: RecordState, config: None) -> graft.NodeResult:
        return graft.NodeResult(data={"checked_by": ctx.member_id})


RECORDS = {
    "customer-1": Customer("Ada Lovelace", "ada@example.org", "+441234567890", "GB"),
    "customer-2": Customer("Grace Hopper", "  Grace@Example.COM ", "(555) 010-9999", "usa"),
    "customer-3": Customer("", "nobody@example.net", "+15550100", "US"),
}


async def main() -> int:
    mgr = graft.Manager("solo", "solo", None, transport="memory")
    for node in (Validate(), Repair(), Done()):
        mgr.register_node(node)
    async with mgr:
        for record_id, customer in RECORDS.items():
            await mgr.start_workflow(
                graft.WorkflowTrigger(
                    workflow_id=record_id,
                    initial_state=RecordState(record=customer),
                    initial_nodes=[graft.NodeConfig(name="validate", config=ValidateConfig())],
                )
            )
        results = [await mgr.wait_for_workflow(record_id, timeout=30) for record_id in RECORDS]
    for workflow in results:
        path = " -> ".join(step.node_name for step in workflow.executed_steps)
        repairs = workflow.current_state.get("repairs", [])
        if workflow.status is graft.WorkflowStatus.COMPLETED:
            outcome = f"record {workflow.current_state['record']}"
        else:
            outcome = f"error: {workflow.last_error}"
        print(f"{workflow.workflow_id}: {workflow.status.value} after {len(repairs)} repairs {repairs}; {outcome}")
        print(f"    steps: {path}")
    finished = all(w.status in (graft.WorkflowStatus.COMPLETED, graft.WorkflowStatus.FAILED) for w in results)
    return 0 if finished else 1


if __name__ == "__main__":
    sys.exit(trio.run(main))
