"""What users read: each exit's answers to held-out chat prompts, judged by the full model.

Perplexity says how close an exit's next-token distribution is on someone else's text; an answer is the exit's own
text, where one wrong token leads the next astray. For every held-out prompt (`held_out_prompts.py`) each depth
writes an answer (greedily, and at the model's own sampling settings with a few seeds), and the figures are:

- judge NLL: the full model's mean negative log-likelihood per answer token (nats), the same prompt before it; the
  full model's own answers give the floor. Low is an answer the full model would have written.
- loop share: answers caught in a repetition loop (`in_loop`).
- length: mean answer tokens (a short answer is not a better one: compare with the full model's).
- facts right: the share of the factual prompts whose answer names the right word.
- reverse NLL: the exit's own NLL of the full model's greedy answers (can it follow what the full model says).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from rich.progress import Progress

from balcony_edge.common.console import console
from balcony_edge.generate import eos_token_ids, prompt_ids
from balcony_edge.held_out_prompts import FACTS, HELD_OUT_PROMPTS
from balcony_edge.model import BalconyModel

LOOP_MAX_PERIOD = 32  # tokens: the longest repeated block looked for
LOOP_REPEATS = 3  # a block written this many times back to back, over at least LOOP_MIN_TOKENS tokens, is a loop
LOOP_MIN_TOKENS = 16  # so numbers ("1,000,000", "333": one token a digit) and short echoes are not loops


@dataclass(frozen=True)
class AnswerSettings:
    """How the answers are written: greedy always; with `sampling` (the model's recommended settings, by the runtime's
    names: temperature, top_p, top_k, min_p, repetition_penalty) once per seed as well."""

    max_new_tokens: int = 96
    sampling: dict = field(
        default_factory=dict
    )  # empty: the model recommends greedy, and no sampled answers are written
    seeds: int = 3
    batch_size: int = 40

    @property
    def sampled_seeds(self) -> int:
        return self.seeds if self.sampling else 0


def in_loop(tokens: list[int], decode=None) -> bool:
    """Whether an answer repeats a block of 1..LOOP_MAX_PERIOD tokens back to back at least LOOP_REPEATS times
    and over at least LOOP_MIN_TOKENS tokens, the block holding a letter or digit (so rules of dashes and runs of
    blank lines are not loops). `decode` turns ids into text for that test (None: every block counts)."""
    n = len(tokens)
    for period in range(1, min(LOOP_MAX_PERIOD, n // LOOP_REPEATS) + 1):
        needed = max((LOOP_REPEATS - 1) * period, LOOP_MIN_TOKENS - period)  # a run of r spans r + period tokens
        run = 0  # positions i with tokens[i] == tokens[i - period], consecutively
        for i in range(period, n):
            run = run + 1 if tokens[i] == tokens[i - period] else 0
            if run >= needed:
                block = tokens[i - period + 1 : i + 1]
                if decode is None or any(c.isalnum() for c in decode(block)):
                    return True
    return False


def names_fact(text: str, word: str) -> bool:
    """Whether an answer names the expected word (case-insensitive, as a whole word)."""
    lowered, target = text.lower(), word.lower()
    start = lowered.find(target)
    while start >= 0:
        end = start + len(target)
        if (start == 0 or not lowered[start - 1].isalnum()) and (end == len(lowered) or not lowered[end].isalnum()):
            return True
        start = lowered.find(target, start + 1)
    return False


@dataclass
class DepthAnswers:
    """One depth's figures over the held-out prompts (greedy answers, and sampled ones when asked for)."""

    depth: int
    judge_nll: float  # nats per answer token under the full model, greedy answers
    loop_share: float
    mean_length: float  # answer tokens
    facts_right: float
    reverse_nll: float  # nats per token of the full model's greedy answers under this depth
    sampled_judge_nll: float | None = None
    sampled_loop_share: float | None = None
    sampled_mean_length: float | None = None
    sampled_facts_right: float | None = None
    relative_compute: float = 1.0  # layers run over the base model's layers


@dataclass
class AnswerQuality:
    """The whole measure; `to_json()` is what `eval --chat --json` prints under "chat"."""

    prompts: int
    settings: AnswerSettings
    depths: list[DepthAnswers]
    answers: list[dict] = field(default_factory=list)  # per prompt: greedy answer text by depth

    def by_depth(self) -> dict[int, DepthAnswers]:
        return {d.depth: d for d in self.depths}

    def to_json(self) -> dict:
        return {
            "prompts": self.prompts,
            "settings": asdict(self.settings),
            "depths": [asdict(d) for d in self.depths],
            "answers": self.answers,
        }

    def record(self) -> dict:
        """What a checkpoint or an export keeps of it (`eval --chat --record`): the greedy figures per depth."""
        figures = ("judge_nll", "loop_share", "facts_right", "mean_length")
        return {
            "prompts": self.prompts,
            "max_new_tokens": self.settings.max_new_tokens,
            "depths": {str(d.depth): {name: round(getattr(d, name), 4) for name in figures} for d in self.depths},
        }


class AnswerWriter:
    """Batched generation at one depth of a BalconyModel, prompts padded on the left."""

    def __init__(self, model: BalconyModel, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.stop = sorted(eos_token_ids(model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]
        self.device = next(model.parameters()).device
        self.depths = [*model.exits, model.num_layers]  # every depth it writes at

    @torch.no_grad()
    def write(
        self, depth: int, prompts: list[list[int]], max_new_tokens: int, sampling: dict | None = None, seed: int = 0
    ) -> list[list[int]]:
        """Answers (new token ids, the end token kept when written) to token-id prompts; sampling None: greedy."""
        torch.manual_seed(seed)
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        options: dict[str, bool | int | float] = {"do_sample": False}
        if sampling and sampling.get("temperature", 1.0) > 0:
            options = {"do_sample": True, "top_k": 0} | sampling  # transformers' own top_k default (50) is not ours
        output = self.model.exit_model(depth).generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop,
            pad_token_id=self.pad,
            **options,
        )
        return [_until_end(row[width:].tolist(), self.stop) for row in output]


class ExportWriter:
    """Answers written by the ONNX runtime at one exit of an export (what an int4 export's users read), up to `rows`
    at a time through the engine's batch decoder, as `serve --parallel` writes them (a new answer takes the row of
    one that ended; one row on a GPU, which has no batch decoder); the same interface as AnswerWriter."""

    def __init__(self, engine, rows: int = 8):
        self.engine, self.rows = engine, rows if engine.device == "cpu" else 1
        self.depths = engine.exits  # the export's exits, the full model last

    def write(
        self, depth: int, prompts: list[list[int]], max_new_tokens: int, sampling: dict | None = None, seed: int = 0
    ) -> list[list[int]]:
        from balcony_edge.runtime.core.sampling import SamplingConfig

        answers: list[list[int]] = [[] for _ in prompts]
        generations = {}
        batch = self.engine.batch_decoder(min(self.rows, len(prompts))) if self.rows > 1 else None
        waiting, running = list(range(len(prompts))), list[int]()
        while waiting or running:
            while waiting and len(running) < self.rows:
                i = waiting.pop(0)
                config = SamplingConfig(**(sampling or {}), seed=seed * 1_000_003 + i)
                generations[i] = self.engine.start(prompts[i], max_new_tokens, budget=str(depth), sampling=config)
                running.append(i)
                if batch is not None:
                    batch.admit(generations[i].sequence)
            planned = [(i, generations[i].plan()) for i in running]
            items = [(generations[i].sequence, exit) for i, exit in planned]
            chosen = batch.batchable(items) if batch is not None else []
            logits = {}
            if batch is not None and chosen:
                rows = batch.step([items[k] for k in chosen])
                logits = {planned[k][0]: row for k, row in zip(chosen, rows)}
            for i, exit in planned:
                generation = generations[i]
                row = logits[i] if i in logits else generation.sequence.logits(exit)
                answers[i].append(generation.emit(row).id)
                if generation.done:
                    running.remove(i)
                    if batch is not None:
                        batch.release(generation.sequence)
        return answers


def _until_end(tokens: list[int], stop: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def answer_nll(
    model: BalconyModel, prompts: list[list[int]], answers: list[list[int]], depths: list[int], batch_size: int = 16
) -> dict[int, list[float]]:
    """Per depth asked for (exits, or num_layers for the full model), the summed NLL (nats) of each answer's tokens
    after its prompt."""
    sums: dict[int, list[float]] = {d: [] for d in depths}
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = [p + a for p, a in zip(prompts[start : start + batch_size], answers[start : start + batch_size])]
        width = max(map(len, rows))
        # Padded on the right: a causal model's positions never see what follows them.
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
        hiddens = model(ids.to(device))
        for depth in depths:
            hidden = hiddens.final if depth == model.num_layers else hiddens.exits[depth]
            log_probs = F.log_softmax(model.head(hidden).float(), dim=-1)
            for r, (prompt, answer) in enumerate(
                zip(prompts[start : start + batch_size], answers[start : start + batch_size])
            ):
                if not answer:
                    sums[depth].append(0.0)
                    continue
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
                targets = torch.tensor(answer)
                sums[depth].append(-log_probs[r, positions, targets].sum().item())
    return sums


def _mean_per_token(nll: list[float], answers: list[list[int]]) -> float:
    tokens = sum(map(len, answers))
    return sum(nll) / tokens if tokens else math.nan


def answer_quality(
    model: BalconyModel,
    tokenizer,
    settings: AnswerSettings = AnswerSettings(),
    show_progress: bool = True,
    writer: ExportWriter | None = None,
) -> AnswerQuality:
    """Every depth's answers to the held-out prompts, judged by the full model (see the module's docstring); written
    by `model` itself in torch, or by an export's engine (`writer`, at the export's exits: a subset of the model's)."""
    model.eval()
    chosen: AnswerWriter | ExportWriter = writer or AnswerWriter(model, tokenizer)
    prompts = [prompt_ids(tokenizer, p, chat=True) for p in HELD_OUT_PROMPTS]
    depths = chosen.depths
    runs = [(None, None)] + [(settings.sampling, seed) for seed in range(settings.sampled_seeds)]
    written: dict[tuple[int, int | None], list[list[int]]] = {}
    with Progress(console=console, disable=not show_progress, transient=True) as progress:
        task = progress.add_task("held-out answers", total=len(depths) * len(runs) * len(prompts))
        for depth in depths:
            for sampling, seed in runs:
                answers: list[list[int]] = []
                for start in range(0, len(prompts), settings.batch_size):
                    batch = prompts[start : start + settings.batch_size]
                    answers += chosen.write(
                        depth, batch, settings.max_new_tokens, sampling, (seed or 0) * 1_000_003 + start
                    )
                    progress.advance(task, len(batch))
                written[depth, seed] = answers
    full = model.num_layers
    reverse = answer_nll(model, prompts, written[full, None], depths)
    results = []
    for depth in depths:
        figures = {}
        for label, seeds in (("", [None]), ("sampled_", list(range(settings.sampled_seeds)))):
            if not seeds:
                continue
            answers = [a for seed in seeds for a in written[depth, seed]]
            texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
            nll = [s for seed in seeds for s in answer_nll(model, prompts, written[depth, seed], [full])[full]]
            facts = [
                names_fact(texts[i * len(prompts) + j], word)
                for i in range(len(seeds))
                for j, (_, word) in enumerate(FACTS)
            ]
            figures[label + "judge_nll"] = _mean_per_token(nll, answers)
            figures[label + "loop_share"] = sum(in_loop(a, tokenizer.decode) for a in answers) / len(answers)
            figures[label + "mean_length"] = sum(map(len, answers)) / len(answers)
            figures[label + "facts_right"] = sum(facts) / len(facts)
        figures["reverse_nll"] = _mean_per_token(reverse[depth], written[full, None])
        results.append(DepthAnswers(depth=depth, relative_compute=model.exit_layers(depth) / full, **figures))
    texts = [
        {
            "prompt": p,
            **{
                ("full" if d == full else str(d)): tokenizer.decode(written[d, None][i], skip_special_tokens=True)
                for d in depths
            },
        }
        for i, p in enumerate(HELD_OUT_PROMPTS)
    ]
    return AnswerQuality(prompts=len(prompts), settings=settings, depths=results, answers=texts)
