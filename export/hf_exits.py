"""Exit k as a Hugging Face folder: the base architecture's own config with k + n layers (n: the balcony's), weights
(tied embeddings stay tied), tokenizer, chat template, generation config and a model card."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from balcony_edge.model import BalconyModel

HF_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def hf_folder_name(k: int) -> str:
    return f"exit_{k}"


def write_exit_folder(folder: Path, k: int, model: BalconyModel, tokenizer, dtype: str, card: str) -> None:
    """Save exit k of `model` into `folder` (created) in `dtype`, with the tokenizer and the card as README.md."""
    exit_model = model.exit_model(k)
    state = {name: tensor.to(HF_DTYPES[dtype]) for name, tensor in exit_model.state_dict().items()}
    if getattr(exit_model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    exit_model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    config = copy.deepcopy(exit_model.config)
    config.dtype = HF_DTYPES[dtype]  # what from_pretrained(dtype="auto") loads (save_pretrained writes the model's own)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text(card, encoding="utf-8")
