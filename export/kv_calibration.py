"""Scales of an int8 KV cache (`export --kv-cache int8`), calibrated in torch at export time.

onnxruntime's GroupQueryAttention stores each new key and value as int8 codes, round(x / scale) saturated to
[-128, 127], with one float32 scale per KV head and channel, and reads them back as code x scale. A key is
stored after the rotary embedding, which turns each pair of channels (i, i + head_dim / 2) by a position's
angle: whatever the position, neither channel of the pair exceeds the pair's norm (times the rotary tables' own
attention factor, which rope scalings such as YaRN apply). So a key channel's scale comes
from the largest pair norm seen, which holds at positions the calibration text never reached; a value channel's
from its largest magnitude. The text is a few short passages of the kinds the model serves (prose, chat, code).
"""

from __future__ import annotations

import numpy as np
import torch

from balcony_edge.export.graph_builder import Architecture, KVScales
from balcony_edge.export.quality import QUALITY_TEXT, QUALITY_TOKENS
from balcony_edge.generate import prompt_ids
from balcony_edge.model import BalconyModel

INT8_LIMIT = 127.0
CHAT_TEXT = "Give me three tips for keeping basil alive on a sunny windowsill, and say why each one works."
CODE_TEXT = (
    "def moving_average(values, window):\n"
    '    """The mean of each run of `window` values."""\n'
    "    if window < 1:\n"
    "        raise ValueError(f'window must be positive, not {window}')\n"
    "    total = sum(values[:window])\n"
    "    averages = [total / window]\n"
    "    for old, new in zip(values, values[window:]):\n"
    "        total += new - old\n"
    "        averages.append(total / window)\n"
    "    return averages\n"
)


def calibration_ids(tokenizer) -> list[list[int]]:
    """The calibration passages as token ids (each at most QUALITY_TOKENS, which any model's context holds): prose, a
    chat prompt in the model's template, code."""
    passages = [
        tokenizer.encode(QUALITY_TEXT),
        prompt_ids(tokenizer, CHAT_TEXT, chat=True),
        tokenizer.encode(CODE_TEXT),
    ]
    return [ids[:QUALITY_TOKENS] for ids in passages]


@torch.no_grad()
def kv_cache_scales(model: BalconyModel, tokenizer) -> dict[str, KVScales]:
    """Scales for every attention of the model (backbone layers and balconies), by module name (the prefix of its
    parameters' names, e.g. `base.model.layers.3.self_attn`)."""
    arch = Architecture.of(model.base.config)
    attentions = {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "k_proj") and hasattr(module, "v_proj")
    }
    bounds: dict[str, list[torch.Tensor]] = {name: [torch.zeros(0), torch.zeros(0)] for name in attentions}
    hooks = []

    def keep(name: str, which: int, per_pair: bool):
        """A hook that widens bounds[name][which] (0: keys, 1: values) to what the module just produced."""

        def hook(module, args, output):
            heads = output.float().reshape(-1, arch.num_kv_heads, arch.head_dim)
            if per_pair:
                first, second = heads.chunk(2, dim=-1)
                norm = torch.sqrt(first.square() + second.square())
                heads = torch.cat([norm, norm], dim=-1)
            largest = heads.abs().amax(dim=0)
            seen = bounds[name][which]
            bounds[name][which] = largest if seen.numel() == 0 else torch.maximum(seen, largest)

        return hook

    for name, attention in attentions.items():
        key_source = getattr(attention, "k_norm", None)  # Qwen3 normalises keys before the rotary embedding
        if key_source is None:
            key_source = attention.k_proj
        hooks.append(key_source.register_forward_hook(keep(name, 0, per_pair=True)))
        hooks.append(attention.v_proj.register_forward_hook(keep(name, 1, per_pair=False)))
    try:
        for ids in calibration_ids(tokenizer):
            model.all_logits(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    # Rope scalings such as YaRN multiply cos and sin by an attention factor: rotated keys grow by as much.
    rotary = float(getattr(model.base.model.rotary_emb, "attention_scaling", 1.0))
    return {name: KVScales(key=_scale(key * rotary), value=_scale(value)) for name, (key, value) in bounds.items()}


def _scale(bound: torch.Tensor) -> np.ndarray:
    """[kv_heads, head_dim] bounds -> [1, kv_heads, 1, head_dim] scales (a channel never seen non-zero gets a tiny
    one)."""
    scale = (bound.clamp(min=1e-6) / INT8_LIMIT).numpy().astype(np.float32)
    return scale[None, :, None, :]
