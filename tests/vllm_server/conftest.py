"""Fixtures of the vLLM-server stage (scripts/test_vllm_server.sh). No vllm import here: stage one collects
this directory, and its test modules skip themselves where vllm is not installed."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The harness sits beside this file; tests/ is not a package.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under a failed test of this stage, the tails of the daemon and vLLM logs it ran with."""
    outcome = yield
    report = outcome.get_result()
    harness = sys.modules.get("harness")  # imported only where vllm is (the stage's own venv)
    if not report.failed or harness is None:
        return
    for name, path in harness.PROCESS_LOGS.items():
        report.sections.append((f"{name} (tail)", harness.log_tail(path)))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight tiny Mixtral, made once per session (see harness.TINY_MIXTRAL)."""
    from harness import make_tiny_mixtral  # noqa: PLC0415

    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral"))


@pytest.fixture(scope="module")
def module_tmp() -> Iterator[Path]:
    """A short directory under /tmp for one module's daemon sockets (AF_UNIX paths stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pals-vs-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
