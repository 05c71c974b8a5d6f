"""A Jetson app embedding balcony-edge's runtime: a custom signal source and a per-token latency budget.

    python examples/jetson_app.py [EXPORT_FOLDER] [--budget 40ms]

Needs only the runtime (onnxruntime-gpu from JetPack, numpy, tokenizers, psutil): no torch. The custom
source below reads the board's fan duty from sysfs and reports it next to the standard signals; swap in
whatever your app knows (a robot's own power budget, a mission phase, a user setting).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balcony_edge.common.errors import BalconyError
from balcony_edge.runtime import Engine, SignalHub, Signals, default_sources


class FanSource:
    """Fan duty (percent of full speed) from the Jetson's pwm-fan hwmon, as an extra signal."""

    name = "fan"
    live = True

    def __init__(self, root: str = "/"):
        self.paths = sorted(Path(root).glob("sys/devices/platform/pwm-fan/hwmon/hwmon*/pwm1"))

    def read(self, token_index: int | None = None) -> Signals:
        if not self.paths:
            return Signals()
        return Signals(extra={"fan_percent": int(self.paths[0].read_text()) * 100 / 255})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", nargs="?", default=None, help="export folder (default: the default export)")
    parser.add_argument(
        "--budget", default="40ms", help="auto, full, eco, an exit such as 16, or a latency such as 40ms"
    )
    parser.add_argument("--prompt", default="Give me three tips for keeping a robot cool.")
    parser.add_argument(
        "--trust-modified", action="store_true", help="load an export whose files differ from its checksums"
    )
    args = parser.parse_args()
    try:
        run(args)
    except BalconyError as err:  # a bad budget, a missing or tampered export: one line, as the CLI does
        sys.exit(f"error: {err}")


def run(args: argparse.Namespace) -> None:
    engine = Engine.load(args.export, trust_modified=args.trust_modified, warn=print)  # TensorRT, CUDA, then CPU
    print(f"running on {engine.describe()}")
    with SignalHub([*default_sources(), FanSource()], on_warning=print) as signals:
        for token in engine.generate(args.prompt, max_new_tokens=96, budget=args.budget, signals=signals):
            print(token.text, end="", flush=True)
        print()
        print(f"last token: exit {token.exit}, {token.latency_ms:.1f} ms ({token.reason})")


if __name__ == "__main__":
    main()
