"""A neighbour for the bench: one process that keeps one core busy (a plain busy loop) while a decoder is measured
beside it, as a device runs other work beside the model. It stops itself after a time limit, so it never outlives
the bench."""

from __future__ import annotations

import subprocess
import sys
import time
from contextlib import contextmanager

SETTLE_S = 0.3  # the busy loop is running before the measurement starts
BUSY_LOOP = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def busy_core(limit_s: float = 900.0):
    """While entered, one process spins on the CPU (for at most limit_s)."""
    neighbour = subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(limit=limit_s)])
    try:
        time.sleep(SETTLE_S)
        yield
    finally:
        neighbour.kill()
        neighbour.wait()
