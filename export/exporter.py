"""`balcony-edge export`: a checkpoint becomes a folder of ONNX graphs (each exit and the full model) sharing one
weights file, plus tokenizer files, report.json and manifest.json; written beside the target, then renamed."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

from balcony_edge import __version__
from balcony_edge.base_model import BaseModel, recommended_sampling
from balcony_edge.checkpoint import SHIPPED_CHECKPOINT, CheckpointInfo, load_checkpoint, read_info
from balcony_edge.common.atomic import exclusive_target, write_folder_atomically, write_text_atomically
from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.console import phase_progress
from balcony_edge.common.errors import ExportError
from balcony_edge.common.paths import SHIPPED_EXPORT_NAME, check_replace_target, default_export_dir
from balcony_edge.exits import parse_exits
from balcony_edge.export.compose import compose_exit
from balcony_edge.export.genai import write_genai_folders
from balcony_edge.export.graph_builder import Architecture
from balcony_edge.export.kv_calibration import kv_cache_scales
from balcony_edge.export.pieces import PieceGraphs, balcony_slot, exit_chain, layer_slot, piece_layout
from balcony_edge.export.provenance import checkpoint_identity
from balcony_edge.export.quality import against_full
from balcony_edge.export.quantize import DEFAULT_BLOCK_SIZE, check_quantization, quantization_info, quantize_graph
from balcony_edge.export.verify import verification_failures, verify_export
from balcony_edge.export.weights import WEIGHTS_FILE, WeightFile, weight_bytes_per_token
from balcony_edge.generate import eos_token_ids
from balcony_edge.model import BalconyModel
from balcony_edge.runtime.core.manifest import (
    KV_DTYPES,
    MANIFEST_FILE,
    QUANTIZED_KV_DTYPE,
    REPORT_FILE,
    AnswerFigures,
    ExitGraph,
    GenerationDefaults,
    KVShape,
    Manifest,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
KV_CACHES = ("float", "int8")  # the KV cache in the activations' float type, or int8 codes with calibrated scales


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how; None means: the shipped checkpoint, the default folder, every trained exit."""

    checkpoint: Path | None = None
    out: Path | None = None
    exits: str | tuple[int, ...] | None = None
    dtype: str = "fp32"
    quantize: str | None = None
    base: str | None = None  # base model spec; default: the checkpoint's
    force: bool = False
    verify: bool = True
    kv_cache: str = "float"
    block_size: int = DEFAULT_BLOCK_SIZE  # weights per quantisation block (with quantize)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        check_quantization(self.quantize, self.block_size)
        if self.kv_cache not in KV_CACHES:
            raise ExportError(f"--kv-cache {self.kv_cache!r} is unknown; choose one of {', '.join(KV_CACHES)}")
        if self.kv_cache == "int8" and self.dtype != "fp32":
            # In fp16 the chain and the standard graph round differently and flip int8 codes: they would not agree.
            raise ExportError(
                f"--kv-cache int8 needs fp32 activations, not --dtype {self.dtype}; leave out --dtype (or --kv-cache)"
            )

    @property
    def precision(self) -> str:
        """fp32, fp16, int8, int4, or fp16-int4 (fp16 activations, int4 weights)."""
        if self.quantize is None:
            return self.dtype
        return self.quantize if self.dtype == "fp32" else f"{self.dtype}-{self.quantize}"

    @property
    def folder_suffix(self) -> str:
        """What the default folder name ends with: the precision, `-b64` for a block size other than the default,
        and `-kv8` for an int8 KV cache."""
        block = f"-b{self.block_size}" if self.block_size != DEFAULT_BLOCK_SIZE else ""
        return self.precision + block + ("-kv8" if self.kv_cache == "int8" else "")

    @property
    def exact(self) -> bool:
        """Whether the export must match torch to fp32 tolerance (and greedy tokens exactly)."""
        return self.dtype == "fp32" and self.quantize is None and self.kv_cache == "float"


def export_name(checkpoint: Path) -> str:
    """The name an export folder takes by default: `smollm2-balcony` for the shipped checkpoint, else its folder
    name."""
    return SHIPPED_EXPORT_NAME if Path(checkpoint).resolve() == SHIPPED_CHECKPOINT.resolve() else Path(checkpoint).name


def export_checkpoint(config: ExportConfig) -> Path:
    """Export a checkpoint's exits and full model to an ONNX folder (verified unless config.verify is False)."""
    checkpoint = Path(config.checkpoint) if config.checkpoint is not None else SHIPPED_CHECKPOINT
    out = (
        Path(config.out)
        if config.out is not None
        else default_export_dir(export_name(checkpoint), config.folder_suffix)
    )
    info = read_info(checkpoint)
    exits = select_exits(config.exits, info, checkpoint)
    deeper = [k for k in exits if info.config.layers_at(k) > 1]
    if deeper:  # the pieces, the manifest and the runtime hold one balcony layer per exit
        raise ExportError(
            f"exit {deeper[0]}'s balcony has {info.config.layers_at(deeper[0])} layers and the ONNX export takes "
            f"one-layer balconies; export it with --format hf or gguf, or leave it out with --exits"
        )
    check_target(out, config.force)
    with exclusive_target(out, "the export"):
        return _export_locked(config, checkpoint, out, exits)


def _export_locked(config: ExportConfig, checkpoint: Path, out: Path, exits: tuple[int, ...]) -> Path:
    """The export proper, while this process holds the target's lock."""
    model, info, base = load_checkpoint(checkpoint, config.base)
    export_model = with_dtype(model, DTYPES[config.dtype])
    check_disk_space(out, parameter_bytes(export_model))

    def fill(staging: Path) -> None:
        write_export(staging, config, model, export_model, info, base, exits, checkpoint_identity(checkpoint))

    try:
        write_folder_atomically(out, fill)
    except OSError as err:
        raise ExportError(
            f"cannot write the export {out} ({err.strerror or err}); free disk space or choose another --out"
        ) from None
    return out


def check_target(out: Path, force: bool, ours=None, marker: str = MANIFEST_FILE) -> None:
    """Refuse an existing target without --force, a target this kind of export did not write (`ours(folder)`, default:
    an ONNX export folder; `marker`: the file that tells), a symbolic link, and an unwritable parent."""
    what = f"a balcony-edge export (with its {marker})"
    fix = "pass --force to replace it or choose another --out"
    check_replace_target(out, force, ours or is_export_folder, what, fix, error=ExportError)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        raise ExportError(f"cannot write to {out.parent} ({err.strerror or err}); choose a writable --out") from None


def is_export_folder(folder: Path) -> bool:
    """Whether folder's manifest.json is an export manifest of some schema version (--force replaces only those)."""
    try:
        raw = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(raw, dict)
        and type(raw.get("schema_version")) is int
        and isinstance(raw.get("exits"), list)
        and "weights_file" in raw
    )


def select_exits(requested: str | tuple[int, ...] | None, info: CheckpointInfo, checkpoint: Path) -> tuple[int, ...]:
    """The exits to export: all trained ones by default, else the requested ones, which must all be trained."""
    trained = info.config.exits
    if requested is None:
        return trained
    exits = parse_exits(requested, info.base["num_layers"])
    untrained = [k for k in exits if k not in trained]
    if untrained:
        raise ExportError(
            f"exit {untrained[0]} has no trained balcony in {checkpoint}; trained "
            f"exits: {', '.join(map(str, trained))}; pick --exits among them"
        )
    return exits


def with_dtype(model: BalconyModel, dtype: torch.dtype) -> BalconyModel:
    """The model itself in float32, else a copy whose parameters are in dtype (buffers such as RoPE stay float32)."""
    if dtype == torch.float32:
        return model
    converted = copy.deepcopy(model)
    for parameter in converted.parameters():
        parameter.data = parameter.data.to(dtype)
    return converted


def parameter_bytes(model: BalconyModel) -> int:
    """Bytes of every distinct parameter: the base model plus the balconies and exit norms."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_disk_space(out: Path, needed: int) -> None:
    """Refuse to start an export that cannot fit on the target's disk (bytes)."""
    free = shutil.disk_usage(out.parent).free
    if free < needed * 1.1:
        raise ExportError(
            f"not enough disk space for {out}: the export needs up to "
            f"{needed / 1e6:.0f} MB, {free / 1e6:.0f} MB are free; "
            "free some space or choose another --out"
        )


def write_export(
    staging: Path,
    config: ExportConfig,
    model: BalconyModel,
    export_model: BalconyModel,
    info: CheckpointInfo,
    base: BaseModel,
    exits: tuple[int, ...],
    source: dict,
) -> None:
    """Fill a staging folder: piece graphs, exit graphs and weights, tokenizer files, report.json (verified; `source`:
    which checkpoint), manifest.json last."""
    started = time.perf_counter()
    quality = against_full(model, base.tokenizer)
    kv_scales = kv_cache_scales(model, base.tokenizer) if config.kv_cache == "int8" else None
    builder = PieceGraphs(
        export_model, NUMPY_DTYPES[config.dtype], tie_head_as_gemm=config.quantize is None, kv_scales=kv_scales
    )
    layout = piece_layout(exits, model.num_layers)
    depths = (*exits, model.num_layers)
    with phase_progress() as progress, open(staging / WEIGHTS_FILE, "wb") as handle:
        task = progress.add_task(f"export ({config.precision})", total=len(layout) + len(depths))
        weights = WeightFile(handle)
        pieces, protos = [], {}
        for piece in layout:
            proto = builder.piece(piece)
            if config.quantize is not None:
                proto = quantize_graph(proto, config.quantize, config.block_size)
            protos[piece.name] = proto
            pieces.append(dataclasses.replace(piece, weights=save_graph(staging, piece.graph, proto, weights)))
            progress.advance(task)
        graphs = []
        for k in depths:
            chain = exit_chain(layout, k, model.num_layers)
            by_name = {p.name: p for p in layout}
            proto = compose_exit(f"exit_{k}", [(by_name[name], protos[name]) for name in chain])
            name = graph_file(k, model.num_layers)
            graphs.append(
                ExitGraph(
                    exit=k,
                    graph=name,
                    num_layers=model.exit_layers(k),
                    chain=chain,
                    weights=save_graph(staging, name, proto, weights),
                    weight_bytes_per_token=weight_bytes_per_token(proto, weights),
                    quality=round(quality.top1[k], 4),
                    answers=answer_figures(info.answers, k, "checkpoint (torch fp32)"),
                )
            )
            progress.advance(task)
    tokenizer_files = copy_tokenizer_files(base.folder, staging)
    manifest = Manifest(
        base=info.base,
        num_layers=model.num_layers,
        vocab_size=model.base.config.vocab_size,
        dtype=config.dtype,
        quantization=quantization_info(config.quantize, config.block_size),
        weights_file=weights.name,
        weights=weights.tensors,
        kv=kv_shape(model.base.config, config.dtype, config.kv_cache),
        cache_slots=[layer_slot(i) for i in range(model.num_layers)] + [balcony_slot(k) for k in exits],
        pieces=pieces,
        exits=graphs,
        generation=generation_defaults(model, base),
        tokenizer_files=tokenizer_files,
        chat_template=write_chat_template(base.tokenizer, staging),
    )
    genai_folders = write_genai_folders(staging, manifest)
    report: dict[str, Any] = {  # report.json
        "precision": config.precision,
        "kv_cache": config.kv_cache,
        "exported_with": tool_versions(),
        "checkpoint": source,
        "export_seconds": round(time.perf_counter() - started, 2),
        "weights_file_bytes": weights.size,
        "parameter_bytes": parameter_bytes(export_model),
        "graph_bytes": {
            name: (staging / name).stat().st_size for name in [p.graph for p in pieces] + [g.graph for g in graphs]
        },
        "quality_tokens": quality.tokens,
        "genai_folders": genai_folders,
        "verification": None,
    }
    if config.verify:
        started = time.perf_counter()
        manifest.files = export_checksums(staging)
        report["verification"] = verify_export(staging, manifest, model, base.tokenizer)
        report["verify_seconds"] = round(time.perf_counter() - started, 2)
        failures = verification_failures(report["verification"], config.exact)
        if failures:
            raise ExportError(f"verification failed, nothing written: {failures[0]}; report this with the checkpoint")
    (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    manifest.files = export_checksums(staging)
    (staging / MANIFEST_FILE).write_text(manifest.to_json())


def export_checksums(staging: Path) -> dict[str, str]:
    """sha256 of every file at the folder's top level (the genai folders hold only links to those and small configs)."""
    return {path.name: file_sha256(path) for path in sorted(staging.iterdir()) if path.is_file()}


def tool_versions() -> dict[str, str]:
    """Versions of the packages that made the graphs."""
    return {
        "balcony_edge": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


def graph_file(exit: int, num_layers: int) -> str:
    return "full.onnx" if exit == num_layers else f"exit_{exit}.onnx"


def save_graph(staging: Path, name: str, proto: onnx.ModelProto, weights: WeightFile) -> list[str]:
    """Move the graph's weights into the shared file (each stored once), save it; returns its weights' names."""
    weights.externalize(proto)
    onnx.save(proto, staging / name)
    return [tensor.name for tensor in proto.graph.initializer if tensor.name in weights.tensors]


def kv_shape(config, dtype: str, kv_cache: str = "float") -> KVShape:
    """Per-slot cache shape from a Hugging Face config (head sizes as the graph builder reads them); its dtype the
    activations' or int8."""
    arch = Architecture.of(config)
    return KVShape(
        num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        num_attention_heads=arch.num_heads,
        hidden_size=arch.hidden_size,
        dtype=QUANTIZED_KV_DTYPE if kv_cache == "int8" else KV_DTYPES[dtype],
    )


def generation_defaults(model: BalconyModel, base: BaseModel) -> GenerationDefaults:
    """EOS ids (generation config and tokenizer), bos, pad, the context length (tokens) and the model's recommended
    sampling settings."""
    tokenizer, generation = base.tokenizer, model.base.generation_config
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else generation.bos_token_id
    pad = generation.pad_token_id if generation.pad_token_id is not None else tokenizer.pad_token_id
    sampling, source = recommended_sampling(base)
    return GenerationDefaults(
        eos_token_ids=sorted(eos_token_ids(model, tokenizer)),
        bos_token_id=bos,
        pad_token_id=pad,
        context_length=model.base.config.max_position_embeddings,
        sampling=sampling,
        sampling_source=source,
    )


def answer_figures(answers: dict | None, depth: int, measured_on: str) -> AnswerFigures | None:
    """One depth's held-out answer figures from a record (`AnswerQuality.record()`), or None."""
    if answers is None or str(depth) not in answers["depths"]:
        return None
    figures = answers["depths"][str(depth)]
    return AnswerFigures(
        judge_nll=figures["judge_nll"],
        loop_share=figures["loop_share"],
        facts_right=figures["facts_right"],
        mean_length=figures["mean_length"],
        prompts=answers["prompts"],
        measured_on=measured_on,
    )


def record_export_answers(folder: Path, answers: dict) -> None:
    """Put answers measured on an export's own output (`eval --chat --export DIR --record`) into its manifest.json
    (written whole; the graphs and their checksums untouched)."""
    manifest = Manifest.load(folder)
    manifest.exits = [
        dataclasses.replace(entry, answers=answer_figures(answers, entry.exit, "this export"))
        for entry in manifest.exits
    ]
    try:
        write_text_atomically(Path(folder) / MANIFEST_FILE, manifest.to_json())
    except OSError as err:
        raise ExportError(
            f"cannot write {Path(folder) / MANIFEST_FILE} ({err.strerror or err}); check its permissions"
        ) from None


def write_chat_template(tokenizer, staging: Path) -> str | None:
    """Write the tokenizer's chat template (the one `generate` applies) as a Jinja file; its name, or None."""
    if not isinstance(tokenizer.chat_template, str):
        return None
    (staging / CHAT_TEMPLATE_FILE).write_text(tokenizer.chat_template)
    return CHAT_TEMPLATE_FILE


def copy_tokenizer_files(source: Path, staging: Path) -> list[str]:
    """Copy the tokenizer, its config and the generation config; tokenizer.json is required."""
    if not (Path(source) / "tokenizer.json").is_file():
        raise ExportError(f"{source} has no tokenizer.json; the runtime needs a fast tokenizer: save the base with one")
    copied = [name for name in TOKENIZER_FILES if (Path(source) / name).is_file()]
    for name in copied:
        shutil.copyfile(Path(source) / name, staging / name)
    return copied
