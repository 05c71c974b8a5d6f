"""What huge pages under the prepacked weights bring: an engine with its onnxruntime memory collapsed into huge pages
against one without, greedy decode (128 tokens after a 64-token prompt) at every exit.

Default: one engine per process, the two kinds alternated in pairs (the order swapped every pair), as an application
runs one engine; prints each process's load time, memory and tok/s, then each exit's median ratio over the pairs.
--together: both engines in one process, decoding in turn, in each load order (where a session's memory lands moves
its speed too).

python scripts/huge_pages_ab.py <export> [--pairs 6]
python scripts/huge_pages_ab.py <export> --together [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import psutil

from balcony_edge.runtime import Engine

PROMPT = list(range(100, 164))
NEW_TOKENS = 128


def step_seconds(engine: Engine, exit: int) -> float:
    """Median seconds of one greedy decode step at `exit`."""
    sequence = engine.sequence(PROMPT)
    token = int(np.argmax(sequence.logits(exit)))
    times = []
    for _ in range(NEW_TOKENS):
        start = time.perf_counter()
        sequence.append(token)
        token = int(np.argmax(sequence.logits(exit)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alone(export: str, huge: bool) -> dict:
    """This process's one engine: seconds to load it, tok/s per exit (best of 3 runs), how much was collapsed and the
    process's resident memory (MB)."""
    started = time.perf_counter()
    engine = Engine.load(export, huge_pages=huge)
    load_s = time.perf_counter() - started
    speeds = {str(exit): round(1 / min(step_seconds(engine, exit) for _ in range(3)), 1) for exit in engine.exits}
    rss_mb = psutil.Process().memory_info().rss >> 20
    return {
        "huge": huge,
        "collapsed_mb": engine.huge_page_bytes >> 20,
        "load_s": round(load_s, 2),
        "rss_mb": rss_mb,
        "tok_s": speeds,
    }


def together(export: str, order: list[bool], rounds: int) -> dict:
    """Both engines in this process, loaded in `order`, decoding in turn: tok/s per exit and huge / small."""
    engines = {huge: Engine.load(export, huge_pages=huge) for huge in order}
    result: dict = {"order": ["huge" if huge else "small" for huge in order]}
    for exit in engines[True].exits:
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(rounds):
            for huge in order if r % 2 == 0 else order[::-1]:
                times[huge].append(step_seconds(engines[huge], exit))
        huge_s, small_s = (statistics.median(times[huge]) for huge in (True, False))
        result[str(exit)] = {
            "huge_tok_s": round(1 / huge_s, 1),
            "small_tok_s": round(1 / small_s, 1),
            "ratio": round(small_s / huge_s, 3),
        }
    return result


def child(*args: str) -> dict:
    command = [sys.executable, __file__, *args]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--together", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--child", choices=("huge", "small", "huge-first", "small-first"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("huge", "small"):
        print(json.dumps(alone(args.export, args.child == "huge")))
    elif args.child:
        order = [True, False] if args.child == "huge-first" else [False, True]
        print(json.dumps(together(args.export, order, args.rounds)))
    elif args.together:
        for order in ("huge-first", "small-first"):
            print(json.dumps(child(args.export, "--rounds", str(args.rounds), "--child", order)), flush=True)
    else:
        ratios: dict[str, list[float]] = {}
        for pair in range(args.pairs):
            kinds = ("huge", "small") if pair % 2 == 0 else ("small", "huge")
            runs = {kind: child(args.export, "--child", kind) for kind in kinds}
            for kind in kinds:
                print(json.dumps(runs[kind]), flush=True)
            for exit, speed in runs["huge"]["tok_s"].items():
                ratios.setdefault(exit, []).append(speed / runs["small"]["tok_s"][exit])
        summary = {exit: round(statistics.median(values), 3) for exit, values in ratios.items()}
        print(json.dumps({"median_huge_over_small": summary, "pairs": args.pairs}))


if __name__ == "__main__":
    main()
