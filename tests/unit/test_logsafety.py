"""Client text in log messages is escaped (issue 10 B6): never a line of its own, never a control sequence."""

from __future__ import annotations

import io
import logging

from pals_daemon.server.logsafety import NATIVE_LINE_MAX_CHARS, EscapingFormatter, escape, escape_native_line

FORGED = "x\nERROR pals_daemon.server.daemon: GPU 0 no longer controlled\r\x1b[2J\u2028<3>y"


def test_escape_leaves_one_printable_line() -> None:
    out = escape(FORGED)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\u2028" not in out
    assert out == "x\\nERROR pals_daemon.server.daemon: GPU 0 no longer controlled\\r\\x1b[2J\\u2028<3>y".replace(
        "\\u2028", "\\x2028"
    )


def test_formatter_escapes_messages_and_arguments_but_keeps_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("test_logsafety")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("engine %s disconnected", FORGED)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed for %s", "a\nb")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("WARNING test_logsafety: engine x\\nERROR pals_daemon")
    assert lines[1] == "ERROR test_logsafety: failed for a\\nb"
    assert lines[2] == "Traceback (most recent call last):"  # the traceback keeps its own lines
    assert not any(line.startswith("ERROR pals_daemon") for line in lines)


def test_native_lines_are_prefixed_escaped_and_cut() -> None:
    line = escape_native_line(b"E1206 chttp2] Debug Text: a\rb\x1b")
    assert line == b"grpc-core: E1206 chttp2] Debug Text: a\\rb\\x1b\n"
    long = escape_native_line(b"a" * (NATIVE_LINE_MAX_CHARS + 10))
    assert long.endswith(b"...\n") and len(long) == len(b"grpc-core: ") + NATIVE_LINE_MAX_CHARS + 4
    assert escape_native_line(b"\xff\xfe") == b"grpc-core: \\xff\\xfe\n"
