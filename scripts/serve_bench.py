"""What the HTTP layer of `balcony-edge serve` costs: the engine driven directly against the server with 1, 2, 4 and 8
concurrent streaming clients (aggregate tok/s, time to first token, inter-token latency p50/p95), in one run.

The single-stream comparison alternates the two (engine, server, engine, server, ...) with the same prompt and the
same definition of the rate (tokens after the first over the time from the first to the last), so that the
machine's drift between runs falls on both; its figure is the median of the pairs' ratios.

python scripts/serve_bench.py --json serve-bench.json            # the default export, full depth, greedy
python scripts/serve_bench.py EXPORT --clients 1,2,4 --tokens 64

The server runs in its own process (`balcony-edge serve --budget full --parallel N`), the clients in this one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from balcony_edge.common.paths import default_export_dir
from balcony_edge.runtime import Engine

PROMPT = (
    "The harbour was quiet in the early morning. Fishing boats "
    "rocked against the pier while gulls circled overhead, and"
)


def rate(stamps: list[float]) -> float:
    """Tokens after the first over the time from the first to the last."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def engine_direct(engine: Engine, tokens: int) -> float:
    """Decode tok/s of one Engine.generate at full depth, greedy."""
    return rate(
        [time.perf_counter() for _ in engine.generate(PROMPT, max_new_tokens=tokens, budget="full", chat=False)]
    )


def single_stream_pairs(engine: Engine, url: str, model: str, tokens: int, repeats: int) -> dict:
    """Engine and one streaming client in turn, `repeats` pairs after a warm-up pair; medians and the median ratio."""

    async def served() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            return rate((await one_client(http, model, tokens))["stamps"])

    pairs = []
    for _ in range(repeats + 1):
        pairs.append((engine_direct(engine, tokens), asyncio.run(served())))
    pairs = pairs[1:]
    return {
        "engine_tok_s": round(statistics.median(e for e, _ in pairs), 2),
        "served_tok_s": round(statistics.median(s for _, s in pairs), 2),
        "served_vs_engine": round(statistics.median(s / e for e, s in pairs), 3),
        "pairs": [[round(e, 2), round(s, 2)] for e, s in pairs],
    }


async def one_client(http: httpx.AsyncClient, model: str, tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True, "budget": "full"}
    started = time.perf_counter()
    stamps = []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                stamps.append(time.perf_counter())
    return {"start": started, "stamps": stamps}


async def clients_at_once(url: str, model: str, count: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one_client(http, model, 4)  # warm-up
        runs = await asyncio.gather(*(one_client(http, model, tokens) for _ in range(count)))
    gaps = sorted(b - a for run in runs for a, b in zip(run["stamps"], run["stamps"][1:]))
    wall = max(r["stamps"][-1] for r in runs) - min(r["start"] for r in runs)
    aggregate = sum(len(r["stamps"]) for r in runs) / wall
    p95 = gaps[int(0.95 * (len(gaps) - 1))]
    return {
        "clients": count,
        "aggregate_tok_s": round(aggregate, 2),
        "ttft_ms_median": round(1000 * statistics.median(r["stamps"][0] - r["start"] for r in runs), 1),
        "itl_ms_p50": round(1000 * statistics.median(gaps), 2),
        "itl_ms_p95": round(1000 * p95, 2),
        # A client's fair share: one token every `clients` steps of the served rate.
        "itl_p95_vs_fair_step": round(p95 / (count / aggregate), 3),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export", nargs="?", type=Path, default=default_export_dir())
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="engine / server pairs for the single-stream ratio")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    engine = Engine.load(args.export)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "balcony_edge",
            "-q",
            "serve",
            str(args.export),
            "--port",
            str(port),
            "--budget",
            "full",
            "--parallel",
            str(max(counts)),
            "--queue",
            "0",
            "--signals",
            "temperature_degc=40",
        ]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                model = httpx.get(f"{url}/v1/models", timeout=2).json()["data"][0]["id"]
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.3)
        single = single_stream_pairs(engine, url, model, args.tokens, args.repeats)
        print(json.dumps(single))
        results = []
        for count in counts:
            result = asyncio.run(clients_at_once(url, model, count, args.tokens))
            results.append(result)
            print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(timeout=30)
    four = next((r for r in results if r["clients"] == 4), None)
    report = {
        "export": str(args.export),
        "tokens": args.tokens,
        "engine_direct_tok_s": single["engine_tok_s"],
        "http_single_vs_engine": single["served_vs_engine"],
        "single_stream": single,
        "itl_p95_vs_fair_step_at_4": four["itl_p95_vs_fair_step"] if four else None,
        "runs": results,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
