"""One onnxruntime session per piece of the exits' chains, on the first provider that works; each weight lives in
the one session of the one piece that uses it (the shared rotary tables excepted), so prepacking costs no copies."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from balcony_edge.common.errors import BalconyError, first_line
from balcony_edge.common.validation import is_whole_number
from balcony_edge.runtime.core.manifest import Manifest, Piece

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
THREAD_POOLS = ("session", "process")  # a pool per piece's session, or onnxruntime's one pool for the whole process


@dataclass(frozen=True)
class SessionSettings:
    """How sessions are made: providers to try in order, CPU threads, and the TensorRT cache folder."""

    providers: tuple[str, ...] = PROVIDER_ORDER
    threads: int | None = None  # intra-op threads; None: onnxruntime's default (all cores)
    trt_cache: str | None = None  # folder for TensorRT engine and timing caches
    prepack: bool = True  # CPU MatMul weight prepacking (off only to measure what it brings)
    thread_pool: str = "session"  # "process": every piece on onnxruntime's process-wide pool (see ProcessPool)
    huge_pages: bool = True  # prepacked CPU weights on huge pages (off only to measure what it brings)
    packed_weights: bool = True  # CPU: weights packed once on disk, and one-session steps (packed_weights.py)

    def __post_init__(self) -> None:
        if self.thread_pool not in THREAD_POOLS:
            raise BalconyError(f"thread pool {self.thread_pool!r} is unknown; choose session or process")
        if self.threads is not None and not (is_whole_number(self.threads) and self.threads >= 1):
            raise BalconyError(f"threads {self.threads!r} must be a whole number, at least 1 (or None for all cores)")
        cores = os.cpu_count() or 1
        if self.threads is not None and self.threads > cores:
            raise BalconyError(
                f"threads {self.threads} is more than this machine's "
                f"{cores} cores; give at most {cores} (or leave it out)"
            )


def resolve_providers(requested: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Provider names from short or full names, in order, keeping only those this onnxruntime build has."""
    available = set(ort.get_available_providers())
    names = [PROVIDER_ALIASES.get(p.lower(), p) for p in (requested or PROVIDER_ORDER)]
    unknown = [p for p in names if p not in PROVIDER_ORDER]
    if unknown:
        raise BalconyError(f"provider {unknown[0]!r} is unknown; choose from tensorrt, cuda, cpu")
    usable = tuple(p for p in names if p in available)
    if any(device_of(p) == "cuda" for p in usable):
        load_cuda_libraries()
    if not usable:
        raise BalconyError(
            f"none of the providers {', '.join(names)} is in this onnxruntime (it has {', '.join(sorted(available))}); "
            "ask for one of those (cpu always works) or install onnxruntime-gpu for cuda and tensorrt"
        )
    return usable


@functools.cache
def load_cuda_libraries() -> None:
    """Load CUDA and cuDNN for onnxruntime-gpu, from pip's nvidia packages where they are installed (PyTorch's wheels
    put them there, off the library path that onnxruntime's CUDA provider searches), else from the library path.
    Once per process; quiet, because a provider that still cannot start is reported when its session opens."""
    if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu only
        with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it could not find
            ort.preload_dlls(msvc=False)


def _provider_options(provider: str, settings: SessionSettings) -> tuple[str, dict]:
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
    """The export's weights as OrtValues, made once from a memory map of the weights file and lent to every session.
    They stay CPU buffers of ours on every provider: onnxruntime takes only user-owned CPU buffers as initializers and
    copies each to the device once, for the one session whose piece uses it."""

    def __init__(self, folder: Path, manifest: Manifest):
        self.manifest = manifest
        self._map = np.memmap(Path(folder) / manifest.weights_file, dtype=np.uint8, mode="r")
        self._values: dict[str, ort.OrtValue] = {}

    def value(self, name: str) -> ort.OrtValue:
        if name not in self._values:
            entry = self.manifest.weights[name]
            raw = self._map[entry.offset : entry.offset + entry.length]
            array = raw.view(np.dtype(entry.dtype)).reshape(entry.shape)
            self._values[name] = ort.OrtValue.ortvalue_from_numpy(array)
        return self._values[name]

    def nbytes(self) -> int:
        """Bytes of weights lent to sessions so far."""
        return sum(self.manifest.weights[name].length for name in self._values)


class ProcessPool:
    """onnxruntime's one thread pool for the whole process, made once (`--thread-pool process`). onnxruntime refuses,
    after it exists, every session of the process that asks for threads of its own, so only a process that holds
    nothing else opts in."""

    _lock = threading.Lock()
    threads: int | None = None
    made = False

    @classmethod
    def ensure(cls, threads: int | None) -> None:
        """Make the pool with `threads` intra-op threads (None: one per physical core), or check the one made before."""
        with cls._lock:
            if cls.made:
                if cls.threads != threads:
                    have = f"{cls.threads} threads" if cls.threads else "one thread per physical core (threads=None)"
                    raise BalconyError(
                        f"this process's onnxruntime thread pool has {have}; load "
                        f"with threads={cls.threads} (a pool cannot change once made)"
                    )
                return
            if not hasattr(ort, "set_global_thread_pool_sizes"):
                raise BalconyError(
                    f"onnxruntime {ort.__version__} has no process-wide thread pool (1.23 and later do); "
                    "upgrade it, or use thread_pool='session' (--thread-pool session)"
                )
            try:
                ort.set_global_thread_pool_sizes(threads or 0, 1)
            except Exception as err:  # onnxruntime's Fail: the host application made the process's pools already
                raise BalconyError(
                    f"onnxruntime's process-wide thread pool cannot be made here ({first_line(err)}); "
                    "if this application made it, load with thread_pool='process' "
                    "after it, or use thread_pool='session' in a process without one"
                ) from None
            cls.threads, cls.made = threads, True

    @classmethod
    def admit(cls, thread_pool: str, threads: int | None) -> None:
        """Make or check the pool for sessions on it; for sessions with pools of their own, a clear error instead of
        onnxruntime's when the process pool already exists."""
        if thread_pool == "process":
            cls.ensure(threads)
        elif cls.made:
            raise BalconyError(
                "this process already runs onnxruntime on one process-wide "
                "thread pool (an earlier thread_pool='process'), "
                "and onnxruntime allows no session a pool of its own after that; load with thread_pool='process'"
            )


# A session pool's workers spin this long after their work (us), backing off up to this factor, then sleep; and they
# stop spinning when their session's run returns. Measured on 2 cores, int4 full depth (docs/benchmarks.md, "Thread
# pools"): as fast as the process pool when quiet (which spins without end) and faster beside one busy core; pools
# that never spin ran at 0.8x the speed when quiet.
SPIN_US = 25
SPIN_BACKOFF_MAX = 32


def session_options(threads: int | None, prepack: bool, thread_pool: str = "session") -> ort.SessionOptions:
    """Options of every session: all graph optimisations, prepacking on or off, and threads: a pool of its own with
    `threads` intra-op threads (None: all cores) that spins briefly, or the process's one pool (which spins)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    ProcessPool.admit(thread_pool, threads)
    if thread_pool == "process":
        options.use_per_session_threads = False
    else:
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Every piece has its own session and pool: workers that spun without end would take the cores from the piece
        # that runs next (12.6 tok/s against 30.7 measured at full depth on 2 cores), workers that never spin wake too
        # late between nodes; a short spin is both quick and polite to the other pools and to other processes.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
        options.add_session_config_entry("session.intra_op.spin_backoff_max", str(SPIN_BACKOFF_MAX))
        # The spin is for the gaps between a run's nodes; when the run returns the next piece's pool takes over, so
        # these workers sleep at once instead of spinning beside it.
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def open_packed_session(graph: Path, settings: SessionSettings) -> ort.InferenceSession:
    """A CPU session for a packed graph (packed_weights.py), which maps its weights, packed, from the shared file."""
    options = session_options(settings.threads, settings.prepack, settings.thread_pool)
    return ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])


def open_session(
    folder: Path, piece: Piece, weights: SharedWeights, provider: str, settings: SessionSettings
) -> ort.InferenceSession:
    """A session for one piece's graph whose weights are lent from the memory-mapped weights file."""
    options = session_options(settings.threads, settings.prepack, settings.thread_pool)
    for name in piece.weights:
        options.add_initializer(name, weights.value(name))
    providers = [_provider_options(provider, settings)]
    if provider != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))  # for the nodes the accelerator does not take
    return ort.InferenceSession(str(Path(folder) / piece.graph), sess_options=options, providers=providers)
