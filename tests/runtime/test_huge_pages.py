"""Huge pages under onnxruntime's prepacked weights: which memory is collapsed, and that an engine asks for it only
when told to."""

from __future__ import annotations

import contextlib
import mmap
import re

import numpy as np
import pytest

from balcony_edge.runtime import Engine
from balcony_edge.runtime.core import engine as engine_module
from balcony_edge.runtime.core import huge_pages


def _touched(nbytes: int) -> np.ndarray:
    """`nbytes` of fresh private anonymous memory, written once: what onnxruntime's allocator hands out (numpy's own
    large arrays would not do: numpy asks for huge pages for them itself)."""
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    array = np.frombuffer(memory, dtype=np.uint8)
    array[:] = 1
    return array


def _huge_bytes_under(array: np.ndarray) -> int:
    """Bytes of huge pages in the mappings that hold `array` (from /proc/self/smaps; collapsing splits a mapping)."""
    start, end = array.ctypes.data, array.ctypes.data + array.nbytes
    total, overlaps = 0, False
    for line in open("/proc/self/smaps"):
        span = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if span:
            overlaps = int(span[1], 16) < end and start < int(span[2], 16)
        elif overlaps and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total


def test_new_ranges_are_what_no_earlier_range_covered():
    before = [(0, 10), (20, 30)]
    assert huge_pages._new_ranges(before, [(0, 40)]) == [(10, 20), (30, 40)]
    assert huge_pages._new_ranges(before, before) == []
    assert huge_pages._new_ranges([], [(5, 7)]) == [(5, 7)]


def test_aligned_keeps_only_whole_huge_pages():
    page = huge_pages.HUGE_PAGE
    assert huge_pages._aligned(1, 3 * page + 5) == (page, 3 * page)
    first, last = huge_pages._aligned(page + 1, 2 * page + 1)
    assert last - first < page  # no whole huge page inside: nothing to collapse


def _collapse_works() -> bool:
    """Whether this kernel collapses a written 2 MiB block (Linux 6.1 and later, where nothing forbids it)."""
    if not huge_pages.available():
        return False
    scratch = _touched(2 * huge_pages.HUGE_PAGE)
    block, _ = huge_pages._aligned(scratch.ctypes.data, scratch.ctypes.data + scratch.nbytes)
    return huge_pages._libc().madvise(block, huge_pages.HUGE_PAGE, huge_pages.MADV_COLLAPSE) == 0


def _thp_setting() -> str:
    found = re.search(r"\[(\w+)\]", open("/sys/kernel/mm/transparent_hugepage/enabled").read())
    return found[1] if found else ""


needs_collapse = pytest.mark.skipif(
    not _collapse_works(), reason="this kernel does not collapse memory into huge pages (MADV_COLLAPSE, Linux 6.1+)"
)
needs_madvise_mode = pytest.mark.skipif(
    not _collapse_works() or _thp_setting() != "madvise",
    reason="telling collapsed memory from memory the kernel gave huge pages at once needs THP set to madvise",
)


@needs_collapse
def test_memory_touched_inside_the_block_is_collapsed_into_huge_pages():
    with huge_pages.collapse_new_memory() as collapsed:
        array = _touched(16 << 20)
    assert collapsed.bytes >= 8 << 20
    assert _huge_bytes_under(array) >= 8 << 20
    assert int(array.sum()) == array.size  # contents kept


@needs_madvise_mode
def test_memory_from_before_the_block_or_when_disabled_is_left_alone():
    earlier = _touched(16 << 20)
    with huge_pages.collapse_new_memory():
        pass  # nothing mapped inside the block: the earlier memory must stay as it is
    assert _huge_bytes_under(earlier) == 0
    with huge_pages.collapse_new_memory(enabled=False) as collapsed:
        later = _touched(16 << 20)
    assert collapsed.bytes == 0
    assert _huge_bytes_under(later) == 0


@needs_madvise_mode
def test_blocks_not_wholly_in_memory_are_left_alone_so_collapsing_adds_no_memory():
    with huge_pages.collapse_new_memory() as collapsed:
        memory = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        array = np.frombuffer(memory, dtype=np.uint8)
        array[:: 2 * mmap.PAGESIZE] = 1  # every other page touched: no 2 MiB block is wholly in memory
    assert collapsed.bytes == 0
    assert _huge_bytes_under(array) == 0


@pytest.mark.parametrize("asked", [True, False])
def test_engine_collapses_its_sessions_memory_only_when_asked(tiny_export, monkeypatch, asked):
    calls = []

    @contextlib.contextmanager
    def spy(enabled=True):
        calls.append(enabled)
        report = huge_pages.Collapsed()
        yield report
        report.bytes = 6 << 20 if enabled else 0

    monkeypatch.setattr(engine_module, "collapse_new_memory", spy)
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1, huge_pages=asked)
    assert calls == [asked]
    assert engine.settings.huge_pages is asked
    assert engine.huge_page_bytes == (6 << 20 if asked else 0)
