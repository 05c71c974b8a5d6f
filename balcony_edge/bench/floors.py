"""The speed floor of an exit: the base model cut to the same depth (k + 1 plain layers, its own final norm and
head, no balcony) as an ONNX graph made exactly like the export's, cached under <cache>/bench/floors."""

from __future__ import annotations

import json
from pathlib import Path

from balcony_edge.common.paths import cache_dir
from balcony_edge.runtime.core.manifest import Manifest

FLOOR_DATA_SUFFIX = ".data"
FLOOR_VERSION = 2  # 2: built by the graph builder (fused contrib ops), no longer traced


def quantization_block(manifest: Manifest) -> int:
    """The export's weights per quantisation block (32 where a manifest does not say)."""
    return int((manifest.quantization or {}).get("block_size", 32))


def floor_dir(manifest: Manifest) -> Path:
    """<cache>/bench/floors/<base sha256 prefix>-<precision>: floor graphs of one base model and precision (and
    block size, where it is not 32)."""
    precision = manifest.dtype
    if manifest.quantization is not None:
        block = quantization_block(manifest)
        precision += f"-{manifest.quantization['method']}" + (f"-b{block}" if block != 32 else "")
    return cache_dir() / "bench" / "floors" / f"v{FLOOR_VERSION}-{manifest.base['sha256'][:16]}-{precision}"


def floor_graph_path(manifest: Manifest, layers: int) -> Path:
    return floor_dir(manifest) / f"layers_{layers}.onnx"


def torch_available() -> bool:
    """Whether the torch side (torch, transformers, onnx) can build floor graphs here."""
    try:
        import onnx  # noqa: F401
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
            from balcony_edge.base_model import load_base_model

            base = load_base_model(manifest.base["source"])
        check_same_base(manifest, base)
        for layers in missing:
            say(
                "exporting the floor graph: the base model cut to "
                f"{layers} layers (once; cached in {floor_dir(manifest)})"
            )
            export_floor(base.model, layers, manifest, floor_graph_path(manifest, layers))
    return {d: floor_graph_path(manifest, d) for d in depths}


def check_same_base(manifest: Manifest, base) -> None:
    from balcony_edge.common.errors import BalconyError

    if base.identity.sha256 != manifest.base["sha256"]:
        raise BalconyError(
            f"the base model {manifest.base['source']!r} loaded here is not the one the export was made from "
            "(sha256 differs); bench with --no-floor or install that base model"
        )


def export_floor(model, layers: int, manifest: Manifest, path: Path) -> None:
    """Build a truncated base model with the export's own graph builder, dtype and quantisation; weights beside it."""
    import onnx

    from balcony_edge.export.exporter import NUMPY_DTYPES
    from balcony_edge.export.pieces import PieceGraphs
    from balcony_edge.export.quantize import quantize_graph

    quantized = manifest.quantization is not None
    if NUMPY_DTYPES[manifest.dtype] != NUMPY_DTYPES["fp32"]:
        import copy

        model = copy.deepcopy(model).half()
    proto = PieceGraphs(model, NUMPY_DTYPES[manifest.dtype], tie_head_as_gemm=not quantized).truncated(layers)
    if manifest.quantization is not None:
        proto = quantize_graph(proto, manifest.quantization["method"], quantization_block(manifest))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    data = path.name + FLOOR_DATA_SUFFIX
    onnx.save(
        proto, partial, save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024
    )
    (path.parent / f"{path.stem}.json").write_text(json.dumps({"layers": layers, "base": manifest.base}) + "\n")
    partial.replace(path)
