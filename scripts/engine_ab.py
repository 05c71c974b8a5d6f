"""What one of the engine's settings brings: an engine with it on (`Engine.load(<setting>=True)`, the default)
against one with it off, greedy decode (128 tokens after a 64-token prompt) at every exit. Settings: huge_pages
(onnxruntime's CPU memory collapsed into huge pages) and packed_weights (weights packed once on disk, steps through
step graphs).

Default: one engine per process, on and off alternated in pairs (the order swapped every pair), as an application
runs one engine; prints each process's load time, memory and tok/s, then each exit's median ratio over the pairs.
--together: both engines in one process, decoding in turn, in each load order (where a session's memory lands moves
its speed too), and the largest difference between their logits, decoding at each exit and on a schedule that
switches exits.

python scripts/engine_ab.py <export> --setting packed_weights [--pairs 6]
python scripts/engine_ab.py <export> --setting huge_pages --together [--rounds 6] [--no-packed]

--no-packed: both engines without packed weights (where huge pages hold the prepacked weights).
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

from balcony_edge.bench.memory import resident_bytes
from balcony_edge.runtime import Engine

SETTINGS = ("huge_pages", "packed_weights")

PROMPT = list(range(100, 164))
NEW_TOKENS = 128


def decode(engine: Engine, exits: list[int]) -> tuple[float, np.ndarray]:
    """Greedy decode, step i at exits[i % len(exits)]: the median seconds of a step and every step's logits."""
    sequence = engine.sequence(PROMPT)
    sequence.make_room(NEW_TOKENS)
    token = int(np.argmax(sequence.logits(exits[0])))
    times, rows = [], []
    for step in range(NEW_TOKENS):
        start = time.perf_counter()
        sequence.append(token)
        rows.append(sequence.logits(exits[step % len(exits)]))
        token = int(np.argmax(rows[-1]))
        times.append(time.perf_counter() - start)
    return statistics.median(times), np.stack(rows)


def load(export: str, setting: str, on: bool, packed: bool) -> Engine:
    return Engine.load(export, **({"packed_weights": packed} | {setting: on}))


def alone(export: str, setting: str, on: bool, packed: bool) -> dict:
    """This process's one engine: seconds to load it, tok/s per exit (best of 3 runs), how much was collapsed, which
    exits step as one session, and the process's memory (MB: RSS, and each resident page once)."""
    started = time.perf_counter()
    engine = load(export, setting, on, packed)
    load_s = time.perf_counter() - started
    speeds = {str(exit): round(1 / min(decode(engine, [exit])[0] for _ in range(3)), 1) for exit in engine.exits}
    return {
        setting: on,
        "collapsed_mb": engine.huge_page_bytes >> 20,
        "step_graphs": sorted(engine.step_graphs),
        "load_s": round(load_s, 2),
        "rss_mb": psutil.Process().memory_info().rss >> 20,
        "resident_mb": (resident_bytes() or 0) >> 20,
        "tok_s": speeds,
    }


def together(export: str, setting: str, order: list[bool], rounds: int, packed: bool) -> dict:
    """Both engines in this process, loaded in `order`, decoding in turn: tok/s per exit and on / off, and the largest
    logit difference between them (each exit, and a schedule switching exit every 9 tokens)."""
    engines = {on: load(export, setting, on, packed) for on in order}
    result: dict = {"order": ["on" if on else "off" for on in order]}
    exits = engines[True].exits
    for exit in exits:
        times: dict[bool, list[float]] = {True: [], False: []}
        logits: dict[bool, np.ndarray] = {}
        for r in range(rounds):
            for on in order if r % 2 == 0 else order[::-1]:
                seconds, logits[on] = decode(engines[on], [exit])
                times[on].append(seconds)
        on_s, off_s = (statistics.median(times[on]) for on in (True, False))
        result[str(exit)] = {
            "on_tok_s": round(1 / on_s, 1),
            "off_tok_s": round(1 / off_s, 1),
            "ratio": round(off_s / on_s, 3),
            "max_logit_diff": float(np.abs(logits[True] - logits[False]).max()),
        }
    schedule = [exit for exit in exits for _ in range(9)]
    switched = {on: decode(engine, schedule)[1] for on, engine in engines.items()}
    result["switching_max_logit_diff"] = float(np.abs(switched[True] - switched[False]).max())
    return result


def child(*args: str) -> dict:
    command = [sys.executable, __file__, *args]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--setting", choices=SETTINGS, required=True)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--together", action="store_true")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--packed", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--child", choices=("on", "off", "on-first", "off-first"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.setting == "packed_weights" and not args.packed:
        parser.error("--no-packed holds packed weights off in both engines; not with --setting packed_weights")
    if args.child in ("on", "off"):
        print(json.dumps(alone(args.export, args.setting, args.child == "on", args.packed)))
    elif args.child:
        order = [True, False] if args.child == "on-first" else [False, True]
        print(json.dumps(together(args.export, args.setting, order, args.rounds, args.packed)))
    else:
        settings = (args.export, "--setting", args.setting, "--packed" if args.packed else "--no-packed")
        if args.together:
            for order in ("on-first", "off-first"):
                print(json.dumps(child(*settings, "--rounds", str(args.rounds), "--child", order)), flush=True)
            return
        ratios: dict[str, list[float]] = {}
        for pair in range(args.pairs):
            kinds = ("on", "off") if pair % 2 == 0 else ("off", "on")
            runs = {kind: child(*settings, "--child", kind) for kind in kinds}
            for kind in kinds:
                print(json.dumps(runs[kind]), flush=True)
            for exit, speed in runs["on"]["tok_s"].items():
                ratios.setdefault(exit, []).append(speed / runs["off"]["tok_s"][exit])
        summary = {exit: round(statistics.median(values), 3) for exit, values in ratios.items()}
        print(json.dumps({"setting": args.setting, "median_on_over_off": summary, "pairs": args.pairs}))


if __name__ == "__main__":
    main()
