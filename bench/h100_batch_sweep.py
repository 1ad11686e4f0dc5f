"""Decode batch sweep on one real GPU, measured through pals-daemon's own NVML read path.

A randomly initialised decoder (an 8-expert, top-2 Mixtral-style MoE by default, or a dense Llama-style model)
is built with transformers in bf16 on CUDA and decodes greedily with a KV cache at several batch sizes. For each
batch the script warms up, then decodes for at least ``--seconds`` while reading the GPU through
``pals_daemon.gpu.nvml.NvmlBackend().open()`` / ``device.read()`` / ``device.constraints()``: the energy counter
(mJ) before and after, and a background thread sampling the 1-s average power, the instantaneous power, the SM
clock, the enforced limit and the clock-event reasons about every 100 ms.

READ-ONLY: this script never calls ``set_power_limit_mw`` or any other NVML setter; the GPU may be shared.

Why batch matters for tokens/J: decode is memory-bound and largely insensitive to SM clock (prefill is
compute-bound); see shared/data/README.md, "Facts from the literature" (GreenLLM, arXiv 2508.16449; Maliakel et
al., arXiv 2501.08219). Each decode step streams the weights once whatever the batch, so a larger batch spreads
that cost over more tokens until the step becomes compute-bound or the power cap binds (on H100 at 700 W, small
dense models reach the cap from batch 128-192 up; MoE decode draws 250-560 W per GPU, ML.ENERGY v3).

Two decode modes: eager (DynamicCache; on the lent H100 VM every step took 70-120 ms, host-bound, GPU 7-31 %
busy) and ``--cuda-graph`` (StaticCache, one captured CUDA graph per step, replayed; GPU ~100 % busy), which is
closer to what vLLM does. Caveats: the weights are random (routing is not that of a trained model), and a
transformers model is not vLLM (no paged attention or continuous batching; the static cache attends over all
``prompt_len + graph_cache_tokens`` slots, masked). Results: bench/results/h100_<date>/README.md.

    python3 bench/h100_batch_sweep.py --model mixtral --cuda-graph --batches 1,4,16,64,128,256,512 --out sweep.json
    python3 bench/h100_batch_sweep.py --dry-run          # tiny model on CPU, no NVML (a smoke test)
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run as a script from anywhere: make the repository's pals_daemon importable without installing it.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# Clock-event reason bits (nvml.h, nvmlClocksEventReason*).
REASON_SW_POWER_CAP = 0x4
REASON_HW_SLOWDOWN = 0x8
REASON_SW_THERMAL = 0x20
REASON_HW_THERMAL = 0x40
REASON_HW_POWER_BRAKE = 0x80

# Model shapes. "mixtral": 4.76 B parameters (8.9 GiB bf16), 8 experts top-2 (MoE decode as in the PALS paper).
# "llama": 5.93 B parameters (11.1 GiB bf16), dense. "tiny-*": for --dry-run on CPU.
MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "mixtral": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    ),
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    ),
    "tiny-mixtral": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    ),
    "tiny-llama": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
}


@dataclass(frozen=True)
class Sample:
    """One NVML sample taken by the background thread (or at a window edge)."""

    t: float  # time.perf_counter()
    power_avg_w: float
    power_instant_w: float | None
    energy_mj: int
    enforced_limit_w: float
    requested_limit_w: float
    sm_clock_mhz: int
    clock_event_reasons: int
    gpu_util_pct: int | None


class GpuProbe:
    """Read-only access to one GPU through pals_daemon's NVML backend, plus a background sampler thread."""

    def __init__(self, gpu_index: int, interval_s: float) -> None:
        import pynvml

        from pals_daemon.gpu.nvml import NvmlBackend

        self._pynvml = pynvml
        self.backend = NvmlBackend([gpu_index])
        self.device = self.backend.open()[0]
        self.constraints = self.device.constraints()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)  # for utilization only (read-only)
        self._lock = threading.Lock()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)

    def info(self) -> dict[str, Any]:
        """Device identity, driver/NVML versions and power constraints."""
        p = self._pynvml
        ident = self.device.identity
        out: dict[str, Any] = {"index": ident.index, "uuid": ident.uuid, "name": ident.name}
        for key, fn in (("driver_version", "nvmlSystemGetDriverVersion"), ("nvml_version", "nvmlSystemGetNVMLVersion")):
            try:
                value = getattr(p, fn)()
                out[key] = value.decode() if isinstance(value, bytes) else str(value)
            except Exception as exc:  # noqa: BLE001 - informational only
                out[key] = f"unavailable: {exc}"
        c = self.constraints
        out["min_limit_w"] = c.min_limit_mw / 1000
        out["max_limit_w"] = c.max_limit_mw / 1000
        out["default_limit_w"] = c.default_limit_mw / 1000
        return out

    def read(self) -> Sample:
        """One sample now (serialised with the sampler thread)."""
        with self._lock:
            r = self.device.read()
            try:
                util: int | None = int(self._pynvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except self._pynvml.NVMLError:
                util = None
        return Sample(
            t=time.perf_counter(),
            power_avg_w=r.power_avg_mw / 1000,
            power_instant_w=None if r.power_instant_mw is None else r.power_instant_mw / 1000,
            energy_mj=r.energy_mj,
            enforced_limit_w=r.enforced_limit_mw / 1000,
            requested_limit_w=r.requested_limit_mw / 1000,
            sm_clock_mhz=r.sm_clock_mhz,
            clock_event_reasons=r.clock_event_reasons,
            gpu_util_pct=util,
        )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.read())
            except Exception as exc:  # noqa: BLE001 - keep sampling; report at the end
                self.errors.append(repr(exc))
            self._stop.wait(self._interval_s)

    def start(self) -> None:
        """Start the sampler thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the sampler and close NVML (the backend's own shutdown)."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.backend.close()

    def window(self, t0: float, t1: float) -> list[Sample]:
        """The background samples taken in [t0, t1]."""
        return [s for s in list(self.samples) if t0 <= s.t <= t1]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def summarize_window(
    batch: int, steps: int, wall_s: float, first: Sample | None, last: Sample | None, window: list[Sample]
) -> dict[str, Any]:
    """Throughput and energy figures for one measured window (NVML figures None without a probe)."""
    tokens = batch * steps
    out: dict[str, Any] = {
        "batch": batch,
        "decode_steps": steps,
        "generated_tokens": tokens,
        "wall_s": _round(wall_s, 4),
        "tokens_per_s": _round(tokens / wall_s if wall_s > 0 else None, 2),
        "tpot_ms": _round(1000 * wall_s / steps if steps else None, 3),
    }
    if first is None or last is None:
        return out
    energy_j = (last.energy_mj - first.energy_mj) / 1000
    edges = [first, *window, last]
    instants = [s.power_instant_w for s in window if s.power_instant_w is not None]
    reasons = 0
    for s in edges:
        reasons |= s.clock_event_reasons
    utils = [s.gpu_util_pct for s in window if s.gpu_util_pct is not None]
    out.update(
        {
            "energy_j": _round(energy_j, 3),
            "power_from_energy_w": _round(energy_j / wall_s if wall_s > 0 else None, 1),
            "power_avg_1s_mean_w": _round(_mean([s.power_avg_w for s in window]), 1),
            "power_avg_1s_max_w": _round(max((s.power_avg_w for s in window), default=None), 1),
            "power_instant_mean_w": _round(_mean(instants), 1),
            "power_instant_max_w": _round(max(instants, default=None), 1),
            "joules_per_token": _round(energy_j / tokens if tokens else None, 6),
            "tokens_per_joule": _round(tokens / energy_j if energy_j > 0 else None, 4),
            "sm_clock_max_mhz": max(s.sm_clock_mhz for s in edges),
            "sm_clock_mean_mhz": _round(_mean([float(s.sm_clock_mhz) for s in window]), 0),
            "gpu_util_mean_pct": _round(_mean([float(u) for u in utils]), 1),
            "clock_event_reasons_or": hex(reasons),
            "sw_power_cap_seen": bool(reasons & REASON_SW_POWER_CAP),
            "thermal_or_brake_seen": bool(
                reasons & (REASON_HW_SLOWDOWN | REASON_SW_THERMAL | REASON_HW_THERMAL | REASON_HW_POWER_BRAKE)
            ),
            "enforced_limit_w": sorted({s.enforced_limit_w for s in edges}),
            "samples": len(window),
            "energy_counter_monotonic": all(b.energy_mj >= a.energy_mj for a, b in zip(edges, edges[1:], strict=False)),
        }
    )
    return out


def build_model(name: str, device: str, dtype: Any) -> tuple[Any, dict[str, Any]]:
    """A randomly initialised causal LM of shape ``MODEL_SHAPES[name]`` on ``device``; returns (model, info)."""
    import torch
    import transformers

    shape = MODEL_SHAPES[name]
    if name.endswith("mixtral"):
        config = transformers.MixtralConfig(**shape)
        model_cls = transformers.MixtralForCausalLM
    else:
        config = transformers.LlamaConfig(**shape)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "name": name,
        "class": model_cls.__name__,
        "config": {k: v for k, v in shape.items()},
        "parameters": n_params,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "dtype": str(dtype),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
        "weights": "random (torch.manual_seed(0)); no checkpoint",
    }
    return model, info


def _forward_kwargs(model: Any) -> dict[str, Any]:
    """Ask for the last position's logits only where the model supports it (saves memory at prefill)."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


def _eager_decoder(model: Any, input_ids: Any, extra: dict[str, Any]) -> Callable[[], None]:
    """Prefill into a DynamicCache; return a function doing one eager greedy decode step per call."""
    out = model(input_ids=input_ids, use_cache=True, **extra)
    state = {"cache": out.past_key_values, "ids": out.logits[:, -1, :].argmax(dim=-1, keepdim=True)}

    def step() -> None:
        o = model(input_ids=state["ids"], past_key_values=state["cache"], use_cache=True)
        state["cache"] = o.past_key_values
        state["ids"] = o.logits[:, -1, :].argmax(dim=-1, keepdim=True)

    return step


def _graph_decoder(
    model: Any, input_ids: Any, extra: dict[str, Any], args: argparse.Namespace, device: str
) -> Callable[[], None]:
    """Prefill into a StaticCache; return a function replaying one CUDA-graph-captured greedy decode step per call.

    The static cache holds ``prompt_len + graph_cache_tokens`` positions and attends over all of them (masked),
    as a static-cache engine does. When it is full the write position wraps back to just after the prompt, so a
    batch can decode for any time at a fixed per-step cost. On CPU (dry runs) the same step runs without a graph.
    """
    import torch
    from transformers import StaticCache

    prompt_len = input_ids.shape[1]
    max_len = prompt_len + args.graph_cache_tokens
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, **extra)
    static_ids = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    del out
    layers = list(cache.layers)
    pos = [prompt_len]  # host mirror of every layer's cumulative_length (a device tensor the graph advances)

    def wrap_if_full() -> None:
        if pos[0] >= max_len:
            for layer in layers:
                layer.cumulative_length.fill_(prompt_len)  # in place: the graph keeps its address
            pos[0] = prompt_len

    def forward_step() -> None:
        o = model(input_ids=static_ids, past_key_values=cache, use_cache=True)
        static_ids.copy_(o.logits[:, -1, :].argmax(dim=-1, keepdim=True))

    def eager_step() -> None:
        wrap_if_full()
        forward_step()
        pos[0] += 1

    if not device.startswith("cuda"):
        return eager_step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    wrap_if_full()
    with torch.cuda.graph(graph):  # records, does not run: pos unchanged
        forward_step()

    def graph_step() -> None:
        wrap_if_full()
        graph.replay()
        pos[0] += 1

    return graph_step


def run_batch(
    model: Any,
    batch: int,
    args: argparse.Namespace,
    probe: GpuProbe | None,
    device: str,
) -> dict[str, Any]:
    """Prefill, warm up, then decode for at least ``args.seconds`` (or ``args.min_steps`` in dry runs)."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    vocab = model.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(1234 + batch)
    input_ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).to(device)
    extra = _forward_kwargs(model)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        t_prefill = time.perf_counter()
        if args.cuda_graph:
            step = _graph_decoder(model, input_ids, extra, args, device)
        else:
            step = _eager_decoder(model, input_ids, extra)
        sync()
        prepare_s = time.perf_counter() - t_prefill
        for _ in range(args.warmup_steps):
            step()
        sync()

        first = probe.read() if probe else None
        t0 = time.perf_counter()
        steps = 0
        while True:
            step()
            steps += 1
            if steps % args.check_every == 0 or steps >= args.max_steps:
                sync()
                elapsed = time.perf_counter() - t0
                if steps >= args.max_steps or (elapsed >= args.seconds and steps >= args.min_steps):
                    break
        sync()
        t1 = time.perf_counter()
        last = probe.read() if probe else None
    window = probe.window(t0, t1) if probe else []
    result = summarize_window(batch, steps, t1 - t0, first, last, window)
    result["mode"] = "cuda_graph" if args.cuda_graph else "eager"
    result["prefill_and_capture_s" if args.cuda_graph else "prefill_s"] = round(prepare_s, 4)
    if args.cuda_graph:
        result["static_cache_tokens"] = args.prompt_len + args.graph_cache_tokens
    else:
        result["context_end_tokens"] = args.prompt_len + args.warmup_steps + steps
    result["hit_max_steps"] = steps >= args.max_steps
    if device.startswith("cuda"):
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del step, input_ids
    return result


def idle_baseline(probe: GpuProbe, seconds: float) -> dict[str, Any]:
    """Power with the model loaded and no work queued."""
    first = probe.read()
    time.sleep(seconds)
    last = probe.read()
    window = probe.window(first.t, last.t)
    energy_j = (last.energy_mj - first.energy_mj) / 1000
    return {
        "seconds": round(last.t - first.t, 3),
        "power_from_energy_w": round(energy_j / (last.t - first.t), 1),
        "power_avg_1s_mean_w": _round(_mean([s.power_avg_w for s in window]), 1),
        "power_instant_mean_w": _round(_mean([s.power_instant_w for s in window if s.power_instant_w is not None]), 1),
        "sm_clock_mean_mhz": _round(_mean([float(s.sm_clock_mhz) for s in window]), 0),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the per-batch results."""
    cols = [
        ("batch", "batch", 5, "{}"),
        ("steps", "decode_steps", 5, "{}"),
        ("tok/s", "tokens_per_s", 9, "{:.1f}"),
        ("TPOT ms", "tpot_ms", 8, "{:.2f}"),
        ("E J", "energy_j", 8, "{:.1f}"),
        ("P(E) W", "power_from_energy_w", 7, "{:.1f}"),
        ("P1s W", "power_avg_1s_mean_w", 7, "{:.1f}"),
        ("Pinst W", "power_instant_mean_w", 7, "{:.1f}"),
        ("Pinst max", "power_instant_max_w", 9, "{:.1f}"),
        ("J/tok", "joules_per_token", 8, "{:.4f}"),
        ("tok/J", "tokens_per_joule", 8, "{:.2f}"),
        ("SMmax", "sm_clock_max_mhz", 5, "{}"),
        ("util%", "gpu_util_mean_pct", 5, "{:.0f}"),
        ("capbit", "sw_power_cap_seen", 6, "{}"),
        ("limit W", "enforced_limit_w", 8, "{}"),
    ]
    lines = [" ".join(f"{title:>{width}}" for title, _, width, _ in cols)]
    for row in rows:
        if "error" in row:
            lines.append(f"{row['batch']:>5} ERROR {row['error']}")
            continue
        cells = []
        for _, key, width, fmt in cols:
            value = row.get(key)
            if isinstance(value, list):
                text = ",".join(f"{v:g}" for v in value)
            elif value is None:
                text = "-"
            else:
                text = fmt.format(value)
            cells.append(f"{text:>{width}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="mixtral")
    p.add_argument("--batches", default="1,4,16,64,128,256", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--warmup-steps", type=int, default=8, help="decode steps after prefill before measuring")
    p.add_argument("--seconds", type=float, default=5.0, help="measure each batch for at least this long")
    p.add_argument("--min-steps", type=int, default=16)
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop a batch after this many decode steps (default 1500 eager, bounding the growing KV cache; "
        "100000 with --cuda-graph, whose static cache wraps around)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="decode from a StaticCache with each step captured in a CUDA graph (as vLLM does) instead of eager",
    )
    p.add_argument("--graph-cache-tokens", type=int, default=256, help="static-cache positions after the prompt")
    p.add_argument("--check-every", type=int, default=8, help="synchronise and check the clock every N steps")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="idle baseline after loading the model")
    p.add_argument("--sample-interval", type=float, default=0.1, help="NVML sampler period, s")
    p.add_argument("--gpu", type=int, default=0, help="GPU index (CUDA and NVML order assumed equal)")
    p.add_argument("--out", help="write the results as JSON here (rewritten after every batch)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny model on CPU, batches 1 and 2, 2 decode steps, no NVML (a smoke test without a GPU)",
    )
    args = p.parse_args(argv)
    if args.dry_run:
        args.model = "tiny-" + args.model.removeprefix("tiny-")
        args.batches = "1,2"
        args.prompt_len = min(args.prompt_len, 16)
        args.warmup_steps = 1
        args.seconds = 0.0
        args.min_steps = 2
        args.max_steps = 2
        args.check_every = 1
    if args.max_steps is None:
        args.max_steps = 100000 if args.cuda_graph else 1500
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.batch_list or any(b < 1 for b in args.batch_list):
        p.error("--batches needs positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; exit 0 when every batch ran (an out-of-memory batch is recorded, not fatal)."""
    args = parse_args(argv)
    import torch
    import transformers

    device = "cpu" if args.dry_run else f"cuda:{args.gpu}"
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device (use --dry-run for a CPU smoke test)", file=sys.stderr)
        return 2
    if not args.dry_run:
        torch.cuda.set_device(args.gpu)
        torch.backends.cuda.matmul.allow_tf32 = True

    probe = None if args.dry_run else GpuProbe(args.gpu, args.sample_interval)
    report: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "dry_run": args.dry_run,
        "gpu": probe.info() if probe else None,
        "torch_device_name": torch.cuda.get_device_name(args.gpu) if not args.dry_run else "cpu",
        "args": {k: v for k, v in vars(args).items() if k != "batch_list"},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "read_path": "pals_daemon.gpu.nvml.NvmlBackend([gpu]).open()[0].read() / .constraints(); read-only",
    }

    def write() -> None:
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(args.out + ".tmp", args.out)

    try:
        if probe:
            probe.start()
        t_build = time.perf_counter()
        model, report["model"] = build_model(args.model, device, dtype)
        report["model"]["build_s"] = round(time.perf_counter() - t_build, 2)
        print(
            f"model {args.model}: {report['model']['parameters'] / 1e9:.2f} B parameters, "
            f"{report['model']['weight_bytes'] / 2**30:.2f} GiB, experts "
            f"{report['model']['experts_implementation']}, attention {report['model']['attn_implementation']}",
            flush=True,
        )
        if probe:
            report["idle"] = idle_baseline(probe, args.idle_seconds)
            print(f"idle with the model loaded: {report['idle']}", flush=True)
        report["results"] = []
        write()
        for batch in args.batch_list:
            try:
                row = run_batch(model, batch, args, probe, device)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"batch": batch, "error": f"out of memory: {str(exc).splitlines()[0]}"}
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            report["results"].append(row)
            write()
            print(json.dumps(row), flush=True)
        if probe:
            all_samples = list(probe.samples)
            report["sampler"] = {
                "samples": len(all_samples),
                "errors": probe.errors[:20],
                "energy_counter_monotonic": all(
                    b.energy_mj >= a.energy_mj for a, b in zip(all_samples, all_samples[1:], strict=False)
                ),
                "enforced_limits_seen_w": sorted({s.enforced_limit_w for s in all_samples}),
                "requested_limits_seen_w": sorted({s.requested_limit_w for s in all_samples}),
            }
    finally:
        if probe:
            probe.stop()
        write()
    print()
    print(format_table(report["results"]))
    if probe:
        print(f"sampler: {report['sampler']}")
    ok = [r for r in report["results"] if "error" not in r]
    if ok and "tokens_per_joule" in ok[0]:
        best = max(ok, key=lambda r: r["tokens_per_joule"] or -math.inf)
        print(f"tokens/J peaks at batch {best['batch']}: {best['tokens_per_joule']} tok/J")
    return 0


if __name__ == "__main__":
    sys.exit(main())
