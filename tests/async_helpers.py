"""Helpers for tests that drive asyncio code from plain (sync) pytest tests (no pytest-asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import pytest

T = TypeVar("T")


def drive(coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """Run one test coroutine on a fresh event loop, with a hard timeout so that a hang fails the test."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def eventually(predicate: Callable[[], Awaitable[bool] | bool], timeout_s: float) -> None:
    """Poll ``predicate`` (wall time) until it holds; AssertionError after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


async def expect_rpc_error(awaitable: Awaitable[Any], code: grpc.StatusCode, *fragments: str) -> str:
    """Await a unary call that must fail with ``code``; the details must contain every fragment."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for fragment in fragments:
        assert fragment in details, details
    return details
