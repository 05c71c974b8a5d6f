"""What an int8 KV cache does to a long conversation's decode step, end to end: exports given on the command line
(say the same precision with a float and with an int8 cache) take turns, round after round in one process (each
engine on thread pools of its own, spinning off), and each round measures the bench's context figure, a full-depth
decode step after 2,000 tokens of context over one after 64 (`balcony_edge.bench.decode.context_step_ratio`).
Alternating rounds spread this machine's drift over every export alike; the medians over rounds are printed last.

python scripts/kv_cache_context.py <cache>/exports/smollm2-balcony-int4 <cache>/exports/smollm2-balcony-int4-kv8
--rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from balcony_edge.bench.decode import context_step_ratio
from balcony_edge.runtime import Engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", type=Path, nargs="+")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    engines = {str(folder): Engine.load(folder, threads=args.threads) for folder in args.exports}
    for name, engine in engines.items():
        if engine.manifest.generation.context_length < 2016:
            raise SystemExit(
                f"{name}: its model holds {engine.manifest.generation.context_length} "
                "tokens, fewer than the 2,016 this measures"
            )
    ratios: dict[str, list[float]] = {name: [] for name in engines}
    for round in range(args.rounds):
        for name, engine in engines.items():
            ratio = context_step_ratio(engine, engine.exits[-1])["2000"]
            ratios[name].append(ratio)
            print(
                json.dumps(
                    {
                        "round": round,
                        "export": name,
                        "kv_cache": engine.manifest.kv.dtype,
                        "context_2000_over_64": ratio,
                    }
                ),
                flush=True,
            )
    for name, values in ratios.items():
        rounds = ", ".join(f"{v:.2f}" for v in values)
        print(
            f"{name} ({engines[name].manifest.kv.dtype} cache): median "
            f"{statistics.median(values):.2f} over {len(values)} rounds ({rounds})"
        )


if __name__ == "__main__":
    main()
