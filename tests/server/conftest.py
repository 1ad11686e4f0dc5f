"""Fixtures of tests/server: ``dirs`` from the shared in-process daemon harness (a file may define its own)."""

from daemon_harness import dirs  # noqa: F401 - a fixture, found by name
