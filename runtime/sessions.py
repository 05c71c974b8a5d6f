"""One onnxruntime session per piece of the exits' chains, on the first provider that works; each weight lives in
the one session of the one piece that uses it (the shared rotary tables excepted), so prepacking costs no copies."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from balcony_edge.common.errors import BalconyError
from balcony_edge.common.validation import is_whole_number
from balcony_edge.runtime.manifest import Manifest, Piece

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@dataclass(frozen=True)
class SessionSettings:
    """How sessions are made: providers to try in order, CPU threads, and the TensorRT cache folder."""

    providers: tuple[str, ...] = PROVIDER_ORDER
    threads: int | None = None  # intra-op threads; None: onnxruntime's default (all cores)
    trt_cache: str | None = None  # folder for TensorRT engine and timing caches
    prepack: bool = True  # CPU MatMul weight prepacking (off only to measure what it brings)

    def __post_init__(self) -> None:
        if self.threads is not None and not (is_whole_number(self.threads) and self.threads >= 1):
            raise BalconyError(f"threads {self.threads!r} must be a whole number, at least 1 (or None for all cores)")
        cores = os.cpu_count() or 1
        if self.threads is not None and self.threads > cores:
            raise BalconyError(f"threads {self.threads} is more than this machine's {cores} cores; give at most {cores} (or leave it out)")


def resolve_providers(requested: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Provider names from short or full names, in order, keeping only those this onnxruntime build has."""
    available = set(ort.get_available_providers())
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in (requested or PROVIDER_ORDER)]
    unknown = [p for p in names if p not in PROVIDER_ORDER]
    if unknown:
        raise BalconyError(f"provider {unknown[0]!r} is unknown; choose from tensorrt, cuda, cpu")
    usable = tuple(p for p in names if p in available)
    if not usable:
        raise BalconyError(
            f"none of the providers {', '.join(names)} is in this onnxruntime (it has {', '.join(sorted(available))}); "
            "ask for one of those (cpu always works) or install onnxruntime-gpu for cuda and tensorrt"
        )
    return usable


def _provider_options(provider: str, settings: SessionSettings, device: str) -> tuple[str, dict]:
    if provider == "TensorrtExecutionProvider":
        cache = settings.trt_cache or str(Path.home() / ".cache" / "balcony-edge" / "tensorrt")
        os.makedirs(cache, exist_ok=True)
        return provider, {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": cache,
        }
    return provider, {}


def device_of(provider: str) -> str:
    """Where a provider keeps tensors: `cuda` for TensorRT and CUDA, else `cpu`."""
    return "cuda" if provider in ("TensorrtExecutionProvider", "CUDAExecutionProvider") else "cpu"


class SharedWeights:
    """The export's weights as OrtValues, made once from a memory map of the weights file and lent to every session."""

    def __init__(self, folder: Path, manifest: Manifest, device: str):
        self.manifest, self.device = manifest, device
        self._map = np.memmap(Path(folder) / manifest.weights_file, dtype=np.uint8, mode="r")
        self._values: dict[str, ort.OrtValue] = {}

    def value(self, name: str) -> ort.OrtValue:
        if name not in self._values:
            entry = self.manifest.weights[name]
            raw = self._map[entry.offset : entry.offset + entry.length]
            array = raw.view(np.dtype(entry.dtype)).reshape(entry.shape)
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
        return self._values[name]

    def nbytes(self) -> int:
        """Bytes of weights lent to sessions so far."""
        return sum(self.manifest.weights[name].length for name in self._values)


def session_options(threads: int | None, prepack: bool) -> ort.SessionOptions:
    """Options of every session: all graph optimisations, intra-op threads (None: all cores), prepacking on or off."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Every piece has its own session and thread pool; spinning workers of idle pools would take the cores from the
    # piece that runs (measured: full depth 12.6 tok/s spinning, 30.7 not, on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def open_session(folder: Path, piece: Piece, weights: SharedWeights, provider: str, settings: SessionSettings) -> ort.InferenceSession:
    """A session for one piece's graph whose weights are lent from the memory-mapped weights file."""
    options = session_options(settings.threads, settings.prepack)
    for name in piece.weights:
        options.add_initializer(name, weights.value(name))
    providers = [_provider_options(provider, settings, weights.device)]
    if provider != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))  # for the nodes the accelerator does not take
    return ort.InferenceSession(str(Path(folder) / piece.graph), sess_options=options, providers=providers)
