"""Huge pages under onnxruntime's prepacked weights: which memory is collapsed, and that an engine asks for it only
when told to."""

from __future__ import annotations

import mmap
import platform
import re

import numpy as np
import pytest

from balcony_edge.runtime import Engine
from balcony_edge.runtime.core import engine as engine_module
from balcony_edge.runtime.core import huge_pages


def _kernel_at_least(major: int, minor: int) -> bool:
    found = re.match(r"(\d+)\.(\d+)", platform.release())
    return bool(found) and (int(found[1]), int(found[2])) >= (major, minor)


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


needs_collapse = pytest.mark.skipif(
    not (huge_pages.available() and _kernel_at_least(6, 1)),
    reason="transparent huge pages with MADV_COLLAPSE need Linux 6.1 or later with THP not switched off",
)


@needs_collapse
def test_memory_touched_inside_the_block_is_collapsed_into_huge_pages():
    with huge_pages.collapse_new_memory() as collapsed:
        array = _touched(16 << 20)
    assert collapsed.bytes >= 8 << 20
    assert _huge_bytes_under(array) >= 8 << 20
    assert int(array.sum()) == array.size  # contents kept


@needs_collapse
def test_memory_from_before_the_block_or_when_disabled_is_left_alone():
    earlier = _touched(16 << 20)
    with huge_pages.collapse_new_memory():
        pass
    assert _huge_bytes_under(earlier) == 0
    with huge_pages.collapse_new_memory(enabled=False) as collapsed:
        later = _touched(16 << 20)
    assert collapsed.bytes == 0
    assert _huge_bytes_under(later) == 0


@pytest.mark.parametrize("asked", [True, False])
def test_engine_collapses_its_sessions_memory_only_when_asked(tiny_export, monkeypatch, asked):
    calls = []
    real = huge_pages.collapse_new_memory

    def spy(enabled=True):
        calls.append(enabled)
        return real(enabled)

    monkeypatch.setattr(engine_module, "collapse_new_memory", spy)
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1, huge_pages=asked)
    assert calls == [asked]
    assert engine.settings.huge_pages is asked
    assert engine.huge_page_bytes >= 0 if asked else engine.huge_page_bytes == 0
