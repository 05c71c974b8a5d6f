"""Whether bf16 is fast here: on a GPU that supports it, or on a CPU with native bf16 arithmetic (AMX or AVX-512 BF16).

On a CPU without it (AVX2 only) bf16 autocast is slower than fp32: every matrix product converts its operands."""

from __future__ import annotations

from pathlib import Path

import torch

NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is absent, as on macOS)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def fast_bf16(device: torch.device) -> bool:
    """True where bf16 matrix products run faster than fp32 on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)
