"""On-policy distillation: each exit learns the full model on its own answers.

Teacher-forced distillation shows an exit only text it did not write; at generation time one wrong token leads it
where it never trained, and a shallow exit falls into loops. Here, every optimizer step, each exit writes answers
to training prompts (`prompts.chat_prompts`, never the held-out ones), the full model scores every position of
those answers, and the exit is trained towards the full model's distribution there (a divergence from
`distill.DIVERGENCES`), beside the teacher-forced loss on text.

Deterministic like the rest of training: a step's prompts follow from the seed and the step alone, and each
exit's sampling from a generator seeded by (seed, step, exit), so a resumed run writes the answers that one
uninterrupted run writes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from balcony_edge.common.console import log_warning
from balcony_edge.distill import distill_backward
from balcony_edge.generate import eos_token_ids, prompt_ids
from balcony_edge.model import BalconyModel
from balcony_edge.prompts import chat_prompts


@dataclass(frozen=True)
class OnPolicySettings:
    """How many answers each exit writes per step and how they are written and scored."""

    answers: int  # per exit, per step, per rank
    max_new_tokens: int = 128
    temperature: float = 1.0
    divergence: str = "forward"
    weight: float = 1.0  # of the on-policy loss beside the teacher-forced one


@dataclass
class Trajectories:
    """One exit's answers of one step: prompt + answer token rows and where each answer starts."""

    rows: list[list[int]]
    answer_starts: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(len(row) - start for row, start in zip(self.rows, self.answer_starts))


class OnPolicy:
    """The prompts (rendered in the base model's chat template) and the per-step answer writing and scoring."""

    def __init__(
        self, model: BalconyModel, tokenizer, settings: OnPolicySettings, seed: int, rank: int = 0, world: int = 1
    ):
        self.model, self.settings, self.seed, self.rank, self.world = model, settings, seed, rank, world
        self.stop = sorted(eos_token_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]
        if not tokenizer.chat_template:
            log_warning("the base model has no chat template: on-policy prompts are plain text, as eval --chat's are")
        pairs = chat_prompts(1_000_000, seed=seed, questions=True)
        self.prompts = [prompt_ids(tokenizer, prompt, chat=True, system=system) for system, prompt in pairs]

    def prompts_of(self, step: int, exit_index: int) -> list[list[int]]:
        """The prompts exit number `exit_index` answers at `step` on this rank: consecutive draws from a shuffled
        pool (chat_prompts shuffles with the seed), wrapping around."""
        per, count = self.settings.answers, len(self.model.exits)
        first = ((step * self.world + self.rank) * count + exit_index) * per
        return [self.prompts[(first + j) % len(self.prompts)] for j in range(per)]

    @torch.no_grad()
    def write(self, step: int, autocast) -> dict[int, Trajectories]:
        """Each exit's sampled answers for this step (the global random state untouched)."""
        written = {}
        self.model.eval()
        try:
            for index, k in enumerate(self.model.exits):
                prompts = self.prompts_of(step, index)
                with torch.random.fork_rng(devices=[]), autocast:
                    torch.manual_seed((self.seed * 1_000_003 + step) * 1_009 + k)
                    answers = self._sample(k, prompts)
                written[k] = Trajectories([p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts])
        finally:
            self.model.train()
        return written

    def _sample(self, k: int, prompts: list[list[int]]) -> list[list[int]]:
        width = max(map(len, prompts))
        device = next(self.model.parameters()).device
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        s = self.settings
        output = self.model.exit_model(k).generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=s.max_new_tokens,
            do_sample=True,
            temperature=s.temperature,
            top_p=1.0,
            top_k=0,
            eos_token_id=self.stop,
            pad_token_id=self.pad,
        )
        answers = []
        for row in output[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.stop), len(row))
            answers.append(row[:end])
        return answers

    def backward(self, module, written: dict[int, Trajectories], chunk_tokens: int, autocast) -> dict[int, float]:
        """Backpropagate weight x mean over exits of the divergence on each exit's own answer positions; returns each
        exit's mean divergence (nats/token)."""
        losses = {}
        for k, trajectories in written.items():
            rows = trajectories.rows
            width = max(map(len, rows))
            device = next(self.model.parameters()).device
            ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
            # Position i predicts token i + 1: the answer's tokens are predicted from start - 1 to the row's end - 2.
            where = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, (row, start) in enumerate(zip(rows, trajectories.answer_starts)):
                ids[r, : len(row)] = torch.tensor(row)
                where[r, start - 1 : len(row) - 1] = True
            if not where.any():
                continue
            where = where.to(device)
            with autocast:
                hiddens = module(ids.to(device))  # padded on the right: no real position sees the padding
                losses.update(
                    distill_backward(
                        self.model.base.lm_head,
                        hiddens.final[where],
                        {k: hiddens.exits[k][where]},
                        self.settings.weight / len(written),
                        chunk_tokens,
                        top_k=0,
                        divergence=self.settings.divergence,
                    )
                )
        return losses
