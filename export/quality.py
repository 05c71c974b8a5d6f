"""Each exit's agreement with the full model's next token on a fixed English text, measured in torch at export
time: the `quality` the runtime's controller reads from the manifest."""

from __future__ import annotations

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


@torch.no_grad()
def exit_agreement(model: BalconyModel, tokenizer) -> tuple[dict[int, float], int]:
    """Top-1 agreement (0..1) of every exit's next token with the full model's, and the tokens it was measured on."""
    ids = torch.tensor([tokenizer.encode(QUALITY_TEXT)[:QUALITY_TOKENS]])
    logits = model.all_logits(ids)
    full = logits[model.num_layers].argmax(-1)
    return {k: float((logits[k].argmax(-1) == full).float().mean()) for k in logits}, ids.shape[1]
