"""The self-distillation loss KL(full || exit), computed a chunk of tokens at a time.

The [tokens x vocab] logits are never held for all tokens at once: each chunk's KL is backpropagated
into detached copies of the exit hidden states, whose gradients then flow through the balconies in
one backward pass. The gradients equal those of the unchunked loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_backward(
    head: torch.nn.Module,
    teacher_hidden: torch.Tensor,
    exit_hidden: dict[int, torch.Tensor],
    loss_scale: float = 1.0,
    chunk_tokens: int = 256,
) -> dict[int, float]:
    """Backpropagate loss_scale x mean over exits of KL(full || exit); returns each exit's mean KL (nats/token)."""
    teacher = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    students = {k: h.detach().reshape(-1, h.shape[-1]).requires_grad_() for k, h in exit_hidden.items()}
    tokens = teacher.shape[0]
    per_exit = {k: 0.0 for k in exit_hidden}
    weight = loss_scale / (len(exit_hidden) * tokens)
    for start in range(0, tokens, chunk_tokens):
        piece = slice(start, start + chunk_tokens)
        with torch.no_grad():
            teacher_log = F.log_softmax(head(teacher[piece]).float(), dim=-1)
            teacher_prob = teacher_log.exp()
        for k, student in students.items():
            student_log = F.log_softmax(head(student[piece]).float(), dim=-1)
            kl_sum = (teacher_prob * (teacher_log - student_log)).sum()
            (kl_sum * weight).backward()
            per_exit[k] += kl_sum.item() / tokens
    torch.autograd.backward(
        [exit_hidden[k] for k in students], [students[k].grad.view_as(exit_hidden[k]) for k in students]
    )
    return per_exit


@torch.no_grad()
def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) for each position: [..., vocab] -> [...] (nats)."""
    teacher_log = F.log_softmax(teacher_logits.float(), dim=-1)
    student_log = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
