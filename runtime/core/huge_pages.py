"""Transparent huge pages (2 MiB) under onnxruntime's prepacked weights, the memory a decode step streams: a step
reads every weight of its exit once (int4 exit 8: about 35 MB, full depth about 85 MB), thousands of 4 KiB pages
and their TLB misses a step (docs/benchmarks.md, "Huge pages", for what it brings).

onnxruntime allocates prepacked weights itself, so the anonymous memory that appears while the sessions open is
collapsed into huge pages once they are open (MADV_COLLAPSE: Linux 6.1 and later). Only 2 MiB blocks whose pages are
all present are collapsed (packed weights are written whole; a thread's stack is not), so collapsing never adds
memory, and nothing is advised for later faults. The kernel would collapse whatever the THP setting; we leave a
machine whose THP is `never` alone, as its owner asked. Elsewhere (another OS, an older kernel) nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import mmap
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HUGE_PAGE = 2 << 20  # bytes
PAGE = mmap.PAGESIZE  # bytes
MADV_COLLAPSE = 25
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MAPS = Path("/proc/self/maps")

log = logging.getLogger(__name__)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library the process already has, where this is Linux and transparent huge pages are not switched off."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return None
    if "[never]" in setting:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    libc.mincore.restype = ctypes.c_int
    return libc


def available() -> bool:
    """Whether this process can ask for transparent huge pages."""
    return _libc() is not None


def _all_present(libc: ctypes.CDLL, start: int) -> bool:
    """Whether every page of the huge page at `start` is in memory (mincore)."""
    pages = HUGE_PAGE // PAGE
    present = (ctypes.c_ubyte * pages)()
    return libc.mincore(start, HUGE_PAGE, present) == 0 and all(flag & 1 for flag in present)


def _aligned(start: int, end: int) -> tuple[int, int]:
    """The whole huge pages inside [start, end)."""
    return (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), end & ~(HUGE_PAGE - 1)


def _anonymous_ranges() -> list[tuple[int, int]]:
    """This process's private writable anonymous mappings (heap included), as [start, end) byte addresses."""
    ranges = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split(maxsplit=5)
        address, perms, inode = fields[0], fields[1], fields[4]
        path = fields[5] if len(fields) > 5 else ""
        if inode == "0" and perms.startswith("rw") and perms.endswith("p") and path in ("", "[heap]"):
            start, end = (int(x, 16) for x in address.split("-"))
            ranges.append((start, end))
    return ranges


def _new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of `after` that no range of `before` covered."""
    new = []
    for start, end in after:
        pieces = [(start, end)]
        for old_start, old_end in before:
            pieces = [
                part for a, b in pieces for part in ((a, min(b, old_start)), (max(a, old_end), b)) if part[0] < part[1]
            ]
        new.extend(pieces)
    return new


@dataclass
class Collapsed:
    """What `collapse_new_memory` collapsed, once its block has ended."""

    bytes: int = 0


@contextlib.contextmanager
def collapse_new_memory(enabled: bool = True) -> Iterator[Collapsed]:
    """Collapse into huge pages the anonymous memory this process maps inside the block (onnxruntime's prepacked
    weights while sessions open), when enabled and available."""
    libc = _libc() if enabled else None
    before = _anonymous_ranges() if libc else []
    report = Collapsed()
    yield report
    if libc is None:
        return
    for start, end in _new_ranges(before, _anonymous_ranges()):
        first, last = _aligned(start, end)
        for block in range(first, last, HUGE_PAGE):
            if not _all_present(libc, block):
                continue
            if libc.madvise(block, HUGE_PAGE, MADV_COLLAPSE) == 0:
                report.bytes += HUGE_PAGE
            else:  # a kernel before 6.1, or a block it refuses: left on small pages
                log.debug("MADV_COLLAPSE at %#x failed (errno %d)", block, ctypes.get_errno())
