"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from intermail.testing.loops import available_loops


@pytest.fixture(params=available_loops())
def loop_name(request) -> str:
    """Each event loop we support (asyncio, and uvloop when installed)."""
    return request.param
