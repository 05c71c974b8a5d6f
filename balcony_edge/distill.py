"""The self-distillation losses, computed a chunk of tokens at a time: KL(full || exit) on text (teacher-forced), and
on an exit's own answers one of three divergences between the full model p and the exit q:

- forward, KL(p || q): covers every token the full model would write (mass-covering);
- reverse, KL(q || p): penalises what the exit writes and the full model would not (mode-seeking);
- jsd, the Jensen-Shannon divergence with the mixture m = (p + q) / 2: bounded, between the two.

The [tokens x vocab] logits are never held for all tokens at once: each chunk's loss is backpropagated
into detached copies of the exit hidden states, whose gradients then flow through the balconies in
one backward pass. The gradients equal those of the unchunked loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TAIL_SAMPLES = 1024  # tokens outside the top-k union whose student logits estimate the student's tail mass
DIVERGENCES = ("forward", "reverse", "jsd")


def distill_backward(
    head: torch.nn.Linear,
    teacher_hidden: torch.Tensor,
    exit_hidden: dict[int, torch.Tensor],
    loss_scale: float = 1.0,
    chunk_tokens: int = 256,
    top_k: int = 0,
    divergence: str = "forward",
) -> dict[int, float]:
    """Backpropagate loss_scale x mean over exits of the divergence between full and exit (nats/token; see the
    module's docstring); returns each exit's mean.

    top_k = 0: over the whole vocabulary (what the on-policy losses use). top_k > 0: over the union S of the
    teacher's top-k tokens at the chunk's positions plus one bucket for every other token. The teacher's bucket mass is
    exact; the student's is
    estimated from TAIL_SAMPLES tokens drawn at random outside S (scaled up to the whole tail), so a student that
    puts mass outside S is still penalised, while the head's cost falls by about vocab / (|S| + TAIL_SAMPLES)."""
    teacher = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    students = {k: h.detach().reshape(-1, h.shape[-1]).requires_grad_() for k, h in exit_hidden.items()}
    tokens = teacher.shape[0]
    per_exit = {k: 0.0 for k in exit_hidden}
    weight = loss_scale / (len(exit_hidden) * tokens)
    for start in range(0, tokens, chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        with torch.no_grad():
            teacher_log = F.log_softmax(head(teacher[piece]).float(), dim=-1)
            support = _Support.of(teacher_log, top_k) if top_k else None
            if support is not None:
                teacher_log = support.teacher_log(teacher_log)
            teacher_prob = teacher_log.exp()
        for k, student in students.items():
            student_log = (
                F.log_softmax(head(student[piece]).float(), dim=-1)
                if support is None
                else support.student_log(head, student[piece])
            )
            loss_sum = _divergence_sum(divergence, teacher_log, teacher_prob, student_log)
            (loss_sum * weight).backward()
            per_exit[k] += loss_sum.item() / tokens
    # Every student had a loss, so every one has a gradient to carry back into the backbone and its balcony.
    pairs = [(exit_hidden[k], student.grad) for k, student in students.items() if student.grad is not None]
    torch.autograd.backward([hidden for hidden, _ in pairs], [grad.view_as(hidden) for hidden, grad in pairs])
    return per_exit


def _divergence_sum(
    divergence: str, teacher_log: torch.Tensor, teacher_prob: torch.Tensor, student_log: torch.Tensor
) -> torch.Tensor:
    """The divergence summed over a chunk's positions (nats); the gradient reaches the student only."""
    if divergence == "forward":
        return (teacher_prob * (teacher_log - student_log)).sum()
    student_prob = student_log.exp()
    if divergence == "reverse":
        return (student_prob * (student_log - teacher_log)).sum()
    mixture_log = torch.logaddexp(teacher_log, student_log) - math.log(2)
    return 0.5 * (
        (teacher_prob * (teacher_log - mixture_log)).sum() + (student_prob * (student_log - mixture_log)).sum()
    )


class _Support:
    """The tokens a top-k distillation step looks at: the union S of the teacher's top-k, and a sample of the rest."""

    def __init__(self, kept: torch.Tensor, tail: torch.Tensor | None, tail_scale: float):
        self.kept, self.tail, self.tail_scale = kept, tail, tail_scale

    @classmethod
    def of(cls, teacher_log: torch.Tensor, top_k: int) -> _Support:
        vocab = teacher_log.shape[-1]
        kept = teacher_log.topk(min(top_k, vocab), dim=-1).indices.unique()
        outside = torch.ones(vocab, dtype=torch.bool, device=kept.device)
        outside[kept] = False
        rest = outside.nonzero().flatten()
        if len(rest) == 0:
            return cls(kept, None, 0.0)
        # Drawn from a generator seeded by the chunk's own top-k ids, not the global one: the sample then depends on
        # the data alone, so a run on several ranks or a resumed run draws what one uninterrupted process draws.
        generator = torch.Generator().manual_seed(int((kept.cpu() * 2_654_435_761).sum() % (2**31)))
        tail = rest[torch.randperm(len(rest), generator=generator)[:TAIL_SAMPLES].to(rest.device)]
        return cls(kept, tail, len(rest) / len(tail))

    def teacher_log(self, full_log: torch.Tensor) -> torch.Tensor:
        """log p over S, then log of the teacher's exact mass outside S (when there is an outside)."""
        kept = full_log[:, self.kept]
        if self.tail is None:
            return kept
        rest = torch.log1p(-kept.exp().sum(-1).clamp(max=1 - 1e-7))
        return torch.cat([kept, rest[:, None]], dim=-1)

    def student_log(self, head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
        """log q over S and the estimated tail bucket, normalised together."""
        logits = _head_rows(head, hidden, self.kept).float()
        if self.tail is not None:
            sampled = _head_rows(head, hidden, self.tail).float()
            tail = torch.logsumexp(sampled, dim=-1, keepdim=True) + math.log(self.tail_scale)
            logits = torch.cat([logits, tail], dim=-1)
        return F.log_softmax(logits, dim=-1)


def _head_rows(head: torch.nn.Linear, hidden: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """The head's logits for the token ids in `vocab` only: [..., d] -> [..., len(vocab)]."""
    bias = None if head.bias is None else head.bias[vocab]
    return F.linear(hidden, head.weight[vocab], bias)


@torch.no_grad()
def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) for each position: [..., vocab] -> [...] (nats)."""
    teacher_log = F.log_softmax(teacher_logits.float(), dim=-1)
    student_log = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
