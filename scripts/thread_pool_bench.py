"""Per-session thread pools against onnxruntime's one process-wide pool (`Engine.load(thread_pool=...)`), measured
side by side: the two run in turn, each in a fresh process (the process pool cannot be undone in a process), so
that the machine's drift between runs falls on both; per exit the figure is the median of the rounds' ratios.

python scripts/thread_pool_bench.py --json pools.json                 # the default export, every exit
python scripts/thread_pool_bench.py EXPORT --rounds 5 --busy 1         # with one busy process on the cores too

--busy N runs N processes that spin on the CPU during the measurement, to show what each pool does when other
work competes for the cores (a spinning pool waits by spinning).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from balcony_edge.bench.benchmark import bench_prompt
from balcony_edge.bench.decode import EngineDecoder, measure
from balcony_edge.common.paths import default_export_dir
from balcony_edge.runtime import Engine
from balcony_edge.runtime.core.sessions import THREAD_POOLS

BUSY_LOOP = "while True: pass"


def child(folder: Path, thread_pool: str, tokens: int, repeats: int) -> dict[str, float]:
    """Decode tok/s per exit of one engine on one kind of pool (medians of `repeats` greedy runs after a warm-up)."""
    engine = Engine.load(folder, thread_pool=thread_pool)
    prompt = bench_prompt(engine.codec, engine.manifest, 64)
    return {
        str(exit): measure(EngineDecoder(engine, exit), prompt, tokens, repeats).decode_tok_s for exit in engine.exits
    }


def run_child(folder: Path, thread_pool: str, tokens: int, repeats: int) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        str(folder),
        "--child",
        thread_pool,
        "--tokens",
        str(tokens),
        "--repeats",
        str(repeats),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(folder: Path, rounds: int, tokens: int, repeats: int, busy: int) -> dict:
    """Alternate the two pools for `rounds` rounds (the first mode of a round alternates too)."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        runs: dict[str, list[dict[str, float]]] = {pool: [] for pool in THREAD_POOLS}
        for round_number in range(rounds):
            order = THREAD_POOLS if round_number % 2 == 0 else tuple(reversed(THREAD_POOLS))
            for pool in order:
                runs[pool].append(run_child(folder, pool, tokens, repeats))
                print(f"round {round_number + 1}/{rounds} {pool}: {runs[pool][-1]}", file=sys.stderr)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    exits = list(runs["session"][0])
    return {
        "export": str(folder),
        "rounds": rounds,
        "tokens": tokens,
        "busy_processes": busy,
        "decode_tok_s": {
            pool: {e: round(statistics.median(r[e] for r in runs[pool]), 2) for e in exits} for pool in THREAD_POOLS
        },
        "process_vs_session": {
            e: round(statistics.median(p[e] / s[e] for p, s in zip(runs["process"], runs["session"])), 3) for e in exits
        },
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", nargs="?", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="greedy decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per exit in each process")
    parser.add_argument("--busy", type=int, default=0, help="busy processes competing for the cores")
    parser.add_argument("--child", choices=THREAD_POOLS, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    folder = args.export or default_export_dir()
    if args.child:
        print(json.dumps(child(folder, args.child, args.tokens, args.repeats)))
        return
    result = compare(folder, args.rounds, args.tokens, args.repeats, args.busy)
    text = json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
