"""The teacher writing text: batched sampling from the base model into a JSONL corpus, one record per sample.

Shared by the chat corpus (answers to prompts) and the free-text corpus (the model's own text from a bare start):
the base model on the GPU when torch sees one (bf16 where it is fast), left padding, a rich progress bar, a
--max-minutes stop after the batch that crosses it, and the file written whole at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from balcony_edge.base_model import DEFAULT_BASE, load_base_model
from balcony_edge.common.atomic import atomic_path
from balcony_edge.common.console import console, say
from balcony_edge.common.errors import DataError
from balcony_edge.common.paths import check_output_folder
from balcony_edge.precision import fast_bf16

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from balcony_edge.base_model import CausalLM


def check_out(out: Path, max_minutes: float | None) -> None:
    """A teacher corpus goes to a .jsonl file in a folder that exists, within a positive time limit if any (checked
    before the model loads)."""
    if max_minutes is not None and not (math.isfinite(max_minutes) and max_minutes > 0):
        raise DataError(f"--max-minutes must be a positive number, not {max_minutes}; leave it out for no limit")
    if out.suffix != ".jsonl":
        raise DataError(f"{out} must end in .jsonl; training reads teacher corpora as JSONL")
    check_output_folder(out, "--out", DataError)


@dataclass(frozen=True)
class TeacherConfig:
    """What every teacher corpus records of how it was sampled; each kind of corpus adds its own fields."""

    base: str = DEFAULT_BASE
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            least = 0 if field.name == "seed" else 1
            if field.type in ("int", int) and not (type(value) is int and value >= least):
                raise DataError(
                    f"--{field.name.replace('_', '-')} must be an integer of at least {least}, not {value!r}"
                )
        if not 0 < self.temperature <= 10:
            raise DataError(
                f"--temperature must be in (0, 10], not {self.temperature}; 1 samples the model's own distribution"
            )
        if not 0 < self.top_p <= 1:
            raise DataError(f"--top-p must be in (0, 1], not {self.top_p}; 1 keeps every token")


@dataclass
class Teacher:
    """The base model ready to sample: its tokenizer padded on the left, on the fastest device and dtype here."""

    tokenizer: PreTrainedTokenizerBase
    model: CausalLM
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, base: str) -> Teacher:
        loaded = load_base_model(base)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if fast_bf16(device) else torch.float32
        tokenizer = loaded.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:  # some transformers versions convert the GGUF's tokenizer without one
            tokenizer.pad_token = tokenizer.eos_token  # (padding is masked out: any token will do)
        # typeshed's functools.wraps does not bind self, and transformers wraps PreTrainedModel.to with it
        return cls(tokenizer, loaded.model.to(device=device, dtype=dtype), device, dtype)  # type: ignore[call-arg]

    def settings(self, config: TeacherConfig) -> dict:
        """What a record stores of how it was made: the config, the dtype and the device."""
        return asdict(config) | {"dtype": str(self.dtype).removeprefix("torch."), "device": self.device.type}

    def sample(self, inputs: list[str], config: TeacherConfig, stops: tuple[int, ...] = ()) -> list[str]:
        """One batch: what the model writes after each input, up to its end token or one of `stops`, special
        tokens dropped (not stripped: a continuation keeps its leading space)."""
        encoded = self.tokenizer(inputs, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        configured = self.model.generation_config.eos_token_id  # an int, a list or None
        ends = {
            self.tokenizer.eos_token_id,
            *stops,
            *(configured if isinstance(configured, list) else [configured]),
        } - {None}
        with torch.no_grad():
            output = self.model.generate(
                **encoded,
                max_new_tokens=config.max_new_tokens,
                do_sample=True,
                temperature=config.temperature,
                top_p=config.top_p,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=sorted(ends),
            )
        start = encoded["input_ids"].shape[1]
        # one row of ids decodes to one string
        return [cast(str, self.tokenizer.decode(row[start:], skip_special_tokens=True)) for row in output]


def write_samples(
    out: Path,
    teacher: Teacher,
    inputs: list[str],
    batches: list[list[int]],
    config: TeacherConfig,
    record: Callable[[int, str], dict | None],
    label: str,
    max_minutes: float | None = None,
    stops: tuple[int, ...] = (),
) -> int:
    """Sample `inputs` batch by batch into `out` (JSONL, written whole at the end; `check_out` it before loading
    the teacher); returns the records written. Seeded with `config.seed`.

    `record(i, text)` turns input i's sample into a record, or None to drop it. With `max_minutes`, sampling stops
    after the batch that crosses the limit and the file holds the batches done."""
    torch.manual_seed(config.seed)
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    written = done = 0
    progress = Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with atomic_path(out) as partial, partial.open("w", encoding="utf-8") as file, progress:
        task = progress.add_task("generate", total=len(inputs))
        for batch in batches:
            for i, text in zip(batch, teacher.sample([inputs[i] for i in batch], config, stops)):
                if (line := record(i, text)) is not None:
                    file.write(json.dumps(line, ensure_ascii=False) + "\n")
                    written += 1
            done += len(batch)
            progress.advance(task, len(batch))
            if deadline is not None and time.monotonic() >= deadline and done < len(inputs):
                say(f"--max-minutes {max_minutes} reached after {done} of {len(inputs)} samples; the file holds those")
                break
    return written
