"""Memory of loaded sessions, each measurement in a fresh Python process so that none pollutes another.

`python -m balcony_edge.bench.memory FOLDER --mode all|full` loads the engine with every exit or the full model
alone, decodes a few tokens at each loaded exit (so that mapped weights are really read), and prints one JSON
object: the process's RSS, its resident memory with each page counted once (Linux), and, on CUDA, the GPU memory
this process holds (bytes).

The ratio compares the once-counted figure where there is one: the packed weights (runtime/core/packed_weights.py)
are one file that the pieces and the step graphs all map, and RSS counts a page once per mapping; PSS would count it
once but share it out with every other process mapping the file (the bench's own engine among them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from balcony_edge.runtime.core.sessions import THREAD_POOLS, SessionSettings, resolve_providers

MODES = ("all", "full")
WARM_TOKENS = 8


def measure_in_subprocess(folder: Path, mode: str, settings: SessionSettings) -> dict:
    """RSS (and GPU) bytes of a fresh process holding `mode` sessions of the export, after a short decode."""
    command = [
        sys.executable,
        "-m",
        "balcony_edge.bench.memory",
        str(folder),
        "--mode",
        mode,
        "--thread-pool",
        settings.thread_pool,
    ]
    for provider in settings.providers:
        command += ["--provider", provider]
    if settings.threads:
        command += ["--threads", str(settings.threads)]
    command += ["--prepack" if settings.prepack else "--no-prepack"]
    command += ["--huge-pages" if settings.huge_pages else "--no-huge-pages"]
    command += ["--packed-weights" if settings.packed_weights else "--no-packed-weights"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        from balcony_edge.common.errors import BalconyError

        raise BalconyError(f"the memory probe failed ({mode}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_ratio(folder: Path, settings: SessionSettings) -> dict:
    """All exits loaded against the full model alone, on the engine's session settings: both measurements and their
    ratio."""
    measured = {mode: measure_in_subprocess(folder, mode, settings) for mode in MODES}
    key = next(k for k in ("gpu_bytes", "resident_bytes", "rss_bytes") if measured["full"].get(k))
    return {
        "all_exits": measured["all"],
        "full_only": measured["full"],
        "measured": key,
        "ratio_all_vs_full": round(measured["all"][key] / measured["full"][key], 3),
    }


def resident_bytes() -> int | None:
    """This process's memory in RAM with each page counted once (Linux; else None): its anonymous memory, and the
    distinct pages of each file it maps (a page mapped twice, as packed weights are by a piece and a step graph, is
    counted once), from /proc/self/smaps and the present bits of /proc/self/pagemap."""
    page = os.sysconf("SC_PAGE_SIZE")
    try:
        smaps = Path("/proc/self/smaps").read_text().splitlines()
        pagemap = open("/proc/self/pagemap", "rb")
    except OSError:
        return None
    anonymous, file_pages = 0, dict[tuple[str, int], list[np.ndarray]]()  # (device, inode) -> file page numbers
    with pagemap:
        for line in smaps:
            fields = line.split()
            if line.startswith("Anonymous:"):
                anonymous += int(fields[1]) * 1024
            elif "-" in fields[0] and len(fields) >= 6 and fields[5].startswith("/"):  # a file mapping
                start, end = (int(address, 16) for address in fields[0].split("-"))
                first_page, inode = int(fields[2], 16) // page, (fields[3], int(fields[4]))
                pagemap.seek(start // page * 8)
                entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
                # present (bit 63) and the file's own page (bit 61), not a private copy (counted as anonymous)
                present = np.flatnonzero((entries >> np.uint64(63)) & (entries >> np.uint64(61)) & np.uint64(1))
                file_pages.setdefault(inode, []).append(first_page + present)
    distinct = sum(len(np.unique(np.concatenate(pages))) for pages in file_pages.values())
    return anonymous + distinct * page


def _gpu_bytes() -> int | None:
    """GPU memory held by this process (NVML), or None without an NVIDIA GPU or nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == os.getpid():
                return int(process.usedGpuMemory)
    except Exception:  # no NVML here: CPU-only measurement
        return None
    return None


def probe(folder: Path, mode: str, settings: SessionSettings) -> dict:
    """Load, touch every weight by decoding, and read this process's memory."""
    import psutil

    from balcony_edge.runtime.core.engine import Engine
    from balcony_edge.runtime.core.manifest import Manifest

    manifest = Manifest.load(folder)
    if mode == "full":  # the full model's chain alone: no balcony pieces
        full = manifest.exits[-1]
        manifest = replace(manifest, exits=[full], pieces=[p for p in manifest.pieces if p.name in full.chain])
    engine = Engine(folder, manifest, settings, verify=False)
    for exit in engine.exits:
        sequence = engine.sequence(list(range(1, 1 + WARM_TOKENS)))
        for token in range(WARM_TOKENS):
            sequence.logits(exit)
            sequence.append(token + 1)
    result = {
        "mode": mode,
        "exits": engine.exits,
        "rss_bytes": psutil.Process().memory_info().rss,
        "prepack": engine.prepack,
        "huge_pages_mb": engine.huge_page_bytes >> 20,
        "step_graphs": sorted(engine.step_graphs),
    }
    resident = resident_bytes()
    if resident is not None:
        result["resident_bytes"] = resident
    gpu = _gpu_bytes() if engine.provider != "CPUExecutionProvider" else None
    if gpu is not None:
        result["gpu_bytes"] = gpu
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--provider", action="append", help="repeatable, in order of preference; default: cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prepack", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--packed-weights", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--thread-pool", choices=THREAD_POOLS, default="session")
    args = parser.parse_args()
    settings = SessionSettings(
        resolve_providers(args.provider or ["cpu"]),
        args.threads,
        prepack=args.prepack,
        thread_pool=args.thread_pool,
        huge_pages=args.huge_pages,
        packed_weights=args.packed_weights,
    )
    print(json.dumps(probe(args.folder, args.mode, settings)))


if __name__ == "__main__":
    main()
