"""Fixtures of the export tests: a tiny random Llama with a tiny BPE tokenizer, a checkpoint on it, exports."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from balcony_edge.base_model import load_base_model
from balcony_edge.checkpoint import build_model, save_checkpoint
from balcony_edge.export.exporter import ExportConfig, export_checkpoint
from balcony_edge.model import BalconyConfig

TINY_EXITS = (1, 2)
TINY_LAYERS = 4
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SENTENCES = [
    "The harbour was quiet in the early morning.",
    "Fishing boats rocked against the pier while gulls circled overhead.",
    "The smell of salt and diesel drifted over the stones.",
    "Write a short story about the sea and the people who work on it.",
    "A small model runs on a small device at many speeds.",
] * 20
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", bos_token="<|im_start|>", unk_token="<|endoftext|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _spread(parameters) -> None:
    """Give every weight distinct content (fresh norms are all ones), so that content hashes tell them apart."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="session")
def tiny_base_folder(tmp_path_factory) -> Path:
    """A Hugging Face folder: random 4-layer Llama (hidden 64, 4 heads, 2 KV heads, tied embeddings) + tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=TINY_LAYERS, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), tie_word_embeddings=True, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    _spread(model.parameters())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base(tiny_base_folder):
    return load_base_model(str(tiny_base_folder))


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base, tiny_base_folder, tmp_path_factory) -> Path:
    """A checkpoint with random balconies at exits 1 and 2 of the tiny model."""
    model = build_model(tiny_base, BalconyConfig(TINY_EXITS, balcony_init="random"))
    _spread(model.balcony_state_dict().values())
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-balcony"
    save_checkpoint(model, str(tiny_base_folder), folder, training={})
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint, tiny_base):
    from balcony_edge.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(tiny_checkpoint, tiny_base)
    return model


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported in fp32 (every trained exit, verified)."""
    out = tmp_path_factory.mktemp("exports") / "tiny-fp32"
    return export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, out=out))
