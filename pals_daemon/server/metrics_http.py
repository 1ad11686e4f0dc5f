"""The /metrics HTTP endpoint, bounded: any local user can reach it, so it must not cost the daemon its file
descriptors, threads or control loop (README "Limits and hardening").

prometheus_client's start_http_server runs a thread per connection with no timeout: ~1,000 idle connections
took every descriptor of a daemon at systemd's default 1,024, and 500 concurrent scrapers stretched the
control tick to 0.52 s by rendering the registry 500 times over, each holding the GIL. Here:

- at most MAX_METRICS_CONNECTIONS connections are served at once; one over the cap is closed at once (it
  costs a descriptor for microseconds), and the kernel's listen backlog holds (or refuses) the rest;
- a connection gets METRICS_REQUEST_DEADLINE_S in total to send its request and take the response (socket
  timeouts per read and write, and a reaper thread that shuts down any connection past its deadline);
- the exposition (prometheus_client's generate_latest: the collectors still render at scrape time) is
  rendered at most once per control tick, or per METRICS_MAX_AGE_S when no tick marks it stale, and every
  scrape in between is served the same bytes;
- no access log (the request line is client-controlled text).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pals_daemon.server.limits import (
    MAX_METRICS_CONNECTIONS,
    METRICS_LISTEN_BACKLOG,
    METRICS_MAX_REQUEST_BYTES,
    METRICS_REQUEST_DEADLINE_S,
)

log = logging.getLogger(__name__)

# A rendering is reused for at most this long when no tick marked it stale (a daemon always ticks faster).
METRICS_MAX_AGE_S = 1.0
# How often the reaper looks for connections past their deadline.
REAPER_INTERVAL_S = 0.25


class CachedExposition:
    """The registry rendered in the text format, reused until the next tick (or METRICS_MAX_AGE_S)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.renders = 0
        self._lock = threading.Lock()
        self._generation = 0
        self._body: bytes | None = None
        self._rendered_generation = -1
        self._rendered_at_s = 0.0

    def invalidate(self) -> None:
        """A new snapshot exists: the next scrape renders afresh (called from the control loop, cheap)."""
        self._generation += 1

    def render(self) -> bytes:
        """The current exposition; concurrent scrapers wait for one rendering instead of each doing their own."""
        with self._lock:
            now = time.monotonic()
            if (
                self._body is None
                or self._rendered_generation != self._generation
                or now - self._rendered_at_s > METRICS_MAX_AGE_S
            ):
                self._rendered_generation = self._generation
                self._body = generate_latest(self.registry)
                self._rendered_at_s = now
                self.renders += 1
            return self._body


class _MetricsHandler(BaseHTTPRequestHandler):
    server: BoundedMetricsServer
    # StreamRequestHandler applies it to the socket: every read and write times out after this long.
    timeout = METRICS_REQUEST_DEADLINE_S

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if len(self.requestline) + sum(len(k) + len(v) for k, v in self.headers.items()) > METRICS_MAX_REQUEST_BYTES:
            self.send_error(431)
            return
        body = self.server.exposition.render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
        """No access log: the request line is whatever the client sent."""


class BoundedMetricsServer(socketserver.ThreadingMixIn, HTTPServer):
    """HTTPServer with a connection cap, per-connection deadlines and a cached exposition."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = METRICS_LISTEN_BACKLOG

    def __init__(self, address: str, port: int, exposition: CachedExposition) -> None:
        # The family of the configured address (127.0.0.1 or ::1 and the like).
        self.address_family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        self.exposition = exposition
        self.rejected = 0  # connections closed at once for being over the cap
        self.reaped = 0  # connections shut down for passing their deadline
        self._slots = threading.BoundedSemaphore(MAX_METRICS_CONNECTIONS)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__((address, port), _MetricsHandler)
        self._reaper = threading.Thread(target=self._reap, name="metrics-reaper", daemon=True)
        self._reaper.start()

    @property
    def active(self) -> int:
        """Connections being served now."""
        with self._deadlines_lock:
            return len(self._deadlines)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        if not self._slots.acquire(blocking=False):
            self.rejected += 1
            self.shutdown_request(request)
            return
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + METRICS_REQUEST_DEADLINE_S
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def shutdown_request(self, request: socket.socket) -> None:  # type: ignore[override]
        super().shutdown_request(request)
        self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._deadlines_lock:
            if self._deadlines.pop(request, None) is None:
                return
        self._slots.release()

    def _reap(self) -> None:
        while not self._closing.wait(REAPER_INTERVAL_S):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [s for s, deadline in self._deadlines.items() if deadline < now]
            for s in late:
                self.reaped += 1
                try:
                    s.shutdown(socket.SHUT_RDWR)  # the handler's blocked read or write returns; it then closes
                except OSError:
                    pass

    def handle_error(self, request: object, client_address: object) -> None:  # type: ignore[override]
        """A connection that timed out, was reaped or reset: not worth a traceback on stderr."""
        log.debug("metrics connection from %s ended early", client_address, exc_info=True)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()


def serve_metrics(address: str, port: int, exposition: CachedExposition) -> BoundedMetricsServer:
    """Bind and serve in a background thread; returns the server (its server_address has the bound port)."""
    server = BoundedMetricsServer(address, port, exposition)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
