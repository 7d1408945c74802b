"""Run a test scenario on each event loop we support (asyncio, and uvloop when installed).

LIBRARIES.md §7 asks for the suite to pass on both loops.  A test takes the
``loop_name`` from :func:`available_loops` (e.g. as a parametrized fixture)
and calls ``run_on(loop_name, scenario())``: a fresh loop per call, closed
afterwards, with no dependence on pytest-asyncio's loop fixtures.

Logs: nothing.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from intermail.net.runner import loop_factory

T = TypeVar("T")


def available_loops() -> list[str]:
    """``["asyncio"]``, plus ``"uvloop"`` when it is importable."""
    loops = ["asyncio"]
    if importlib.util.find_spec("uvloop") is not None:
        loops.append("uvloop")
    return loops


def run_on(loop_name: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a new loop of the named kind."""
    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        return runner.run(coro)


def run_bounded(loop_name: str, scenario: Callable[[], Coroutine[Any, Any, T]], deadline: float) -> T:
    """``run_on`` a scenario (a coroutine function) that must finish within ``deadline`` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(deadline):
            return await scenario()

    return run_on(loop_name, bounded())
