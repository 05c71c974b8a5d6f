"""Generation at a fixed exit with a KV cache, in torch: the reference the ONNX runtime is checked against."""

from __future__ import annotations

from collections.abc import Set

import torch
from transformers import DynamicCache

from balcony_edge.model import BalconyModel


def eos_token_ids(model: BalconyModel, tokenizer) -> set[int]:
    """Every token id that ends generation for this model (generation config and tokenizer)."""
    ids = model.base.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def prompt_ids(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt (after a system message, if any), wrapped in the model's chat template when `chat` and
    the tokenizer has one; without a template, the plain text."""
    if chat and tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return tokenizer.encode(f"{system}\n\n{prompt}" if system else prompt)


@torch.no_grad()
def generate_greedy(
    model: BalconyModel, exit: int, input_ids: list[int], max_new_tokens: int, stop_ids: Set[int] = frozenset()
) -> list[int]:
    """Greedy continuation of input_ids at exit `exit` (num_layers: the full model); returns new token ids."""
    decoder = model.exit_model(exit)
    device = next(decoder.parameters()).device
    cache = DynamicCache(config=decoder.config)
    logits = decoder(input_ids=torch.tensor([input_ids], device=device), cache=cache, use_cache=True).logits
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        new_tokens.append(token)
        if token in stop_ids:
            break
        logits = decoder(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True).logits
    return new_tokens
