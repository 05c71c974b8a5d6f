"""Shared fixtures: tiny random Llama-family models with a tiny BPE tokenizer, saved as Hugging Face folders."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

WORDS = (
    "the a balcony model exit layer token river mountain city light small fast slow bright quiet music river "
    "garden window train station morning evening reads writes builds runs sees finds keeps gives takes "
    "green blue red old new long short warm cold every some many few one two three"
).split()


def synthetic_text(documents: int, words: int, seed: int = 0) -> list[str]:
    """Deterministic word-salad documents with some structure (repeated phrases) for tiny-model tests."""
    rng = random.Random(seed)
    out = []
    for _ in range(documents):
        sentence = []
        for _ in range(words):
            sentence.append(rng.choice(WORDS))
            if rng.random() < 0.1:
                sentence.append(".")
        out.append(" ".join(sentence))
    return out


def make_tokenizer():
    """A 300-token byte-level BPE tokenizer trained on synthetic text, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(synthetic_text(50, 100), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>assistant:{% endif %}"
    return fast


def make_base_folder(folder, model_type: str = "llama", layers: int = 4, seed: int = 0):
    """Save a tiny random causal LM of the given family and the tiny tokenizer into `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer()
    config = AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaked distributions, so that distillation has something to learn
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny 4-layer random Llama folder."""
    return make_base_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    from balcony_edge.base_model import load_base_model

    return load_base_model(str(tiny_base_dir))


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory):
    """A folder of synthetic training text: 40 documents of 300 words."""
    folder = tmp_path_factory.mktemp("text")
    for i, doc in enumerate(synthetic_text(40, 300, seed=1)):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    return folder


@pytest.fixture(scope="session")
def smollm2():
    """The real default base model (converted once into the user's cache)."""
    from balcony_edge.base_model import load_base_model

    return load_base_model("smollm2")
