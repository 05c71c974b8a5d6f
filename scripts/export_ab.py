"""Two exports side by side in one process: greedy decode tok/s at each exit they share, rounds alternating between
them (the order turning each round), so that this machine's drift falls on both; per exit the medians and the median
of the rounds' ratios (B over A). Both must write the same tokens when their graphs compute the same thing (a new
schema, other session settings); quantisation settings may change tokens, which is reported, not refused.

Run it twice with A and B swapped: an order effect (the engine loaded second runs faster here, by up to 4%) shows
as a ratio above 1 both ways.

python scripts/export_ab.py <export A> <export B> --rounds 16
"""

from __future__ import annotations

import argparse
import json
import statistics

from balcony_edge.bench.decode import EngineDecoder, greedy_run
from balcony_edge.runtime import Engine

PROMPT = list(range(100, 164))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64, help="greedy decode steps a round, after a 64-token prompt")
    args = parser.parse_args()
    engines = {"a": Engine.load(args.a), "b": Engine.load(args.b)}
    exits = [e for e in engines["a"].exits if e in engines["b"].exits]
    for engine in engines.values():
        greedy_run(EngineDecoder(engine, exits[-1]), PROMPT, 16)  # warm both up
    report = {}
    for exit in exits:
        rates: dict[str, list[float]] = {"a": [], "b": []}
        tokens = {}
        for round_ in range(args.rounds):
            for name in ("a", "b") if round_ % 2 == 0 else ("b", "a"):
                run = greedy_run(EngineDecoder(engines[name], exit), PROMPT, args.tokens)
                rates[name].append(run.decode_tok_s)
                tokens[name] = run.tokens
        report[exit] = {
            "a_tok_s": round(statistics.median(rates["a"]), 1),
            "b_tok_s": round(statistics.median(rates["b"]), 1),
            "b_over_a": round(statistics.median(b / a for a, b in zip(rates["a"], rates["b"])), 3),
            "same_tokens": tokens["a"] == tokens["b"],
        }
        print(json.dumps({"exit": exit, **report[exit]}), flush=True)


if __name__ == "__main__":
    main()
