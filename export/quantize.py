"""Weight-only quantisation of an exit graph with onnxruntime's own MatMulNBits quantizer (int8 or int4)."""

from __future__ import annotations

import logging

import onnx
import onnxruntime

from balcony_edge.common.errors import ExportError

QUANTIZATION_BITS = {"int8": 8, "int4": 4}
BLOCK_SIZE = 32  # weights per quantisation block (along K)
# Level 4 lets MatMulNBits quantise activations to int8 inside the kernel: faster, and its int4 text stayed
# coherent where the default level's repeated itself (reference, "Export facts").
ACCURACY_LEVEL = 4


def check_quantization(method: str | None) -> None:
    """Refuse an unknown quantisation name."""
    if method is not None and method not in QUANTIZATION_BITS:
        raise ExportError(
            f"--quantize {method!r} is unknown; choose one of {', '.join(QUANTIZATION_BITS)} or leave it out"
        )


def quantization_info(method: str | None) -> dict | None:
    """What the manifest records of a quantisation: method, bits, block size, accuracy level, tool."""
    if method is None:
        return None
    return {
        "method": method,
        "bits": QUANTIZATION_BITS[method],
        "block_size": BLOCK_SIZE,
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


def quantize_graph(model: onnx.ModelProto, method: str) -> onnx.ModelProto:
    """Every MatMul with a weight initializer becomes MatMulNBits; the weight `W` becomes `W_Q{bits}` + `W_scales`.

    Deterministic, so a weight shared by several graphs quantises to the same bytes in each.
    """
    quantizer = _matmul_nbits_quantizer()(
        model, bits=QUANTIZATION_BITS[method], block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL
    )
    quantizer.process()
    return quantizer.model.model
