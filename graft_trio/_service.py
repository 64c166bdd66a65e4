"""Running a service (`run(task_status=...)`) behind `async with`: what `RaftNode` and `Manager` share."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def start_service(run: Callable[..., Awaitable[Any]]) -> tuple[contextlib.AsyncExitStack, trio.CancelScope]:
    """Open a nursery and `nursery.start(run)` in it; return the exit stack that closes the nursery (for
    `__aexit__`) and the nursery's cancel scope (to stop `run`).

    A start that fails or is cancelled closes the nursery before the error goes on: left open, it leaves
    trio's cancel-scope stack corrupted ("Cancel scope stack corrupted") for the rest of the run.
    """
    stack = contextlib.AsyncExitStack()
    nursery = await stack.enter_async_context(trio.open_nursery())
    try:
        await nursery.start(run)
    except BaseException:
        await stack.aclose()
        raise
    return stack, nursery.cancel_scope
