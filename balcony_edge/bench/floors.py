"""The speed floor of an exit: the base model cut to the same depth (k + 1 plain layers, its own final norm and
head, no balcony) as an ONNX graph made exactly like the export's, cached under <cache>/bench/floors."""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import cache_dir
from ..runtime.manifest import Manifest

FLOOR_DATA_SUFFIX = ".data"


def floor_dir(manifest: Manifest) -> Path:
    """<cache>/bench/floors/<base sha256 prefix>-<precision>: floor graphs of one base model and precision."""
    precision = manifest.dtype if manifest.quantization is None else f"{manifest.dtype}-{manifest.quantization['method']}"
    return cache_dir() / "bench" / "floors" / f"{manifest.base['sha256'][:16]}-{precision}"


def floor_graph_path(manifest: Manifest, layers: int) -> Path:
    return floor_dir(manifest) / f"layers_{layers}.onnx"


def torch_available() -> bool:
    """Whether the torch side (torch, transformers, onnx, onnxscript) can export floor graphs here."""
    try:
        import onnxscript  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def floor_graphs(manifest: Manifest, depths: list[int], base=None, say=print) -> dict[int, Path]:
    """A graph of the base model truncated to each depth (layers), exported once and reused; depth -> .onnx path."""
    missing = [d for d in depths if not floor_graph_path(manifest, d).is_file()]
    if missing:
        if base is None:
            from ..base_model import load_base_model

            base = load_base_model(manifest.base["source"])
        check_same_base(manifest, base)
        for layers in missing:
            say(f"exporting the floor graph: the base model cut to {layers} layers (once; cached in {floor_dir(manifest)})")
            export_floor(base.model, layers, manifest, floor_graph_path(manifest, layers))
    return {d: floor_graph_path(manifest, d) for d in depths}


def check_same_base(manifest: Manifest, base) -> None:
    from ..errors import BalconyError

    if base.identity.sha256 != manifest.base["sha256"]:
        raise BalconyError(
            f"the base model {manifest.base['source']!r} loaded here is not the one the export was made from "
            "(sha256 differs); bench with --no-floor or install that base model"
        )


def truncated_model(model, layers: int):
    """The base causal LM with only its first `layers` decoder layers, sharing modules with `model` (no copy)."""
    import copy

    import torch
    from torch import nn

    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:layers])
    with torch.device("meta"):
        cut = type(model)(config)
    cut.model.embed_tokens = model.model.embed_tokens
    cut.model.layers = nn.ModuleList(list(model.model.layers[:layers]))
    cut.model.norm = model.model.norm
    cut.model.rotary_emb = model.model.rotary_emb
    cut.lm_head = model.lm_head
    return cut.eval()


def export_floor(model, layers: int, manifest: Manifest, path: Path) -> None:
    """Export a truncated base model with the export's own passes, dtype and quantisation; weights beside it."""
    import onnx
    import onnx_ir as ir
    import onnxscript.optimizer
    import torch

    from ..export.exporter import DTYPES
    from ..export.onnx_graph import (
        _WRAPPED,
        export_decoder,
        fold_weight_transposes,
        strip_debug_metadata,
        tied_head_as_gemm,
    )
    from ..export.quantize import quantize_graph

    dtype = DTYPES[manifest.dtype]
    decoder = truncated_model(model, layers)
    if dtype != torch.float32:
        import copy

        decoder = copy.deepcopy(decoder)
        for parameter in decoder.parameters():
            parameter.data = parameter.data.to(dtype)
    quantized = manifest.quantization is not None
    graph = export_decoder(decoder, dtype)
    names = {f"{_WRAPPED}.{name}" for name, _ in decoder.named_parameters(remove_duplicate=False)}
    if not quantized:
        tied_head_as_gemm(graph)
    fold_weight_transposes(graph, names)
    onnxscript.optimizer.optimize(graph)
    strip_debug_metadata(graph)
    proto = ir.serde.serialize_model(graph)
    if quantized:
        proto = quantize_graph(proto, manifest.quantization["method"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    data = path.name + FLOOR_DATA_SUFFIX
    onnx.save(proto, partial, save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    (path.parent / f"{path.stem}.json").write_text(json.dumps({"layers": layers, "base": manifest.base}) + "\n")
    partial.replace(path)
