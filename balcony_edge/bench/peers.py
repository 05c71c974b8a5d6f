"""Other ways to run the same model on the same machine: torch `generate` and llama.cpp on the GGUF file (the base
model), and onnxruntime-genai on the export's own standard graph of each exit.

Each returns `{"decode_tok_s": ..., "ttft_ms": ...}` with the same prompt and token counts as the engine, or
`{"skipped": why}` when it cannot run here.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

from balcony_edge.bench.neighbour import quiet_and_beside


def torch_generate(
    base_spec: str, prompt: list[int], new_tokens: int, repeats: int, threads: int | None, gpu: bool = False
) -> dict:
    """transformers `generate` of the base model: greedy, batch 1, KV cache; decode speed excludes the first token.

    gpu: run on CUDA when torch has it (to compare with an engine on the CUDA or TensorRT provider).
    """
    try:
        import torch

        from balcony_edge.base_model import load_base_model
    except ImportError:
        return {"skipped": "torch is not installed (the train extra)"}
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    # typeshed's functools.wraps does not bind self, and transformers wraps PreTrainedModel.to with it
    model = load_base_model(base_spec).model.to(device)  # type: ignore[arg-type]
    ids = torch.tensor([prompt], dtype=torch.int64, device=device)

    def timed(count: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    return {
        **_decode_and_first_token(timed, new_tokens, repeats),
        "threads": torch.get_num_threads(),
        "device": device,
        "torch": torch.__version__,
    }


# The llama.cpp file type that matches an export's precision (like for like), by the export's precision name.
LLAMA_CPP_TYPES = {"fp32": "f32", "fp16": "f16", "int8": "q8_0", "int4": "q4_0", "fp16-int4": "q4_0"}
_LLAMA_FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}


def gguf_at_precision(source, file_type: str, folder) -> Path | None:
    """The GGUF file converted to `file_type` (f32, f16, q8_0, q4_0) by llama.cpp's own quantizer, once, under folder;
    None when llama_cpp is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    return _quantized_gguf(source, file_type, folder)


def _quantized_gguf(source, file_type: str, folder) -> Path:
    """gguf_at_precision where llama_cpp is installed."""
    import ctypes

    import llama_cpp

    target = Path(folder) / f"{Path(source).stem}-{file_type}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[file_type])
        params.allow_requantize = True  # the shipped file is already Q4_1
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not convert {source} to {file_type}")
        partial.replace(target)
    return target


def gguf_at_precision_json(source: str, file_type: str, folder: str) -> dict:
    """gguf_at_precision for a child process (bench/isolated.py): {"path": str or None}."""
    path = gguf_at_precision(source, file_type, folder)
    return {"path": str(path) if path else None}


# How each llama.cpp type is written for an exit: by the exit writer directly, or written in f32 and then
# converted by llama.cpp's quantizer (the writer has no Q4 of its own).
_EXIT_WRITER_TYPES = {"f32": "fp32", "f16": "f16", "q8_0": "q8_0"}


def exit_gguf_files(checkpoint, exits, file_type: str, folder) -> dict[int, Path] | None:
    """Each exit of `checkpoint` as a GGUF file of `file_type`, written once under folder; None without llama_cpp."""
    from balcony_edge.checkpoint import WEIGHTS_FILE
    from balcony_edge.common.checksums import file_sha256
    from balcony_edge.export.exit_checkpoints import ExitCheckpointConfig, export_exit_checkpoints
    from balcony_edge.export.gguf_exits import gguf_file_name

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    name = f"exits-{file_sha256(Path(checkpoint) / WEIGHTS_FILE)[:12]}"
    writer_type = _EXIT_WRITER_TYPES.get(file_type, "fp32")
    written = Path(folder) / f"{name}-{writer_type}"
    if not all((written / gguf_file_name(name, k)).is_file() for k in exits):
        config = ExitCheckpointConfig(
            format="gguf",
            checkpoint=checkpoint,
            out=written,
            exits=tuple(exits),
            dtype=writer_type,
            force=True,
            name=name,
        )
        export_exit_checkpoints(config)
    files = {k: written / gguf_file_name(name, k) for k in exits}
    if file_type not in _EXIT_WRITER_TYPES:
        files = {k: _quantized_gguf(path, file_type, folder) for k, path in files.items()}  # llama_cpp is here
    return files


def exit_gguf_files_json(checkpoint: str, exits: list[int], file_type: str, folder: str) -> dict:
    """exit_gguf_files for a child process (bench/isolated.py): {"files": {exit: path} or None}."""
    files = exit_gguf_files(checkpoint, exits, file_type, folder)
    return {"files": {str(k): str(path) for k, path in files.items()} if files is not None else None}


def llama_cpp_timer(gguf_path, prompt: list[int], threads: int | None):
    """llama-cpp-python loaded on a GGUF file (its own quantisation): (timed(count) -> seconds for `count` greedy
    tokens after the engine's own prompt tokens, the same tokenizer; a description), or None when llama_cpp is not
    installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    # use_extra_bufts=False: a source build with AMX crashed inside llama_decode on quantised files without it.
    llm = Llama(
        model_path=str(gguf_path), n_ctx=2048, n_threads=threads or os.cpu_count(), verbose=False, use_extra_bufts=False
    )
    tokens = list(prompt)

    def timed(count: int) -> float:
        llm.reset()
        started = time.perf_counter()
        for made, _ in enumerate(llm.generate(tokens, top_k=1, temp=0.0, reset=True), start=1):
            if made >= count:
                break
        return time.perf_counter() - started

    return timed, {"file": str(gguf_path), "prompt_tokens": len(tokens)}


LLAMA_CPP_MISSING = {
    "skipped": "llama-cpp-python is not installed (pip install llama-cpp-python, about 10 minutes to build)"
}


def llama_cpp(gguf_path, prompt: list[int], new_tokens: int, repeats: int, threads: int | None) -> dict:
    """llama.cpp's decode tok/s and time to first token on a GGUF file; skipped when llama_cpp is not installed."""
    timer = llama_cpp_timer(gguf_path, prompt, threads)
    if timer is None:
        return LLAMA_CPP_MISSING
    timed, info = timer
    return {**_decode_and_first_token(timed, new_tokens, repeats), **info}


def llama_cpp_neighbour(gguf_path, prompt: list[int], new_tokens: int, repeats: int, threads: int | None) -> dict:
    """llama.cpp's decode tok/s quiet and beside one busy core (neighbour.py), in turn for `repeats` rounds."""
    timer = llama_cpp_timer(gguf_path, prompt, threads)
    if timer is None:
        return LLAMA_CPP_MISSING
    timed, info = timer
    timed(8)
    return {**quiet_and_beside(lambda: one_run(timed, new_tokens)[1], repeats), **info}


GENAI_MISSING = {
    "skipped": "onnxruntime-genai is not importable (pip install --no-deps --target ~/genai onnxruntime-genai; "
    "PYTHONPATH=~/genai)"
}


def genai_timer(folder, prompt: list[int], threads: int | None):
    """onnxruntime-genai loaded on one exit's genai folder of the export (its standard graph, greedy, on the CPU):
    (timed(count) -> seconds for the prompt's forward pass and `count` tokens, a description), or None when
    onnxruntime_genai is not importable (it lives beside onnxruntime-gpu, installed without its dependencies:
    docs/export.md)."""
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None
    import onnxruntime_genai as og

    model, threads = genai_model(folder, threads)

    def timed(count: int) -> float:
        generator = genai_generator(model, prompt, count)
        started = time.perf_counter()
        generator.append_tokens(prompt)  # the prompt's forward pass; each later call makes one token
        for _ in range(count):
            generator.generate_next_token()
        return time.perf_counter() - started

    return timed, {"folder": str(folder), "threads": threads, "genai": og.__version__}


def onnxruntime_genai(folder, prompt: list[int], new_tokens: int, repeats: int, threads: int | None) -> dict:
    """onnxruntime-genai's decode tok/s and time to first token on one exit's genai folder."""
    timer = genai_timer(folder, prompt, threads)
    if timer is None:
        return GENAI_MISSING
    timed, info = timer
    return {**_decode_and_first_token(timed, new_tokens, repeats), **info}


def genai_model(folder: Path, threads: int | None):
    """onnxruntime-genai's model of a genai folder on the CPU, with `threads` intra-op threads (None: one per physical
    core; genai's own default ran at half speed here), and the thread count used."""
    import json

    import onnxruntime_genai as og
    import psutil

    config = og.Config(str(folder))
    threads = threads or psutil.cpu_count(logical=False) or os.cpu_count()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config), threads


def genai_generator(model, prompt: list[int], new_tokens: int):
    """A greedy generator with room for the prompt and `new_tokens` more."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    return og.Generator(model, params)


def one_run(timed, new_tokens: int) -> tuple[float, float]:
    """One timed run of a peer (timed(count) -> seconds for the prompt and `count` tokens): seconds to its first token,
    and its decode tok/s over `new_tokens` more (a run of new_tokens + 1 with the first token's time taken off)."""
    first = timed(1)
    return first, new_tokens / (timed(new_tokens + 1) - first)


def _decode_and_first_token(timed, new_tokens: int, repeats: int) -> dict:
    """Decode tok/s and time to first token (ms) from timed(count) -> seconds to make count tokens, after a warm-up."""
    timed(8)
    firsts, fulls = [], []
    for _ in range(repeats):
        firsts.append(timed(1))
        fulls.append(timed(new_tokens + 1))
    first = statistics.median(firsts)
    return {
        "decode_tok_s": round(new_tokens / (statistics.median(fulls) - first), 2),
        "ttft_ms": round(first * 1000, 2),
    }
