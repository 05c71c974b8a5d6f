"""The Engine: an export folder loaded into one onnxruntime session per exit, and token-by-token generation
whose exit a controller picks before every token from a budget and device signals."""

from __future__ import annotations

import contextlib
import io
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path
from typing import cast

import onnxruntime as ort

from balcony_edge.common.atomic import readable_folder, write_text_atomically
from balcony_edge.common.console import log_warning
from balcony_edge.common.errors import BalconyError, first_line
from balcony_edge.common.paths import cache_dir, default_export_dir
from balcony_edge.common.validation import is_whole_number
from balcony_edge.runtime.core.batch import BatchDecoder
from balcony_edge.runtime.core.constraints import JsonConstraint, JsonGrammar
from balcony_edge.runtime.core.contention import CpuContention
from balcony_edge.runtime.core.generation import MAX_TOP_LOGPROBS, GeneratedToken, Generation
from balcony_edge.runtime.core.huge_pages import collapse_new_memory
from balcony_edge.runtime.core.integrity import check_export_files
from balcony_edge.runtime.core.manifest import ExitGraph, Manifest
from balcony_edge.runtime.core.packed_weights import PackedGraphs, discard, packed_graphs
from balcony_edge.runtime.core.piece_runner import PieceRunner, steps_on_plans
from balcony_edge.runtime.core.sampling import Sampler, SamplingConfig
from balcony_edge.runtime.core.sequence import ContextFullError, Sequence
from balcony_edge.runtime.core.sessions import (
    ProcessPool,
    SessionSettings,
    SharedWeights,
    device_of,
    open_packed_session,
    open_session,
    resolve_providers,
    session_options,
)
from balcony_edge.runtime.core.text import PromptError, TextCodec, TextStream, check_prompt_text
from balcony_edge.runtime.device.controller import Budget, Chooser, Controller, ControllerConfig, ExitProfile
from balcony_edge.runtime.device.hub import SignalHub

CALIBRATION_PROMPT_TOKENS = 32
PACKED_FALLBACK = "running the pieces as they are (slower steps)"  # what the engine does without packed weights
CALIBRATION_STEPS = 8


class Engine:
    """An exported Balcony model ready to generate: sessions per exit sharing one copy of the weights."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        settings: SessionSettings,
        trust_modified: bool = False,
        warn: Callable[[str], None] | None = None,
        verify: bool = True,
    ):
        """verify=False skips `check_export_files`: only for a folder this process tree has just verified (the bench's
        children)."""
        self.folder, self.manifest = Path(folder), manifest
        if verify:
            check_export_files(folder, manifest, trust_modified=trust_modified, warn=warn)
        self.codec = TextCodec(folder, manifest)
        self.settings = settings
        self.prepack = settings.prepack
        self.huge_page_bytes = 0  # onnxruntime's memory collapsed into huge pages (set as the sessions open)
        self.warn = warn or log_warning
        self.packed: PackedGraphs | None = None  # the packed graphs the CPU sessions were opened from
        self.step_graphs: dict[int, ort.InferenceSession] = {}  # exit -> its step graph's session (packed weights)
        self.contention = CpuContention()  # other processes' CPU load: steps on the chain while they are busy
        self.provider, self.fallbacks, self.weights, self.runners = self._open_sessions(settings)
        self.device = device_of(self.provider)
        self._profiles: list[ExitProfile] | None = None
        self._profiles_lock = threading.Lock()  # threads generating at once calibrate once
        self._json_grammar: JsonGrammar | None = None

    @classmethod
    def load(
        cls,
        folder: str | Path | None = None,
        providers: list[str] | None = None,
        threads: int | None = None,
        prepack: bool = True,
        trust_modified: bool = False,
        warn: Callable[[str], None] | None = None,
        thread_pool: str = "session",
        huge_pages: bool = True,
        packed_weights: bool = True,
    ) -> Engine:
        """Load an export folder (default: the default export); providers tried in order: TensorRT, CUDA, CPU.

        The folder is checked first (`integrity.check_export_files`): names leading out of it, external data outside its
        weights file and missing files are refused; files whose sha256 differs from the manifest too, unless
        trust_modified (then `warn` is told which, in one line).

        prepack: CPU MatMul weight prepacking (on: each weight is in one piece's session, so packing copies nothing
        twice; off only to measure what it brings).

        thread_pool: "session" (default) gives each piece's session a pool of its own whose workers spin briefly
        (sessions.SPIN_US): as fast as one spinning pool on a quiet CPU and far faster beside other busy processes;
        "process" runs every piece on onnxruntime's one process-wide pool, which spins without end, and once it exists
        onnxruntime refuses every later session in the process that asks for a pool of its own (docs/benchmarks.md,
        "Thread pools").

        huge_pages: collapse onnxruntime's prepacked CPU weights into transparent huge pages where Linux allows it
        (`huge_pages.py`; off only to measure what it brings).

        packed_weights: on the CPU, open every graph from a copy that onnxruntime saved with its weights packed for
        this CPU, all in one shared file (`packed_weights.py`; made on first load, in the cache folder), and run each
        one-token step through its exit's whole chain as one session. Off, or where they cannot be made or opened
        (the cache cannot be written, onnxruntime saves no packed forms, a folder is damaged; `warn` says why), the
        pieces pack their weights on the heap and steps run the chain piece by piece; with prepack=False too.
        """
        folder = export_folder(folder)
        settings = session_settings(providers, threads, prepack, thread_pool, huge_pages, packed_weights)
        return cls(folder, Manifest.load(folder), settings, trust_modified=trust_modified, warn=warn)

    def _open_sessions(
        self, settings: SessionSettings
    ) -> tuple[str, dict[str, str], SharedWeights, dict[str, PieceRunner]]:
        """Sessions on the first provider that opens them all; what failed before is kept in `fallbacks`."""
        ProcessPool.admit(settings.thread_pool, settings.threads)  # its errors concern every provider alike
        fallbacks: dict[str, str] = {}
        for provider in settings.providers:
            try:
                weights = SharedWeights(self.folder, self.manifest)
                on_cpu = provider == "CPUExecutionProvider"  # where the kernels stream the weights from host memory
                quiet = _as_is if on_cpu else _quietly
                # Packed weights are made (on first use) before the memory the sessions take is watched: the heap a
                # build leaves behind is not theirs.
                packed = self._packed_graphs(settings) if on_cpu else None
                with collapse_new_memory(enabled=settings.huge_pages and on_cpu) as collapsed:
                    runners = self._open_packed(packed, settings) if packed is not None else None
                    if runners is None:
                        runners = {}
                        for piece in self.manifest.pieces:
                            session, printed = quiet(open_session, self.folder, piece, weights, provider, settings)
                            if session.get_providers()[0] != provider:  # onnxruntime fell back to the CPU
                                raise RuntimeError(_fallback_reason(printed) or "no usable GPU")
                            runners[piece.name] = PieceRunner(session, piece, weights)
                self.huge_page_bytes = collapsed.bytes
                return provider, fallbacks, weights, runners
            except Exception as err:  # a provider that cannot start is skipped, with the reason reported
                fallbacks[provider] = first_line(err)
        tried = "; ".join(f"{p}: {why}" for p, why in fallbacks.items())
        if "CPUExecutionProvider" in fallbacks:  # the CPU provider always starts: the graphs themselves are at fault
            raise BalconyError(
                f"onnxruntime cannot open the graphs of {self.folder} "
                f"({tried}); export again (`balcony-edge export --force`)"
            )
        raise BalconyError(
            f"no onnxruntime provider could open {self.folder} ({tried}); "
            "use --provider cpu, or check the GPU driver and onnxruntime-gpu"
        )

    def _packed_graphs(self, settings: SessionSettings) -> PackedGraphs | None:
        """The export's packed graphs (made on first use); None where they are off or cannot be made (said once, in a
        line)."""
        if not (settings.packed_weights and settings.prepack):
            return None
        try:
            return packed_graphs(self.folder, lambda: session_options(settings.threads, True, settings.thread_pool))
        except OSError as err:
            self.warn(
                f"packed weights unavailable ({first_line(err)}); {PACKED_FALLBACK}; set BALCONY_EDGE_CACHE to a "
                "writable folder with room for about four times the export's weights file"
            )
        except Exception as err:  # onnxruntime could not save packed weights, or saved what this version cannot read
            self.warn(
                f"packed weights unavailable: onnxruntime did not save them ({first_line(err)}); {PACKED_FALLBACK}; "
                "load with packed_weights=False to skip trying"
            )
        return None

    def _open_packed(self, packed: PackedGraphs, settings: SessionSettings) -> dict[str, PieceRunner] | None:
        """Every piece, and every exit's step graph where steps run on plans, opened from the packed graphs; None
        where they cannot be opened (the folder is removed, to be made again on the next load; said in a line)."""
        try:
            pieces = self.manifest.pieces
            runners = {p.name: PieceRunner(open_packed_session(packed.piece(p.graph), settings), p) for p in pieces}
            exits = self.manifest.exits if steps_on_plans(runners.values(), "cpu") else []
            steps = {e.exit: open_packed_session(packed.step(e.exit), settings) for e in exits}
        except Exception as err:  # a folder damaged on disk, or taken away meanwhile
            discard(packed)
            self.warn(
                f"the packed weights in {packed.folder} could not be opened ({first_line(err)}); {PACKED_FALLBACK}; "
                "they are made again on the next load"
            )
            return None
        self.packed, self.step_graphs = packed, steps
        return runners

    @property
    def exits(self) -> list[int]:
        """Every exit depth of this export, ascending; the last is the full model."""
        return [entry.exit for entry in self.manifest.exits]

    def sequence(self, token_ids: Iterable[int] = (), sliding_window: bool = False) -> Sequence:
        """A new conversation state (its own KV cache) over these sessions."""
        return Sequence(
            self.manifest, self.runners, self.device, token_ids, sliding_window, self.step_graphs, self.contention
        )

    def batch_decoder(self, rows: int) -> BatchDecoder:
        """Rows for `rows` sequences decoded as one batch, each at its own exit (CPU provider)."""
        if self.device != "cpu":
            raise BalconyError(f"batched decoding runs on the CPU provider, not {self.provider}; serve --parallel 1")
        return BatchDecoder(self.manifest, self.runners, rows)

    def describe(self, verbose: bool = False) -> str:
        """One short line: the provider in use and, briefly, why the preferred ones are not (verbose: their full
        errors)."""
        text = (
            f"{self.provider} ({len(self.exits)} exits: {', '.join(map(str, self.exits))}; {len(self.runners)} pieces)"
        )
        if self.fallbacks:
            reasons = {p: why if verbose else short_reason(why) for p, why in self.fallbacks.items()}
            if not verbose and len(set(reasons.values())) == 1:
                text += (
                    f"; {' and '.join(p.removesuffix('ExecutionProvider') for p in reasons)}: "
                    f"{next(iter(reasons.values()))}"
                )
            else:
                text += "; unavailable: " + "; ".join(
                    f"{p if verbose else p.removesuffix('ExecutionProvider')}: {why}" for p, why in reasons.items()
                )
        return text

    def profiles(self) -> list[ExitProfile]:
        """Each exit's decode cost on this device (ms/token), measured on first use and cached per export and
        provider."""
        with self._profiles_lock:
            if self._profiles is None:
                self._profiles = self._measured_profiles()
            return self._profiles

    def _measured_profiles(self) -> list[ExitProfile]:
        """Profiles from the calibration cache, or from a fresh calibration (saved for next time when the cache is
        writable)."""
        path = self._calibration_path()
        measured = _read_calibration(path, self.exits)
        if measured is None:
            measured = self.calibrate()
            with contextlib.suppress(OSError):  # a read-only cache only costs a calibration next time
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomically(path, json.dumps(measured))
        return [self._profile(entry, measured[str(entry.exit)]) for entry in self.manifest.exits]

    @staticmethod
    def _profile(entry: ExitGraph, ms_per_token: float) -> ExitProfile:
        loop_share = entry.answers.loop_share if entry.answers is not None else None
        return ExitProfile(entry.exit, ms_per_token, entry.weight_bytes_per_token, entry.quality, loop_share)

    @property
    def default_sampling(self) -> SamplingConfig:
        """The model's recommended sampling settings, as the export records them (greedy when it records none)."""
        return SamplingConfig.of(self.manifest.generation.sampling)

    def json_constraint(self, schema: dict | None = None) -> JsonConstraint:
        """A constraint that keeps one answer valid JSON (matching `schema` when given); pass it to `generate`."""
        with self._profiles_lock:
            if self._json_grammar is None:
                eos = self.manifest.generation.eos_token_ids
                self._json_grammar = JsonGrammar(self.codec.tokenizer.to_str(), self.manifest.vocab_size, eos)
        return self._json_grammar.constraint(schema)

    def controller(self, budget: str | Budget = "auto", config: ControllerConfig | None = None) -> Controller:
        """A controller for this export's exits, measured costs and recorded answers (the quality floor)."""
        budget = budget if isinstance(budget, Budget) else Budget.parse(str(budget))
        return Controller(self.controller_profiles(budget), budget, config)

    def _calibration_path(self) -> Path:
        graphs = "-".join(self.manifest.files[e.graph][:8] for e in self.manifest.exits)
        threads = self.settings.threads or 0  # 0: onnxruntime's default
        packed = ("-steps" if self.step_graphs else "") if self.prepack else "-unpacked"
        return (
            cache_dir() / "calibration" / f"{graphs}-{self.provider}-{threads}{packed}-{self.settings.thread_pool}.json"
        )

    def calibrate(self) -> dict[str, float]:
        """Median decode step per exit after a short prompt (ms), exit -> ms."""
        prompt = list(range(10, 10 + CALIBRATION_PROMPT_TOKENS))
        measured = {}
        for exit in self.exits:
            sequence = self.sequence(prompt)
            sequence.logits(exit)
            times = []
            for step in range(CALIBRATION_STEPS):
                sequence.append(11 + step)
                start = time.perf_counter()
                sequence.logits(exit)
                times.append((time.perf_counter() - start) * 1000)
            measured[str(exit)] = statistics.median(times)
        return measured

    def prompt_ids(self, prompt: str | list[dict] | list[int], chat: bool = True) -> list[int]:
        """Token ids of a prompt: ids as given, a message list or a string through the chat template, or raw text."""
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in prompt)
        ):
            if not all(is_whole_number(t) for t in prompt):
                bad = next(t for t in prompt if not is_whole_number(t))
                raise PromptError(f"token id {bad!r} is not a whole number; give token ids as integers")
            return [int(t) for t in cast(list[int], prompt)]  # the sequence refuses ids outside the vocabulary
        if isinstance(prompt, list):
            return self.codec.chat_prompt(cast(list[dict], prompt))
        check_prompt_text(prompt)
        return self.codec.chat_prompt([{"role": "user", "content": prompt}]) if chat else self.codec.encode(prompt)

    def generate(
        self,
        prompt: str | list[dict] | list[int],
        max_new_tokens: int = 128,
        budget: str | Budget = "auto",
        sampling: SamplingConfig | None = None,
        signals: SignalHub | None = None,
        controller_config: ControllerConfig | None = None,
        stop: tuple[str, ...] = (),
        sequence: Sequence | None = None,
        chat: bool = True,
        controller: Chooser | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        constraint: JsonConstraint | None = None,
    ) -> Generator[GeneratedToken, None, None]:
        """Stream new tokens for a prompt; the exit of each is chosen just before it is computed (by `controller` when
        given, e.g. one shared by every request of a server, else by a Controller of its own for `budget`).

        sampling None: the model's recommended settings (`default_sampling`). The answer ends at an end token (unless
        ignore_eos), a stop string, max_new_tokens or the context length (finish "length"). logprobs k: each token
        carries its log-probability and the k most likely tokens' (the exit's own distribution, before sampling).
        constraint (`json_constraint`): only tokens that keep the answer valid JSON are chosen.

        Model work only: a TelemetryWriter records the tokens as they pass (`writer.follow(engine.generate(...))`).
        The arguments are checked by `start`."""
        generation = self.start(
            prompt,
            max_new_tokens,
            budget,
            sampling,
            signals,
            controller_config,
            stop,
            sequence,
            chat,
            controller,
            logprobs,
            ignore_eos,
            constraint,
        )
        while not generation.done:
            exit = generation.plan()
            yield generation.emit(generation.sequence.logits(exit))

    def start(
        self,
        prompt: str | list[dict] | list[int],
        max_new_tokens: int = 128,
        budget: str | Budget = "auto",
        sampling: SamplingConfig | None = None,
        signals: SignalHub | None = None,
        controller_config: ControllerConfig | None = None,
        stop: tuple[str, ...] = (),
        sequence: Sequence | None = None,
        chat: bool = True,
        controller: Chooser | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
        constraint: JsonConstraint | None = None,
    ) -> Generation:
        """`generate` as an object that makes a token per plan/emit pair (what a batching server drives); the prompt
        is fed at once, and every argument checked (for `generate` too)."""
        if not (is_whole_number(max_new_tokens) and max_new_tokens >= 1):
            raise BalconyError(f"max_new_tokens {max_new_tokens!r} must be a whole number of tokens, at least 1")
        if any(not isinstance(s, str) or not s for s in stop):
            raise BalconyError(f"stop strings must be non-empty text, not {stop!r}")
        if logprobs is not None and not (is_whole_number(logprobs) and 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise BalconyError(f"logprobs {logprobs!r} must be a whole number from 0 to {MAX_TOP_LOGPROBS}")
        sampling = self.default_sampling if sampling is None else sampling
        if not isinstance(sampling, SamplingConfig):
            raise BalconyError(
                "sampling must be a SamplingConfig, such as "
                f"SamplingConfig(temperature=0.7), not {type(sampling).__name__}"
            )
        if controller is None:
            controller = self.controller(budget, controller_config)
        sequence = sequence if sequence is not None else self.sequence()
        sequence.extend(self.prompt_ids(prompt, chat))
        if not sequence.sliding_window:  # past the context the answer ends ("length"), however many were asked for
            max_new_tokens = min(max_new_tokens, sequence.context_length - len(sequence.tokens))
            if max_new_tokens < 1:
                raise ContextFullError(
                    f"the prompt fills the context of {sequence.context_length} tokens; "
                    "shorten it or start a new conversation (/reset)"
                )
        sequence.make_room(max_new_tokens)
        eos = set() if ignore_eos else set(self.manifest.generation.eos_token_ids)
        return Generation(
            sequence,
            max_new_tokens,
            controller,
            signals or SignalHub([]),
            Sampler(sampling),
            TextStream(self.codec, stop),
            eos,
            logprobs,
            constraint,
        )

    def controller_profiles(self, budget: Budget) -> list[ExitProfile]:
        """Fixed budgets need no calibration; the others use measured costs."""
        if budget.is_fixed:
            return [self._profile(entry, 1.0) for entry in self.manifest.exits]
        return self.profiles()


def export_folder(folder: str | Path | None) -> Path:
    """The export folder asked for (None: the default export), or a one-line error when it is not one."""
    if folder is not None and not isinstance(folder, (str, os.PathLike)):
        raise BalconyError(f"the export folder must be a path (str or pathlib.Path), not {type(folder).__name__}")
    folder = readable_folder(Path(folder) if folder is not None else default_export_dir())
    if folder.is_file():
        raise BalconyError(f"{folder} is a file, not an export folder; pass the folder that holds it ({folder.parent})")
    if not folder.is_dir():
        raise BalconyError(f"export folder {folder} does not exist; create it with `balcony-edge export`")
    return folder


def session_settings(
    providers: list[str] | None,
    threads: int | None,
    prepack: bool = True,
    thread_pool: str = "session",
    huge_pages: bool = True,
    packed_weights: bool = True,
) -> SessionSettings:
    """How an engine's sessions are made: the providers this onnxruntime has, in order, and the TensorRT cache in
    ours."""
    return SessionSettings(
        providers=resolve_providers(providers),
        threads=threads,
        trt_cache=str(cache_dir() / "tensorrt"),
        prepack=prepack,
        thread_pool=thread_pool,
        huge_pages=huge_pages,
        packed_weights=packed_weights,
    )


# onnxruntime-gpu's messages when the machine has no TensorRT libraries, or no usable CUDA (driver, device or
# libraries), said in a few words.
NO_TENSORRT_SIGNS = ("install TensorRT libraries", "libnvinfer")
NO_CUDA_SIGNS = (
    "CUDA Provider not available",
    "libcuda",
    "libcudart",
    "libcublas",
    "no CUDA-capable device",
    "cudaErrorNoDevice",
)


def short_reason(error: str) -> str:
    """Why a provider did not start, in a few words for a status line."""
    if any(sign in error for sign in NO_TENSORRT_SIGNS):
        return "no TensorRT libraries"
    if any(sign in error for sign in NO_CUDA_SIGNS):
        return "no CUDA device"
    return error if len(error) <= 80 else error[:77] + "..."


def _read_calibration(path: Path, exits: list[int]) -> dict[str, float] | None:
    """A cached calibration (exit -> ms), or None when there is none or it is unreadable (then it is measured again)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        measured = json.loads(path.read_text())
        if all(float(measured[str(exit)]) > 0 for exit in exits):
            return {str(exit): float(measured[str(exit)]) for exit in exits}
    return None


def _as_is(make: Callable[..., ort.InferenceSession], *args: object) -> tuple[ort.InferenceSession, str]:
    return make(*args), ""


def _quietly(make: Callable[..., ort.InferenceSession], *args: object) -> tuple[ort.InferenceSession, str]:
    """Run make(*args) with onnxruntime's logging limited to fatal errors and what it prints caught and returned: a
    GPU provider that cannot load logs its library errors on the default logger and prints "EP Error ... Falling
    back" on stdout; the error we keep says it in a line (_fallback_reason). onnxruntime has no getter for that
    logger's level, so it is set back to onnxruntime's own default (warning); CPU sessions never touch it."""
    ort.set_default_logger_severity(4)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            session = make(*args)
        return session, printed.getvalue()
    finally:
        ort.set_default_logger_severity(2)


def _fallback_reason(printed: str) -> str | None:
    """onnxruntime's reason for falling back from a provider, from its "EP Error <where> <why> when using ..." line."""
    for line in printed.splitlines():
        if line.startswith("EP Error "):
            why = line.removeprefix("EP Error ").split(" when using ")[0]
            return why.split("] : ")[-1] if "] : " in why else why.split("&) ")[-1]
    return None
