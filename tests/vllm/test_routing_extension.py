"""The routing-telemetry worker extension on real vLLM 0.33.0 parts (CPU), with a live daemon over a real socket.

Real: vLLM's ``WorkerWrapperBase`` (it resolves ``--worker-extension-cls``, injects the class into the worker's
bases after its clash check, and calls ``init_worker_extension``), vLLM's ``CustomRoutingRouter`` and its
``BaseRouter.select_experts`` capture path, torch on CPU, the daemon and the engine socket.
Stand-ins, because they cannot run here: the GPU worker (vLLM's ``Worker`` needs CUDA) and the MoE layer
around each router (vLLM's ``MoERunner`` needs an initialised distributed group and GPU kernels); the
stand-in layer has the three attributes the extension reads from a ``MoERunner``: ``router``, ``layer_id``
and ``expert_map``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vllm

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("vllm.v1.core.sched.scheduler", reason="vllm is not installed (scripts/test_vllm.sh runs this)")

import torch  # noqa: E402
from vllm.config import ModelConfig, VllmConfig  # noqa: E402
from vllm.model_executor.layers.fused_moe.router.custom_routing_router import CustomRoutingRouter  # noqa: E402
from vllm.v1.worker.worker_base import WorkerWrapperBase  # noqa: E402
from vllm_client.test_engine_client import client, daemon, eventually  # noqa: E402
from vllm_client.test_expert_reporter import record_shares  # noqa: E402

from pals_daemon.vllm.expert_reporter import ExpertLoadReporter  # noqa: E402
from pals_daemon.vllm.routing import (  # noqa: E402
    ExpertLoadCounter,
    RoutedLayer,
    RoutingTelemetryExtension,
    attach,
    find_routed_layers,
)

NUM_EXPERTS = 8
TOP_K = 2
EXTENSION = "pals_daemon.vllm.routing.RoutingTelemetryExtension"


def top_k_softmax(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool) -> Any:
    weights, ids = torch.topk(torch.softmax(gating_output.float(), dim=-1), topk, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class StandInMoELayer(torch.nn.Module):
    """What the extension reads from vLLM's MoERunner: a real router, the layer id, the expert map."""

    def __init__(self, layer_id: int, local_experts: list[int] | None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.router = CustomRoutingRouter(
            top_k=TOP_K, global_num_experts=NUM_EXPERTS, custom_routing_function=top_k_softmax
        )
        if local_experts is None:
            self.expert_map = None
        else:
            expert_map = torch.full((NUM_EXPERTS,), -1, dtype=torch.int32)
            expert_map[local_experts] = torch.arange(len(local_experts), dtype=torch.int32)
            self.expert_map = expert_map

    def forward(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        _, ids = self.router.select_experts(hidden, logits)
        return ids


class StandInModel(torch.nn.Module):
    def __init__(self, local_experts: list[int] | None = None, layer_ids: tuple[int, ...] = (1, 3)) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(StandInMoELayer(i, local_experts) for i in layer_ids)

    def forward(self, logits: torch.Tensor) -> list[torch.Tensor]:
        hidden = torch.zeros(logits.shape[0], 4)
        return [layer(hidden, logits) for layer in self.layers]


class _WorkerBase:
    pass


class StandInWorker(_WorkerBase):
    """vLLM's GPU Worker needs CUDA: this has the parts of its interface the extension uses."""

    def __init__(self, vllm_config: Any, **_: Any) -> None:
        self.vllm_config = vllm_config
        self.device = torch.device("cpu")
        self.model: StandInModel | None = None
        self.loads = 0

    def init_device(self) -> None:
        pass

    def load_model(self) -> None:
        self.loads += 1
        self.model = StandInModel(local_experts=[0, 1])

    def get_model(self) -> StandInModel:
        assert self.model is not None
        return self.model

    def shutdown(self) -> None:
        pass


def skewed_logits(tokens: int, hot_share: float, seed: int = 0) -> torch.Tensor:
    """Logits whose top-2 is experts {0,1} for ``hot_share`` of the tokens and a random other pair otherwise."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, NUM_EXPERTS, generator=g)
    hot = torch.rand(tokens, generator=g) < hot_share
    logits[hot, :2] += 20.0
    logits[~hot, :2] -= 20.0
    return logits


def test_the_extension_has_no_name_vllm_would_refuse() -> None:
    """vLLM asserts that no extension attribute clashes with the worker's; check against its real GPU Worker."""
    from vllm.v1.worker.gpu_worker import Worker  # noqa: PLC0415

    names = [n for n in dir(RoutingTelemetryExtension) if not n.startswith("__")]
    assert names and not [n for n in names if hasattr(Worker, n)]


def test_vllm_injects_the_extension_and_the_counts_are_exact(
    dirs: tuple[Path, Path], model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with daemon(dirs) as d:
        monkeypatch.setenv("PALS_ENGINE_SOCKET", str(d.socket_path))
        monkeypatch.setenv("PALS_GPU_UUID", d.uuids[0])
        monkeypatch.setenv("PALS_EXPERT_REPORT_INTERVAL_S", "0.05")
        config = VllmConfig(model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32"))
        config.parallel_config.worker_cls = f"{__name__}.StandInWorker"
        config.parallel_config.worker_extension_cls = EXTENSION
        wrapper = WorkerWrapperBase(rpc_rank=0)
        wrapper.init_worker([{"vllm_config": config}])
        assert RoutingTelemetryExtension in type(wrapper.worker).__mro__
        wrapper.init_device()  # vLLM calls init_worker_extension here
        wrapper.load_model()  # ... and the extension hooks the routers right after the load
        assert wrapper.worker.loads == 1
        status = wrapper.pals_routing_status()
        assert status["layers"] == 2 and status["gpu_uuid"] == d.uuids[0]

        logits = skewed_logits(200, hot_share=0.3)
        ids = wrapper.worker.model(logits)
        counter, reporter, _ = wrapper.worker._pals_routing
        expected = torch.bincount(ids[0].reshape(-1), minlength=NUM_EXPERTS)[:2].tolist()  # experts 0,1 are local
        assert counter.snapshot() == [(1, expected), (3, expected)]
        assert sum(expected) > 0

        # Reporting: the increments reach the daemon (unattributed here: no engine registered on this GPU).
        def sent() -> bool:
            wrapper.worker.model(logits)
            return reporter.tokens_sent > 0

        eventually(sent, what="expert-load reports sent")
        assert wrapper.pals_attach_routing() == 2  # idempotent: no second set of hooks
        wrapper.shutdown()  # vLLM calls destroy_worker_extension: the reporter stops
        assert reporter._thread is not None and not reporter._thread.is_alive()
        assert reporter.unattributed >= 1 and reporter.last_error == ""


def test_existing_capture_callback_is_kept() -> None:
    model = StandInModel(local_experts=None)
    theirs: list[torch.Tensor] = []
    model.layers[0].router.set_capture_fn(theirs.append)
    factory = lambda **kw: ExpertLoadReporter("/nonexistent/pals.sock", "GPU-x", kw["snapshot"], 60.0)  # noqa: E731
    attached = attach(model, "cpu", "GPU-x", reporter_factory=factory)
    assert attached is not None
    counter, reporter, _ = attached
    try:
        logits = skewed_logits(50, 0.5)
        model(logits)
        assert len(theirs) == 1  # vLLM's own routed-experts capture still sees every batch
        snapshot = dict(counter.snapshot())
        assert len(snapshot[1]) == NUM_EXPERTS and sum(snapshot[1]) == 50 * TOP_K  # TP: every expert is local
    finally:
        reporter.close()


def test_model_without_moe_is_left_alone() -> None:
    assert find_routed_layers(torch.nn.Sequential(torch.nn.Linear(4, 4))) == ([], [])
    assert attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), "cpu", "GPU-x") is None


def test_expert_parallel_skew_reaches_the_daemon_per_gpu(dirs: tuple[Path, Path]) -> None:
    """4 EP workers (experts 2g, 2g+1 on GPU g); routing hot on experts 0,1: the daemon sees GPU 0 loaded."""
    with daemon(dirs) as d:
        seen = record_shares(d)
        models = [StandInModel(local_experts=[2 * g, 2 * g + 1]) for g in range(4)]
        attached = []
        for model, uuid in zip(models, d.uuids, strict=True):

            def factory(gpu_uuid: str, snapshot: Any) -> ExpertLoadReporter:
                return ExpertLoadReporter(d.socket_path, gpu_uuid, snapshot, interval_s=0.05, max_backoff_s=0.2)

            result = attach(model, "cpu", uuid, reporter_factory=factory)
            assert result is not None
            attached.append(result)
        routed = torch.zeros(NUM_EXPERTS, dtype=torch.int64)
        try:
            with client(d.socket_path, d.uuids) as engine:
                engine.start()
                eventually(lambda: engine.registrations == 1, what="engine registration")
                batch = 0

                def step() -> int:
                    nonlocal batch
                    batch += 1
                    logits = skewed_logits(64, hot_share=0.55, seed=batch)
                    for model in models:  # every EP rank routes the same tokens (TP+EP, no DP)
                        ids = model(logits)[0]
                    routed.add_(torch.bincount(ids.reshape(-1), minlength=NUM_EXPERTS))
                    return sum(1 for s in seen if len(s) == 4)

                eventually(lambda: step() >= 5, timeout_s=10.0, what="ticks with all four GPUs' expert load")
        finally:
            for _, reporter, _ in attached:
                reporter.close()
        full = [s for s in seen if len(s) == 4]
        mean = {g: sum(s[g] for s in full) / len(full) for g in range(4)}
        truth = [(routed[2 * g] + routed[2 * g + 1]).item() / routed.sum().item() for g in range(4)]
        assert truth[0] > 0.4  # the case is skewed
        for g in range(4):
            assert mean[g] == pytest.approx(truth[g], abs=0.06), (mean, truth)


def test_out_of_range_ids_are_not_counted_and_never_fault() -> None:
    """A router's padding or sentinel id (negative, or past the experts) must not become an index error (on a
    GPU a device-side assert that would take serving down): it goes to a column no report includes."""
    counter = ExpertLoadCounter([RoutedLayer(5, NUM_EXPERTS, None)], "cpu")
    counter.capture_fn(0)(torch.tensor([[0, 1], [-1, 7], [NUM_EXPERTS, 1000]], dtype=torch.int32))
    assert counter.snapshot() == [(5, [1, 1, 0, 0, 0, 0, 0, 1])]
