"""Per-exit quality on held-out text: perplexity, top-1 agreement and KL against the full model,
beside the naive early exit (final norm + LM head on h_k, no balcony) at the same depth."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from rich.progress import Progress

from balcony_edge.common.atomic import atomic_path
from balcony_edge.common.console import console
from balcony_edge.distill import kl_per_token
from balcony_edge.model import BalconyModel


@dataclass
class ExitQuality:
    """One exit's figures; compute is layers run over the base model's layers."""

    exit: int
    ppl: float
    top1_agreement: float
    kl: float  # nats/token, KL(full || exit)
    naive_ppl: float
    naive_top1_agreement: float
    naive_kl: float
    relative_compute: float  # (k + n) / L: k backbone layers and the balcony's n
    naive_relative_compute: float  # k / L


@dataclass
class EvalResult:
    """The whole evaluation; `to_json()` is what `balcony-edge eval --json` prints."""

    full_ppl: float
    exits: list[ExitQuality]
    tokens: int
    num_layers: int

    def to_json(self) -> dict:
        return {
            "full": {"ppl": self.full_ppl, "relative_compute": 1.0},
            "exits": [asdict(e) for e in self.exits],
            "tokens": self.tokens,
            "num_layers": self.num_layers,
        }


class _Sums:
    def __init__(self):
        self.nll = self.top1 = self.kl = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, full_logits: torch.Tensor) -> None:
        self.nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        self.top1 += (logits.argmax(-1) == full_logits.argmax(-1)).sum().item()
        self.kl += kl_per_token(full_logits, logits).sum().item()


@torch.no_grad()
def evaluate(model: BalconyModel, blocks: torch.Tensor, batch_size: int = 2, show_progress: bool = True) -> EvalResult:
    """Evaluate every exit, its naive baseline and the full model on token blocks [n, seq] (next-token prediction)."""
    model.eval()
    device = next(model.parameters()).device
    full, balcony = _Sums(), {k: _Sums() for k in model.exits}
    naive = {k: _Sums() for k in model.exits}
    final_norm = model.base.model.norm
    tokens = 0
    with Progress(console=console, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(blocks))
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start : start + batch_size].to(device)
            targets = batch[:, 1:]
            hiddens = model(batch)
            full_logits = model.head(hiddens.final)[:, :-1]
            full.add(full_logits, targets, full_logits)
            for k in model.exits:
                balcony[k].add(model.head(hiddens.exits[k])[:, :-1], targets, full_logits)
                naive[k].add(model.head(final_norm(hiddens.backbone[k]))[:, :-1], targets, full_logits)
            tokens += targets.numel()
            progress.advance(task, len(batch))
    layers = model.num_layers
    exits = [
        ExitQuality(
            exit=k,
            ppl=math.exp(balcony[k].nll / tokens),
            top1_agreement=balcony[k].top1 / tokens,
            kl=balcony[k].kl / tokens,
            naive_ppl=math.exp(naive[k].nll / tokens),
            naive_top1_agreement=naive[k].top1 / tokens,
            naive_kl=naive[k].kl / tokens,
            relative_compute=model.exit_layers(k) / layers,
            naive_relative_compute=k / layers,
        )
        for k in model.exits
    ]
    return EvalResult(full_ppl=math.exp(full.nll / tokens), exits=exits, tokens=tokens, num_layers=layers)


def plot_quality(result: EvalResult, path: str, answers=None) -> None:
    """Perplexity and top-1 agreement against relative compute (layers run / total), balcony vs naive exit; with the
    held-out answers (answer_quality.AnswerQuality), their judge NLL and loop share beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 4 if answers is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax_ppl, ax_top1 = axes[:2]
    xs = [e.relative_compute for e in result.exits] + [1.0]
    naive_xs = [e.naive_relative_compute for e in result.exits] + [1.0]
    ax_ppl.plot(xs, [e.ppl for e in result.exits] + [result.full_ppl], "o-", label="balcony exit")
    ax_ppl.plot(naive_xs, [e.naive_ppl for e in result.exits] + [result.full_ppl], "s--", label="naive early exit")
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("held-out perplexity")
    ax_top1.plot(xs, [e.top1_agreement for e in result.exits] + [1.0], "o-", label="balcony exit")
    ax_top1.plot(naive_xs, [e.naive_top1_agreement for e in result.exits] + [1.0], "s--", label="naive early exit")
    ax_top1.set_ylabel("top-1 agreement with the full model")
    if answers is not None:
        ax_nll, ax_loop = axes[2:]
        depths = answers.depths
        compute = [d.relative_compute for d in depths]
        ax_nll.plot(compute, [d.judge_nll for d in depths], "o-", label="greedy")
        ax_loop.plot(compute, [d.loop_share for d in depths], "o-", label="greedy")
        if answers.settings.sampled_seeds:
            ax_nll.plot(compute, [d.sampled_judge_nll for d in depths], "s--", label="sampled")
            ax_loop.plot(compute, [d.sampled_loop_share for d in depths], "s--", label="sampled")
        ax_nll.set_ylabel("judge NLL of held-out answers (nats/token)")
        ax_loop.set_ylabel("answers caught in a loop")
    for ax in axes:
        ax.set_xlabel("relative compute (layers run / total)")
        ax.grid(alpha=0.3)
        ax.legend()
    title = f"Quality against compute ({result.tokens} held-out tokens"
    fig.suptitle(title + (f"; {answers.prompts} held-out chat prompts)" if answers is not None else ")"))
    fig.tight_layout()
    with atomic_path(path) as partial:
        fig.savefig(partial, dpi=120)
    plt.close(fig)
