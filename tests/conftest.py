"""Shared fixtures: tiny random Llama-family models with a tiny BPE tokenizer, saved as Hugging Face folders."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Commands run in this process (main([...]), CliRunner) keep per-session onnxruntime pools: a process-wide pool, the
# commands' default, would refuse every later test's session; tests in subprocesses drop this to run the default.
os.environ["BALCONY_EDGE_THREAD_POOL"] = "session"

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


# Prepended to a subprocess's script: importing torch, transformers or onnx there fails (the runtime must not need
# them).
BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'onnxscript'):
            raise ImportError(f'{name} is blocked: the runtime must not need it')
sys.meta_path.insert(0, Blocker())
"""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "The harbour was quiet in the early morning.",
    "Fishing boats rocked against the pier while gulls circled overhead.",
    "Write a short story about the sea and the people who work on it.",
    "A small model runs on a small device at many speeds.",
]


def make_tokenizer():
    """A 400-token byte-level BPE tokenizer with chat special tokens and template, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 20 + synthetic_text(50, 100), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_base_folder(
    folder, model_type: str = "llama", layers: int = 4, seed: int = 0, initializer_range: float = 0.02
):
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
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    spread(model.parameters(), seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def spread(parameters, seed: int = 1) -> None:
    """Give every weight distinct content (fresh norms are all ones), so that content hashes tell them apart."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def tiny_train_config(base_dir, text_dir, out, **overrides):
    """A TrainConfig for a few quick steps on a tiny model (exits 1 and 3, blocks of 32 tokens, one thread)."""
    from balcony_edge.train import TrainConfig

    settings = dict(
        exits=(1, 3),
        out=str(out),
        base=str(base_dir),
        data=[str(text_dir)],
        seq_len=32,
        batch_size=4,
        micro_batch_size=2,
        lr=3e-3,
        max_tokens=4 * 32 * 8,
        save_every=4,
        precision="fp32",
        threads=1,
    )
    return TrainConfig(**(settings | overrides))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """What the code under test caches (packed weights, calibrations, floors) goes to this run's temporary folder, not
    the user's; tests that need a cache of their own set BALCONY_EDGE_CACHE themselves."""
    os.environ["BALCONY_EDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))


TINY_EXITS = (1, 2)
TINY_LAYERS = 4


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A Hugging Face folder: random 4-layer Llama (hidden 64, 4 heads, 2 KV heads, tied embeddings) + tokenizer."""
    return make_base_folder(tmp_path_factory.mktemp("tiny-llama"), layers=TINY_LAYERS)


@pytest.fixture(scope="session")
def peaked_base_dir(tmp_path_factory):
    """Like tiny_base_dir but with larger weights: peaked next-token distributions give distillation something to
    learn."""
    return make_base_folder(tmp_path_factory.mktemp("peaked-llama"), layers=TINY_LAYERS, initializer_range=0.2)


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


@pytest.fixture(scope="session")
def default_export(tmp_path_factory):
    """The shipped checkpoint exported in fp32 and verified against torch (minutes: shared by the slow tests)."""
    from balcony_edge.export.exporter import ExportConfig, export_checkpoint

    return export_checkpoint(
        ExportConfig(checkpoint=None, out=tmp_path_factory.mktemp("default") / "smollm2-balcony-fp32")
    )


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_base, tiny_base_dir, tmp_path_factory):
    """A checkpoint with random balconies at exits 1 and 2 of the tiny model."""
    from balcony_edge.checkpoint import build_model, save_checkpoint
    from balcony_edge.model import BalconyConfig

    model = build_model(tiny_base, BalconyConfig(TINY_EXITS, balcony_init="random"))
    spread(model.balcony_state_dict().values())
    folder = tmp_path_factory.mktemp("checkpoints") / "tiny-balcony"
    save_checkpoint(model, str(tiny_base_dir), folder, training={})
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint, tiny_base):
    from balcony_edge.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(tiny_checkpoint, tiny_base)
    return model


@pytest.fixture(scope="session")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported in fp32 (every trained exit, verified)."""
    from balcony_edge.export.exporter import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "tiny-fp32"
    return export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, out=out))


@pytest.fixture(scope="session")
def tiny_export_kv8(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported in fp32 with an int8 KV cache (every trained exit, verified)."""
    from balcony_edge.export.exporter import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "tiny-fp32-kv8"
    return export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, out=out, kv_cache="int8"))
