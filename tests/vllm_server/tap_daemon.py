"""The real ``pals-daemon`` (``pals_daemon.cli.daemon_main``) with a tap on what it accepts from engines.

The daemon keeps finished requests' TTFT/TPOT and per-expert counts only inside a control window, and
exports neither (its API shows throughput, running, waiting and limits). To compare them with what the
client measured, this entry point wraps two methods of the running daemon to also append, as JSON lines to
``PALS_TEST_TAP`` (one file per daemon process), every step report the daemon accepted and every expert-load
report it parsed. The daemon's own code runs unchanged: the tap records after the real method returned.
Test-only: never shipped as an entry point.
"""

from __future__ import annotations

import json
import os
import sys
import threading

from pals_daemon.cli import daemon_main
from pals_daemon.server import engine_link, engines

_lock = threading.Lock()


def _open_tap():
    path = os.environ["PALS_TEST_TAP"]
    return open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process


def install() -> None:
    """Wrap EngineSession.add_step_report and engine_link.expert_load_tokens to record what they accept."""
    tap = _open_tap()

    def write(record: dict) -> None:
        with _lock:
            tap.write(json.dumps(record) + "\n")

    add_step_report = engines.EngineSession.add_step_report

    def tapped_add_step_report(self, report):  # type: ignore[no-untyped-def]
        add_step_report(self, report)  # raises (and records nothing) for a report the daemon refuses
        write(
            {
                "kind": "step",
                "engine_id": self.registration.engine_id,
                "window_s": report.window_s,
                "num_steps": report.num_steps,
                "prefill_tokens": report.prefill_tokens,
                "decode_tokens": report.decode_tokens,
                "num_running": report.num_running,
                "num_waiting": report.num_waiting,
                "arrived_requests": report.arrived_requests,
                "finished": [[f.ttft_ms, f.tpot_ms, f.prompt_tokens, f.output_tokens] for f in report.finished],
            }
        )

    expert_load_tokens = engine_link.expert_load_tokens

    def tapped_expert_load_tokens(report):  # type: ignore[no-untyped-def]
        tokens = expert_load_tokens(report)
        write(
            {
                "kind": "expert_load",
                "gpu_uuid": report.gpu_uuid,
                "layers": {str(layer.layer): list(layer.tokens_per_expert) for layer in report.layers},
            }
        )
        return tokens

    engines.EngineSession.add_step_report = tapped_add_step_report  # type: ignore[method-assign]
    engine_link.expert_load_tokens = tapped_expert_load_tokens


if __name__ == "__main__":
    install()
    sys.exit(daemon_main.main())
