"""Per-step overhead of the pals vLLM scheduler against vLLM 0.33.0's own, same process, same requests.

Run (the cached vLLM venv of scripts/test_vllm.sh):

    VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 .venvs/vllm/bin/python bench/vllm_overhead.py

Two schedulers are built side by side exactly as tests/vllm/test_vllm_scheduler.py builds them (a VllmConfig on a
local dummy model config, one full-attention KV group, CPU): vLLM's synchronous ``Scheduler`` ("base") and
``PalsScheduler`` ("pals"). Both receive the same add_request sequence and are stepped alternately (base, pals,
base, pals, ...) so that drift on a shared machine hits both alike. A step is ``schedule()`` plus
``update_from_output()`` with a synthetic ModelRunnerOutput (one token per request whose prompt is done); building
that output is not timed. Cases:

- decode256: 256 requests all decoding (max_num_seqs 256);
- mixed: 128 long decodes plus a stream of 1536-token prompts prefilled in chunks under a 2048-token budget
  (two always waiting), each generating 16 tokens then finishing (so requests are freed too).

Each case runs with the daemon PRESENT (a real daemon in this process, sim backend, over its Unix socket, its
controller forced to grant the configured limits so that both schedulers see the same workload while the pals
one applies a live directive every step) and ABSENT (no socket: the client thread retries with backoff).

The "hook" is the pals code per step timed on its own (time.perf_counter_ns around ``_pals_apply_limits`` and
``_pals_record``, the two per-step hooks), in a separate pass after the A/B pass so the timer does not inflate it.
Results: a table on stdout and bench/results/vllm_overhead.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # DaemonThread, as tests/vllm_client uses it

import torch  # noqa: E402
import vllm  # noqa: E402
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from pals_daemon.vllm import PalsScheduler  # noqa: E402

BLOCK = 16
MAX_MODEL_LEN = 8192
ENGINE_ID = "vllm-bench"
GOAL_PCT = 1.0
GOAL_US = 20.0


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    max_num_seqs: int
    max_num_batched_tokens: int
    num_blocks: int
    long_decodes: int  # requests added at the start, never finishing within the run
    prefill_prompt: int = 0  # >0: keep `prefill_waiting` prompts of this length waiting
    prefill_waiting: int = 0
    prefill_output: int = 16


CASES = [
    Case("decode256", max_num_seqs=256, max_num_batched_tokens=8192, num_blocks=72_000, long_decodes=256),
    Case(
        "mixed",
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        num_blocks=48_000,
        long_decodes=128,
        prefill_prompt=1536,
        prefill_waiting=2,
    ),
]


def write_model_dir(path: Path) -> Path:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 1000,
        "max_position_embeddings": 16384,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return path


def build(cls: Any, model_dir: Path, case: Case, **extra: Any) -> Any:
    """As tests/vllm/test_vllm_scheduler.py: the keyword arguments vLLM 0.33.0's EngineCore passes."""
    scheduler_config = SchedulerConfig(
        max_num_seqs=case.max_num_seqs,
        max_num_batched_tokens=case.max_num_batched_tokens,
        max_model_len=MAX_MODEL_LEN,
        enable_chunked_prefill=True,
        async_scheduling=False,
        is_encoder_decoder=False,
    )
    model_config = ModelConfig(
        model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=MAX_MODEL_LEN
    )
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config, model_config=model_config, cache_config=CacheConfig(block_size=BLOCK)
    )
    vllm_config.scheduler_config.async_scheduling = False
    kv_cache_config = KVCacheConfig(
        num_blocks=case.num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
            )
        ],
    )
    vllm_config.cache_config.num_gpu_blocks = case.num_blocks
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        include_finished_set=False,
        log_stats=False,
        block_size=BLOCK,
        hash_block_size=BLOCK,
        **extra,
    )


class Workload:
    """Adds the same requests (same ids, prompts, params) to every scheduler it drives."""

    def __init__(self, case: Case, scheds: list[Any]) -> None:
        self.case = case
        self.scheds = scheds
        self.next_id = 0
        self.long_params = SamplingParams(max_tokens=MAX_MODEL_LEN, ignore_eos=True)
        self.short_params = SamplingParams(max_tokens=case.prefill_output, ignore_eos=True)
        self._add(case.long_decodes, 32, self.long_params)

    def _add(self, n: int, prompt: int, params: SamplingParams) -> None:
        for _ in range(n):
            i = self.next_id
            self.next_id += 1
            for s in self.scheds:
                s.add_request(
                    Request(
                        request_id=f"r{i}",
                        prompt_token_ids=[i % 900 + 3] * prompt,
                        sampling_params=params,
                        pooling_params=None,
                    )
                )

    def top_up(self) -> None:
        """Before a step: keep `prefill_waiting` prompts waiting (the same for every scheduler)."""
        c = self.case
        if c.prefill_prompt:
            missing = c.prefill_waiting - len(self.scheds[0].waiting)
            if missing > 0:
                self._add(missing, c.prefill_prompt, self.short_params)


def fake_output(sched: Any, out: Any) -> ModelRunnerOutput:
    """One sampled token for each scheduled request whose prompt is done; none for a partial prefill."""
    req_ids = list(out.num_scheduled_tokens)
    requests = sched.requests
    sampled = [[5] if requests[rid].num_computed_tokens >= requests[rid].num_prompt_tokens else [] for rid in req_ids]
    return ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled
    )


def timed_step(sched: Any) -> int:
    ns = time.perf_counter_ns
    t0 = ns()
    out = sched.schedule()
    t1 = ns()
    mro = fake_output(sched, out)
    t2 = ns()
    sched.update_from_output(out, mro)
    t3 = ns()
    return (t1 - t0) + (t3 - t2)


def quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize_us(xs_ns: list[int]) -> dict[str, float]:
    us = [x / 1000.0 for x in xs_ns]
    return {
        "median_us": round(statistics.median(us), 2),
        "p90_us": round(quantile(us, 0.9), 2),
        "mean_us": round(statistics.fmean(us), 2),
    }


def instrument_hook(pals: Any) -> dict[str, list[int]]:
    """Wrap the two per-step pals hooks (instance attributes shadow the class methods) with perf_counter_ns."""
    acc: dict[str, list[int]] = {"apply": [0], "record": [0]}
    apply_limits, record = pals._pals_apply_limits, pals._pals_record
    ns = time.perf_counter_ns

    def timed_apply() -> None:
        t = ns()
        apply_limits()
        acc["apply"][0] += ns() - t

    def timed_record(scheduler_output: Any, outputs: Any) -> None:
        t = ns()
        record(scheduler_output, outputs)
        acc["record"][0] += ns() - t

    pals._pals_apply_limits = timed_apply
    pals._pals_record = timed_record
    return acc


def record_breakdown(pals: Any, steps: int, work: Workload) -> dict[str, float]:
    """Where the telemetry time goes, warm (re-run on one step's outputs): the in-step ``_pals_record`` and the
    work moved to the client thread (counting the outputs' tokens, reading the gauges)."""
    work.top_up()
    out = pals.schedule()
    outputs = VllmScheduler.update_from_output(pals, out, fake_output(pals, out))  # base path: no pals record
    ns = time.perf_counter_ns
    n_outputs = sum(len(e.outputs) for e in outputs.values())
    whole, counting, gauges = [], [], []
    client = pals.pals_client
    for _ in range(steps):
        pals._pals_sched_start[id(out)] = time.perf_counter()
        t = ns()
        pals._pals_record(out, outputs)
        whole.append(ns() - t)
        t = ns()
        pals._pals_decode_of(outputs)
        counting.append(ns() - t)
        t = ns()
        pals._pals_gauges()
        gauges.append(ns() - t)
        client._steps.clear() if len(client._steps) > 10_000 else None
    return {
        "outputs_per_step": n_outputs,
        "record_warm_median_us": round(statistics.median(whole) / 1000, 2),
        "client_thread_count_outputs_median_us": round(statistics.median(counting) / 1000, 2),
        "client_thread_gauges_median_us": round(statistics.median(gauges) / 1000, 2),
    }


def bootstrap_delta_ci(base: list[int], pals: list[int], n: int = 400, seed: int = 1) -> tuple[float, float]:
    """95% bootstrap interval of median(pals) - median(base), microseconds (pairs resampled together)."""
    import random  # noqa: PLC0415

    rng = random.Random(seed)
    m = len(base)
    deltas = []
    for _ in range(n):
        idx = [rng.randrange(m) for _ in range(m)]
        deltas.append(statistics.median(pals[i] for i in idx) - statistics.median(base[i] for i in idx))
    deltas.sort()
    return round(deltas[int(0.025 * n)] / 1000, 1), round(deltas[int(0.975 * n)] / 1000, 1)


def run_case(case: Case, daemon: str, model_dir: Path, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    d = None
    os.environ["PALS_ENGINE_ID"] = ENGINE_ID
    os.environ["PALS_REPORT_INTERVAL_S"] = str(args.report_interval)
    if daemon == "present":
        from vllm_client.test_engine_client import DaemonThread, eventually  # noqa: PLC0415

        run_dir = tmp / f"run-{case.name}"
        d = DaemonThread(run_dir, tmp / f"state-{case.name}").start()
        # Grant the configured limits: a live directive is applied every step, and the workload stays the same.
        original = d.runner.daemon.controller.step

        def forced(inp: Any) -> Any:
            decision = original(inp)
            engines = {
                k: dataclasses.replace(
                    e, max_num_seqs=case.max_num_seqs, max_num_batched_tokens=case.max_num_batched_tokens
                )
                for k, e in decision.engines.items()
            }
            return dataclasses.replace(decision, engines=engines)

        d.runner.daemon.controller.step = forced
        os.environ["PALS_ENGINE_SOCKET"] = str(d.socket_path)
        os.environ["PALS_GPU_UUIDS"] = ",".join(d.uuids)
    else:
        os.environ["PALS_ENGINE_SOCKET"] = str(tmp / "absent.sock")
        os.environ["PALS_GPU_UUIDS"] = "GPU-absent"
    try:
        base = build(VllmScheduler, model_dir, case)
        pals = build(PalsScheduler, model_dir, case)
        if d is not None:
            from vllm_client.test_engine_client import eventually  # noqa: PLC0415

            want = (case.max_num_seqs, case.max_num_batched_tokens)
            eventually(lambda: pals.pals_client.current_limits() == want, timeout_s=10, what="the directive")
        work = Workload(case, [base, pals])
        for _ in range(args.warmup):
            work.top_up()
            timed_step(base)
            timed_step(pals)
        gc.collect()
        base_ns: list[int] = []
        pals_ns: list[int] = []
        for i in range(args.steps):
            work.top_up()
            if i % 2:  # ABAB, with the order swapped every other step
                base_ns.append(timed_step(base))
                pals_ns.append(timed_step(pals))
            else:
                pals_ns.append(timed_step(pals))
                base_ns.append(timed_step(base))
        assert len(base.running) == len(pals.running) and len(base.waiting) == len(pals.waiting)
        state = {
            "running": len(pals.running),
            "waiting": len(pals.waiting),
            "kv_usage": round(pals.kv_cache_manager.usage, 3),
        }
        live = pals.pals_client.current_limits() is not None
        # Hook alone: a second pass with the two per-step hooks timed (base is stepped too, to keep pace).
        acc = instrument_hook(pals)
        hook_ns, apply_ns, record_ns = [], [], []
        for _ in range(args.hook_steps):
            work.top_up()
            a0, r0 = acc["apply"][0], acc["record"][0]
            timed_step(pals)
            timed_step(base)
            apply_ns.append(acc["apply"][0] - a0)
            record_ns.append(acc["record"][0] - r0)
            hook_ns.append(apply_ns[-1] + record_ns[-1])
        del pals._pals_apply_limits, pals._pals_record
        breakdown = record_breakdown(pals, 500, work)
        client = pals.pals_client
        result = {
            "case": case.name,
            "daemon": daemon,
            "steps": args.steps,
            "state_at_end": state,
            "directive_live_at_end": live,
            "client": {
                "registrations": client.registrations,
                "connects": client.connects,
                "reports_sent": client.reports_sent,
                "directives_received": client.directives_received,
                "dropped_steps": client.dropped_steps,
            },
            "pals_errors": pals.pals_errors,
            "base": summarize_us(base_ns),
            "pals": summarize_us(pals_ns),
            "delta_median_ci95_us": bootstrap_delta_ci(base_ns, pals_ns),
            "paired_diff_median_us": round(
                statistics.median(p - b for p, b in zip(pals_ns, base_ns, strict=True)) / 1000, 2
            ),
            "hook": summarize_us(hook_ns),
            "hook_apply_limits": summarize_us(apply_ns),
            "hook_record": summarize_us(record_ns),
            "record_breakdown": breakdown,
        }
        bm, pm = result["base"]["median_us"], result["pals"]["median_us"]
        result["delta_median_us"] = round(pm - bm, 2)
        result["ratio_pct"] = round((pm / bm - 1) * 100, 2)
        result["hook_pct_of_base"] = round(result["hook"]["median_us"] / bm * 100, 3)
        result["meets_goal_end_to_end"] = result["ratio_pct"] < GOAL_PCT or result["delta_median_us"] < GOAL_US
        result["meets_goal_hook"] = result["hook"]["median_us"] < GOAL_US or result["hook_pct_of_base"] < GOAL_PCT
        client.close()
        return result
    finally:
        if d is not None:
            d.stop()


def run_aa(case: Case, model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Control: two instances of vLLM's own scheduler, stepped the same way: the noise floor of the A/B above."""
    a = build(VllmScheduler, model_dir, case)
    b = build(VllmScheduler, model_dir, case)
    work = Workload(case, [a, b])
    for _ in range(args.warmup):
        work.top_up()
        timed_step(a)
        timed_step(b)
    gc.collect()
    a_ns: list[int] = []
    b_ns: list[int] = []
    for i in range(args.steps):
        work.top_up()
        if i % 2:
            a_ns.append(timed_step(a))
            b_ns.append(timed_step(b))
        else:
            b_ns.append(timed_step(b))
            a_ns.append(timed_step(a))
    am, bm = statistics.median(a_ns) / 1000, statistics.median(b_ns) / 1000
    return {
        "case": case.name,
        "a": summarize_us(a_ns),
        "b": summarize_us(b_ns),
        "delta_median_us": round(bm - am, 2),
        "delta_median_ci95_us": bootstrap_delta_ci(a_ns, b_ns),
        "ratio_pct": round((bm / am - 1) * 100, 2),
    }


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="measured steps per scheduler (after warm-up)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--hook-steps", type=int, default=1000)
    p.add_argument("--report-interval", type=float, default=0.1, help="PALS_REPORT_INTERVAL_S (production default)")
    p.add_argument("--cases", default="decode256,mixed")
    p.add_argument("--daemon", default="absent,present")
    p.add_argument("--aa", action="store_true", help="also run the A/A control (base vs base)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_overhead.json"))
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="pals-vb-", dir="/tmp"))  # AF_UNIX paths must stay short
    umask = os.umask(0o022)
    os.umask(umask)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
        os.environ.pop(var, None)
    results = []
    try:
        model_dir = write_model_dir(tmp / "dummy-llama")
        wanted = set(args.cases.split(","))
        for case in [c for c in CASES if c.name in wanted]:
            for daemon in args.daemon.split(","):
                r = run_case(case, daemon, model_dir, tmp, args)
                os.umask(umask)
                results.append(r)
                print(
                    f"  {case.name} daemon={daemon}: base {r['base']['median_us']} us,"
                    f" pals {r['pals']['median_us']} us, {r['ratio_pct']:+.2f}%, hook {r['hook']['median_us']} us",
                    flush=True,
                )
        controls = []
        if args.aa:
            for case in [c for c in CASES if c.name in wanted]:
                controls.append(run_aa(case, model_dir, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    hdr = (
        f"{'case':<10} {'daemon':<8} {'base med':>9} {'pals med':>9} {'delta':>8} {'delta 95% CI':>16} {'ratio':>8} "
        f"{'base p90':>9} {'pals p90':>9} {'hook med':>9} {'hook p90':>9} {'apply':>6} {'record':>7}"
    )
    print("\nper-step time, microseconds (schedule + update_from_output); ratio = pals/base - 1")
    print(hdr)
    for r in results:
        print(
            f"{r['case']:<10} {r['daemon']:<8} {r['base']['median_us']:>9.1f} {r['pals']['median_us']:>9.1f} "
            f"{r['delta_median_us']:>+8.1f} {str(r['delta_median_ci95_us']):>16} {r['ratio_pct']:>+7.2f}% "
            f"{r['base']['p90_us']:>9.1f} {r['pals']['p90_us']:>9.1f} {r['hook']['median_us']:>9.2f} "
            f"{r['hook']['p90_us']:>9.2f} {r['hook_apply_limits']['median_us']:>6.2f} "
            f"{r['hook_record']['median_us']:>7.2f}"
        )
    for c in controls:
        print(
            f"{c['case']:<10} {'A/A':<8} {c['a']['median_us']:>9.1f} {c['b']['median_us']:>9.1f} "
            f"{c['delta_median_us']:>+8.1f} {str(c['delta_median_ci95_us']):>16} {c['ratio_pct']:>+7.2f}%"
            "   (control: two vLLM schedulers, the noise floor)"
        )
    print(f"goal: < {GOAL_PCT}% or < {GOAL_US} us per step")
    for r in results:
        b = r["record_breakdown"]
        print(
            f"  {r['case']}/{r['daemon']}: in-step _pals_record warm {b['record_warm_median_us']} us; on the client"
            f" thread: counting {b['outputs_per_step']} outputs {b['client_thread_count_outputs_median_us']} us,"
            f" gauges {b['client_thread_gauges_median_us']} us"
        )
    doc = {
        "benchmark": "vllm_overhead",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 .venvs/vllm/bin/python bench/vllm_overhead.py "
        + " ".join(sys.argv[1:]),
        "machine": machine(),
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
        "scheduler": "sync (vllm.v1.core.sched.scheduler.Scheduler vs pals_daemon.vllm.PalsScheduler)",
        "goal": {"ratio_pct_below": GOAL_PCT, "or_delta_us_below": GOAL_US},
        "params": {
            "steps": args.steps,
            "warmup": args.warmup,
            "hook_steps": args.hook_steps,
            "report_interval_s": args.report_interval,
            "cases": [dataclasses.asdict(c) for c in CASES],
        },
        "results": results,
        "aa_control": controls,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
