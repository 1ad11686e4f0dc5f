"""No client-controlled text reaches the log as a line of its own (README "Limits and hardening").

Two writers share the daemon's stderr (the journal under systemd):

- Python logging: every message is formatted by EscapingFormatter, which escapes control characters
  (a newline becomes the two characters backslash-n), so an engine id, a model name or an error text
  quoting a client can never start a new line (a forged "ERROR ... GPU 0 no longer controlled"), nor carry
  a syslog priority prefix or terminal escapes.
- gRPC's C core writes to file descriptor 2 directly (absl logging), and quotes clients verbatim: a GOAWAY
  frame's debug text, newlines included, lands in its "Got goaway" line. filter_native_stderr() moves
  descriptor 2 onto a pipe read by a thread that prefixes every line with "grpc-core: ", escapes control
  characters and cuts lines at NATIVE_LINE_MAX_CHARS; Python's own stderr keeps the original descriptor.
  (GRPC_VERBOSITY=ERROR in the unit's environment quiets the core's INFO connection chatter; the filter
  is what makes its lines safe, whatever the verbosity.)
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import re
import sys
import threading
from typing import TextIO

# Control characters (C0, DEL, C1) and Unicode line/paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
NATIVE_PREFIX = b"grpc-core: "
# Longest native line passed on (gRPC's own lines are ~200 characters); the rest is cut, marked "...".
NATIVE_LINE_MAX_CHARS = 2048
# Bytes read from the pipe at a time.
_READ_BYTES = 65536


def escape(text: str) -> str:
    """``text`` with every control character written as an escape (one line, whatever it contained)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose messages are escaped (a traceback, added after the message, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape(record.message)
        return super().formatMessage(record)


def escape_native_line(line: bytes) -> bytes:
    """One line written by native code, made safe: prefixed, escaped, cut to NATIVE_LINE_MAX_CHARS."""
    text = line.decode("utf-8", errors="backslashreplace")
    cut = len(text) > NATIVE_LINE_MAX_CHARS
    text = escape(text[:NATIVE_LINE_MAX_CHARS]) + ("..." if cut else "")
    return NATIVE_PREFIX + text.encode() + b"\n"


class NativeStderrFilter:
    """Owns the pipe behind descriptor 2 and the thread that copies it, escaped, to the real stderr."""

    def __init__(self) -> None:
        self.original_fd = os.dup(2)
        read_fd, write_fd = os.pipe()
        self._read_fd = read_fd
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._thread = threading.Thread(target=self._copy, name="native-stderr", daemon=True)
        self._thread.start()

    def python_stderr(self) -> TextIO:
        """A text stream on the original stderr, for Python's own writes (logging, tracebacks)."""
        return io.TextIOWrapper(
            os.fdopen(os.dup(self.original_fd), "wb", buffering=0),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )

    def _copy(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, _READ_BYTES)
            except OSError:
                chunk = b""
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > 4 * NATIVE_LINE_MAX_CHARS:  # a line with no end: pass on what is there
                lines.append(pending)
                pending = b""
            if lines:
                self._write(b"".join(escape_native_line(line) for line in lines))
        if pending:
            self._write(escape_native_line(pending))

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.original_fd, data)
        except OSError:
            pass  # stderr gone: nothing to log to, but the pipe must keep being drained

    def close(self) -> None:
        """Put the original stderr back on descriptor 2 and pass on what is left in the pipe."""
        os.dup2(self.original_fd, 2)  # closes the pipe's last write end: the thread reads to the end
        self._thread.join(timeout=1.0)


def filter_native_stderr() -> NativeStderrFilter:
    """Route descriptor 2 through the escaping filter, point sys.stderr at the real stderr; undone at exit."""
    sys.stderr.flush()
    native = NativeStderrFilter()
    sys.stderr = native.python_stderr()
    atexit.register(native.close)
    return native
