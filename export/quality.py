"""Each exit against the full model on a fixed English text, measured in torch at export time: its next-token
agreement is the `quality` the runtime's controller reads from the manifest; with its perplexity ratio it goes
into the model card of an exit exported as a plain checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balcony_edge.model import BalconyModel

QUALITY_TOKENS = 256  # at most, so that any model's context holds the text
QUALITY_TEXT = (
    "Every morning the ferry leaves the island a little after six. The first passengers are always the same: "
    "two nurses going to the hospital on the mainland, a baker with empty crates, and a few students who sleep "
    "against the windows until the engines slow down. In winter the crossing takes longer, because the wind "
    "comes from the north and the captain keeps close to the coast. Nobody complains. The coffee on board is "
    "bad but hot, and the view of the harbour lights going out one by one is worth the early start.\n\n"
    "The island has one school, one shop and a small library that opens on Tuesdays and Saturdays. Most "
    "families have lived there for generations, although in recent years a number of younger people have "
    "moved in to work remotely. They brought faster internet and a market for fresh bread, and the old "
    "residents have mostly welcomed them. The council is now discussing whether a second ferry should run "
    "in the evening, which would make it easier to work on the mainland and still be home for dinner."
)


@dataclass(frozen=True)
class AgainstFull:
    """Every exit (and the full model, key num_layers) against the full model on QUALITY_TEXT."""

    top1: dict[int, float]  # agreement (0..1) of the exit's next token with the full model's
    perplexity_ratio: dict[int, float]  # the exit's perplexity over the full model's
    tokens: int  # what it was measured on


@torch.no_grad()
def against_full(model: BalconyModel, tokenizer) -> AgainstFull:
    """Top-1 agreement and perplexity ratio of every exit, from one backbone pass over the fixed text."""
    ids = torch.tensor([tokenizer.encode(QUALITY_TEXT)[:QUALITY_TOKENS]])
    logits = model.all_logits(ids)
    full = logits[model.num_layers]

    def perplexity(scores: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(scores[0, :-1], ids[0, 1:]).exp())

    full_top1, full_perplexity = full.argmax(-1), perplexity(full)
    return AgainstFull(
        top1={k: float((scores.argmax(-1) == full_top1).float().mean()) for k, scores in logits.items()},
        perplexity_ratio={k: perplexity(scores) / full_perplexity for k, scores in logits.items()},
        tokens=ids.shape[1],
    )
