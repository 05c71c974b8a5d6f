"""The chat-quality check: for 20 fixed prompts, does each exit's greedy answer start as the full model's does?

Perplexity says how close an exit's distribution is; this says what a user sees: the fraction of answers whose
first tokens (32 by default, fewer where the full model's answer ends sooner) equal the full model's, the mean
length of the common prefix, and the answers themselves side by side."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rich.progress import Progress

from balcony_edge.common.console import console
from balcony_edge.generate import eos_token_ids, generate_greedy, prompt_ids
from balcony_edge.model import BalconyModel
from balcony_edge.prompts import QUALITY_PROMPTS


@dataclass
class ExitChatQuality:
    exit: int
    same_answer: float  # fraction of prompts whose first `tokens` greedy tokens equal the full model's
    mean_common_prefix: float  # tokens


@dataclass
class ChatQuality:
    tokens: int
    exits: list[ExitChatQuality]
    answers: list[dict]  # per prompt: {"prompt": ..., "full": text, "8": text, ...}

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "exits": [asdict(e) for e in self.exits], "answers": self.answers}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_quality(model: BalconyModel, tokenizer, tokens: int = 32, show_progress: bool = True) -> ChatQuality:
    """Greedy answers to QUALITY_PROMPTS at every exit and at full depth, compared token by token."""
    stop = eos_token_ids(model, tokenizer)
    depths = [*model.exits, model.num_layers]
    answers, same, prefix = [], {k: 0 for k in model.exits}, {k: 0 for k in model.exits}
    with Progress(console=console, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("chat answers", total=len(QUALITY_PROMPTS) * len(depths))
        for prompt in QUALITY_PROMPTS:
            ids = prompt_ids(tokenizer, prompt, chat=True)
            generated = {}
            for depth in depths:
                generated[depth] = generate_greedy(model, depth, ids, tokens, stop)
                progress.advance(task)
            full = generated[model.num_layers]
            row = {"prompt": prompt, "full": tokenizer.decode(full, skip_special_tokens=True)}
            for k in model.exits:
                common = _common_prefix(generated[k], full)
                prefix[k] += common
                same[k] += common == len(full)
                row[str(k)] = tokenizer.decode(generated[k], skip_special_tokens=True)
            answers.append(row)
    n = len(QUALITY_PROMPTS)
    return ChatQuality(
        tokens=tokens,
        exits=[ExitChatQuality(k, same[k] / n, prefix[k] / n) for k in model.exits],
        answers=answers,
    )
