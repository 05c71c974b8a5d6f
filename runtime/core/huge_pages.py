"""Transparent huge pages (2 MiB) under onnxruntime's prepacked weights, the memory a decode step streams: a step
reads every weight of its exit once (int4 exit 8: about 35 MB, full depth about 85 MB), thousands of 4 KiB pages
and their TLB misses a step (docs/benchmarks.md, "Huge pages", for what it brings).

onnxruntime allocates prepacked weights itself, so the anonymous memory that appears while the sessions open is
collapsed into huge pages once they are open (MADV_COLLAPSE: Linux 6.1 and later, whatever the THP setting short of
`never`; the kernel refuses some ranges, such as thread stacks, which stay as they are). Nothing is advised for later
faults, so memory not yet touched stays unmapped. Elsewhere (another OS, an older kernel, THP off) nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

HUGE_PAGE = 2 << 20  # bytes
MADV_COLLAPSE = 25
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_MAPS = Path("/proc/self/maps")

log = logging.getLogger(__name__)


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's madvise where this is Linux and transparent huge pages are not switched off, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        setting = _THP_SETTING.read_text()
    except OSError:
        return None
    if "[never]" in setting:
        return None
    madvise = ctypes.CDLL(None, use_errno=True).madvise  # the C library the process already has
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def available() -> bool:
    """Whether this process can ask for transparent huge pages."""
    return _madvise() is not None


def _aligned(start: int, end: int) -> tuple[int, int]:
    """The whole huge pages inside [start, end)."""
    return (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), end & ~(HUGE_PAGE - 1)


def _anonymous_ranges() -> list[tuple[int, int]]:
    """This process's private writable anonymous mappings (heap included), as [start, end) byte addresses."""
    ranges = []
    for line in _MAPS.read_text().splitlines():
        fields = line.split()
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
    madvise = _madvise() if enabled else None
    before = _anonymous_ranges() if madvise else []
    report = Collapsed()
    yield report
    if madvise is None:
        return
    for start, end in _new_ranges(before, _anonymous_ranges()):
        first, last = _aligned(start, end)
        if last - first < HUGE_PAGE:
            continue
        if madvise(first, last - first, MADV_COLLAPSE) == 0:
            report.bytes += last - first
        else:  # a kernel before 6.1, or a range it refuses (thread stacks): left on small pages
            log.debug("MADV_COLLAPSE of %d bytes failed (errno %d)", last - first, ctypes.get_errno())
