"""Weight-only quantisation of an exit graph with onnxruntime's own MatMulNBits quantizer (int8 or int4)."""

from __future__ import annotations

import logging

import onnx
import onnxruntime

from balcony_edge.common.errors import ExportError

QUANTIZATION_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (16, 32, 64, 128)  # weights per quantisation block (along K) that MatMulNBits takes
# 32 by default: block 64 ran 8-20% faster on run 11's int4 export but agreed less with fp32 (docs/export.md)
DEFAULT_BLOCK_SIZE = 32
# Level 4 lets MatMulNBits quantise activations to int8 inside the kernel: faster, and its int4 text stayed
# coherent where the default level's repeated itself (reference, "Export facts").
ACCURACY_LEVEL = 4


def check_quantization(method: str | None, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Refuse an unknown quantisation name or block size, and a block size without a quantisation."""
    if method is not None and method not in QUANTIZATION_BITS:
        raise ExportError(
            f"--quantize {method!r} is unknown; choose one of {', '.join(QUANTIZATION_BITS)} or leave it out"
        )
    if type(block_size) is not int or block_size not in BLOCK_SIZES:
        sizes = ", ".join(map(str, BLOCK_SIZES))
        raise ExportError(f"--block-size {block_size!r} is not one MatMulNBits takes; choose one of {sizes}")
    if method is None and block_size != DEFAULT_BLOCK_SIZE:
        raise ExportError("--block-size applies to quantised weights; give --quantize int8 or int4 (or leave it out)")


def quantization_info(method: str | None, block_size: int = DEFAULT_BLOCK_SIZE) -> dict | None:
    """What the manifest records of a quantisation: method, bits, block size, accuracy level, tool."""
    if method is None:
        return None
    return {
        "method": method,
        "bits": QUANTIZATION_BITS[method],
        "block_size": block_size,
        "symmetric": True,
        "accuracy_level": ACCURACY_LEVEL,
        "tool": f"onnxruntime {onnxruntime.__version__} MatMulNBitsQuantizer",
    }


def _matmul_nbits_quantizer():
    """onnxruntime's MatMulNBitsQuantizer, imported without the root-logger INFO level its module sets on import."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ModuleNotFoundError as err:  # onnxruntime 1.31's quantizer imports onnx_ir, which it does not install
        package = (err.name or "").replace("_", "-")
        raise ExportError(
            f"onnxruntime's quantizer needs the package {package}: run `pip install {package}` (the train extra has it)"
        ) from None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return MatMulNBitsQuantizer


def quantize_graph(model: onnx.ModelProto, method: str, block_size: int = DEFAULT_BLOCK_SIZE) -> onnx.ModelProto:
    """Every MatMul with a weight initializer becomes MatMulNBits; the weight `W` becomes `W_Q{bits}` + `W_scales`.

    Deterministic, so a weight shared by several graphs quantises to the same bytes in each.
    """
    quantizer = _matmul_nbits_quantizer()(
        model, bits=QUANTIZATION_BITS[method], block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    return quantizer.model.model
