"""What the HTTP layer of `balcony-edge serve` costs: the engine driven directly against the server with 1, 2, 4 and 8
concurrent streaming clients (aggregate tok/s, time to first token, inter-token latency p50/p95), and what prompt
reuse saves on a growing conversation (turn 3's time to first token, warm against cold), in one run.

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
from balcony_edge.runtime import Engine, SamplingConfig

PROMPT = (
    "The harbour was quiet in the early morning. Fishing boats "
    "rocked against the pier while gulls circled overhead, and"
)


def rate(stamps: list[float]) -> float:
    """Tokens after the first over the time from the first to the last."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def engine_direct(engine: Engine, tokens: int) -> float:
    """Decode tok/s of one Engine.generate at full depth, greedy."""
    generation = engine.generate(PROMPT, max_new_tokens=tokens, budget="full", sampling=SamplingConfig(), chat=False)
    return rate([time.perf_counter() for _ in generation])


TURNS = ("Tell me about harbour number {round}.", "What boats are there?", "And what do the gulls eat?")


async def first_token_s(http: httpx.AsyncClient, model: str, messages: list[dict], cache_prompt: bool) -> float:
    """Seconds from sending a streamed chat request to its first token."""
    body = {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0, "stream": True}
    started = time.perf_counter()
    async with http.stream("POST", "/v1/chat/completions", json=body | {"cache_prompt": cache_prompt}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line and '"role"' not in line:
                return time.perf_counter() - started
    raise RuntimeError("no token came")


async def growing_conversation(url: str, model: str, rounds: int, answer_tokens: int = 48) -> dict:
    """Turn 3 of a conversation whose turns 1 and 2 the server just answered: time to first token with its prompt
    reused against the same request without reuse (cache_prompt false), `rounds` conversations of their own."""
    warm, cold, length = [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for round_ in range(rounds + 1):
            messages: list[dict] = []
            for turn in TURNS[:2]:
                messages.append({"role": "user", "content": turn.format(round=round_)})
                body = {"model": model, "messages": messages, "max_tokens": answer_tokens, "temperature": 0}
                answer = (await http.post("/v1/chat/completions", json=body)).json()
                messages.append(answer["choices"][0]["message"])
                length = answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
            messages.append({"role": "user", "content": TURNS[2]})
            warm_s = await first_token_s(http, model, messages, True)
            cold_s = await first_token_s(http, model, messages, False)
            if round_:  # the first round warms the server up
                warm.append(warm_s)
                cold.append(cold_s)
    return {
        "turn3_prompt_tokens_about": length,
        "ttft_ms_warm": round(1000 * statistics.median(warm), 1),
        "ttft_ms_cold": round(1000 * statistics.median(cold), 1),
        "warm_vs_cold": round(statistics.median(w / c for w, c in zip(warm, cold)), 3),
    }


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
        conversation = asyncio.run(growing_conversation(url, model, args.repeats))
        print(json.dumps(conversation))
        results = []
        for count in counts:
            result = asyncio.run(clients_at_once(url, model, count, args.tokens))
            results.append(result)
            print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(timeout=30)
    one = next((r for r in results if r["clients"] == 1), None)
    four = next((r for r in results if r["clients"] == 4), None)
    lone_step_ms = 1000 / single["served_tok_s"]
    report = {
        "export": str(args.export),
        "tokens": args.tokens,
        "engine_direct_tok_s": single["engine_tok_s"],
        "http_single_vs_engine": single["served_vs_engine"],
        "single_stream": single,
        "turn3_ttft_warm_vs_cold": conversation["warm_vs_cold"],
        "conversation": conversation,
        "aggregate_4_vs_1": round(four["aggregate_tok_s"] / one["aggregate_tok_s"], 3) if four and one else None,
        "itl_p95_at_4_vs_lone_step": round(four["itl_ms_p95"] / lone_step_ms, 3) if four else None,
        "itl_p95_vs_fair_step_at_4": four["itl_p95_vs_fair_step"] if four else None,
        "runs": results,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
