"""Check the torch-free runtime on this machine (a Jetson, another Python) against an export folder.

    python scripts/runtime_smoke.py EXPORT_FOLDER [--provider cpu]

Loads the export with the runtime alone, generates at every exit, checks that bad prompts are refused,
that a hanging signal source costs one timeout, and that threads sharing the engine give their
single-threaded text; prints one JSON object and exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine, SamplingConfig
from balcony_edge.runtime.device.hub import SignalHub
from balcony_edge.runtime.device.sources import Signals

GREEDY = SamplingConfig(temperature=0.0)
BAD_PROMPTS = ("", "undecodable \udcff byte", "escape \x1b character")


class HangingSource:
    """A sensor whose driver never answers."""

    name, live = "hanging", True

    def read(self, token_index: int | None = None) -> Signals:
        threading.Event().wait()
        return Signals()


def text(engine: Engine, prompt: str, budget: str, tokens: int, signals: SignalHub | None = None) -> str:
    return "".join(t.text for t in engine.generate(prompt, tokens, budget=budget, sampling=GREEDY, signals=signals))


def refused(engine: Engine, prompt: str) -> bool:
    try:
        next(engine.generate(prompt, 1))
    except BalconyError:
        return True
    return False


def hang_delay(engine: Engine, timeout_s: float) -> float:
    """Extra seconds eight tokens take when a signal source hangs (one timeout, not one per token)."""
    started = time.monotonic()
    text(engine, "Hello", "full", 8)
    plain = time.monotonic() - started
    started = time.monotonic()
    text(engine, "Hello", "full", 8, SignalHub([HangingSource()], read_timeout_s=timeout_s, on_warning=lambda _: None))
    return time.monotonic() - started - plain


def threads_agree(engine: Engine, budget: str, rounds: int = 3) -> bool:
    prompts = ("The harbour was quiet", "A small model runs", "Tell me about the sea")
    expected = {p: text(engine, p, budget, 8) for p in prompts}
    wrong: list[str] = []

    def work(prompt: str) -> None:
        for _ in range(rounds):
            if text(engine, prompt, budget, 8) != expected[prompt]:
                wrong.append(prompt)

    workers = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return not wrong


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument(
        "--provider", action="append", help="tensorrt, cuda or cpu (repeatable); default: the engine's order"
    )
    args = parser.parse_args()
    engine = Engine.load(args.export, providers=args.provider)
    checks = {
        "runtime_without_torch": "torch" not in sys.modules and "transformers" not in sys.modules,
        "every_exit_generates": all(text(engine, "Hello", str(exit), 4) for exit in engine.exits),
        "bad_prompts_refused": all(refused(engine, prompt) for prompt in BAD_PROMPTS),
        "hanging_source_costs_one_timeout": hang_delay(engine, timeout_s=0.3) < 0.3 + 0.5,
        "threads_agree": threads_agree(engine, str(engine.exits[0])),
    }
    print(json.dumps({"python": platform.python_version(), "provider": engine.describe(), "checks": checks}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
