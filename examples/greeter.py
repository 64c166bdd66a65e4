"""The workflow of SPEC section 2: one member, one node, one workflow.

    .venv/bin/python examples/greeter.py [--bind 127.0.0.1:7000] [--data-dir DIR]

Without `--data-dir` the member keeps its log in a fresh temporary directory, so the program can run again
(a workflow id is unique for as long as the cluster keeps it: a second run on the same directory would
raise `WorkflowExistsError`). It prints the final status and state of the workflow.
"""

from __future__ import annotations

import argparse
import tempfile

import attrs
import trio

import graft_trio as graft


@attrs.frozen
class GreeterConfig:
    message: str


@attrs.define
class GreeterState:
    name: str
    greeting: str | None = None


class Greeter(graft.Node[GreeterState, GreeterConfig]):
    name = "greeter"  # unique in the cluster
    retry = graft.RetryPolicy(max_attempts=3, initial_interval=1.0, backoff=2.0, max_interval=300.0)
    timeout = 300.0  # seconds per attempt; the attempt is cancelled past it

    async def execute(self, ctx: graft.NodeContext, state: GreeterState, config: GreeterConfig) -> graft.NodeResult:
        return graft.NodeResult(data={"greeting": f"{config.message}, {state.name}!"})


async def main(bind: str, data_dir: str) -> None:
    mgr = graft.Manager(node_id="node-1", bind=bind, data_dir=data_dir)
    mgr.register_node(Greeter())
    async with mgr:  # or: await nursery.start(mgr.run)
        await mgr.start_workflow(
            graft.WorkflowTrigger(
                workflow_id="wf-001",
                initial_state=GreeterState(name="Ada"),
                initial_nodes=[graft.NodeConfig(name="greeter", config=GreeterConfig(message="Hello"))],
            )
        )
        status = await mgr.wait_for_workflow("wf-001", timeout=10)
        print(status.status, status.current_state)  # WorkflowStatus.COMPLETED {'name': 'Ada', 'greeting': ...}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:7000", help="host:port this member listens on")
    parser.add_argument("--data-dir", default=None, help="where the member keeps its log (default: a temp dir)")
    args = parser.parse_args()
    if args.data_dir is not None:
        trio.run(main, args.bind, args.data_dir)
    else:
        with tempfile.TemporaryDirectory(prefix="graft-greeter-") as data_dir:
            trio.run(main, args.bind, data_dir)
