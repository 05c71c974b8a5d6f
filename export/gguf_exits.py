"""Exit k as a GGUF file for llama.cpp and ollama: the base GGUF's metadata (tokenizer, chat template) with
block_count = k + the balcony's layers, and the exit model's tensors named and laid out the way llama.cpp reads that
architecture."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from balcony_edge.common.errors import ExportError
from balcony_edge.model import BalconyModel

GGUF_DTYPES = ("f16", "fp32", "q8_0")
FILE_TYPES = {
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "fp32": gguf.LlamaFileType.ALL_F32,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
# Architectures whose GGUF query/key rows llama.cpp expects interleaved per rotary pair (its converter permutes
# them; transformers' GGUF loader undoes that on load, so the balcony's own weights are permuted here).
INTERLEAVED_ROTARY = ("llama",)
COPIED_FIELDS_SKIPPED = ("GGUF.", "general.architecture")


def gguf_file_name(name: str, k: int) -> str:
    return f"{name}-exit_{k}.gguf"


def read_source(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read the base GGUF {path} ({err}); restore it or give it with --base") from None


def architecture(reader: gguf.GGUFReader) -> str:
    return reader.fields["general.architecture"].contents()


def write_exit_gguf(path: Path, k: int, model: BalconyModel, source: gguf.GGUFReader, dtype: str) -> None:
    """Write exit k of `model` to `path` with `source`'s metadata; `dtype`: f16, fp32 or q8_0."""
    arch = architecture(source)
    writer = gguf.GGUFWriter(path, arch)
    for field in source.fields.values():
        if field.name.startswith(COPIED_FIELDS_SKIPPED):
            continue
        value = field.contents()
        if field.name == f"{arch}.block_count":
            value = model.exit_layers(k)
        elif field.name == "general.file_type":
            value = int(FILE_TYPES[dtype])
        elif field.name == "general.name":
            value = f"{value} (Balcony exit {k})"
        kind = gguf.GGUFValueType(field.types[0])
        writer.add_key_value(
            field.name,
            value,
            kind,
            sub_type=gguf.GGUFValueType(field.types[-1]) if kind == gguf.GGUFValueType.ARRAY else None,
        )
    for name, tensor in exit_tensors(k, model, arch).items():
        data, raw = encode(tensor, dtype)
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def exit_tensors(k: int, model: BalconyModel, arch: str) -> dict[str, np.ndarray]:
    """The exit model's tensors under llama.cpp's names, float32, query/key rows in llama.cpp's rotary order."""
    exit_model = model.exit_model(k)
    config = exit_model.config
    names = gguf.get_tensor_name_map(_model_arch(arch), model.exit_layers(k))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = {}
    for hf_name, tensor in exit_model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(
                f"no llama.cpp name for {hf_name} of a {arch} model; export --format hf and convert with llama.cpp"
            )
        array = tensor.detach().to(torch.float32).numpy()
        if arch in INTERLEAVED_ROTARY and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            array = interleave_rotary_rows(array, heads)
        tensors[name] = array
    return tensors


def interleave_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from halves (x0..x31, y0..y31) to pairs (x0, y0, x1, y1, ...), as llama.cpp rotates."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode(array: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """A tensor in the file's type: vectors (norms, biases) stay float32, as llama.cpp's converter keeps them."""
    if array.ndim == 1 or dtype == "fp32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if dtype == "f16":
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    for key, name in gguf.MODEL_ARCH_NAMES.items():
        if name == arch:
            return key
    raise ExportError(f"the gguf package knows no architecture {arch!r}; export --format hf and convert with llama.cpp")
