"""A chat corpus written by the teacher itself: its answers to varied prompts, rendered in its chat template.

Balconies serve chat, so they should learn the full model on text that looks like its own chat turns, not only
on news. Each JSONL record holds the rendered conversation (`text`, what training reads), the prompt, the answer
and the generation settings, so that the file says how it was made.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from balcony_edge.common.atomic import atomic_path
from balcony_edge.base_model import DEFAULT_BASE, load_base_model
from balcony_edge.common.console import console, say
from balcony_edge.common.errors import DataError
from balcony_edge.precision import fast_bf16
from balcony_edge.prompts import chat_prompts


@dataclass(frozen=True)
class ChatCorpusConfig:
    """How the teacher's answers are generated (stored with every record)."""

    base: str = DEFAULT_BASE
    prompts: int = 1000
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 64
    seed: int = 0
    exclude: str | None = None  # a chat corpus (JSONL) whose prompts are not drawn again

    def __post_init__(self) -> None:
        for name in ("prompts", "max_new_tokens", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise DataError(f"--{name.replace('_', '-')} must be an integer of at least 1, not {getattr(self, name)!r}")
        if not 0 < self.temperature <= 10 or not 0 < self.top_p <= 1:
            raise DataError("--temperature must be in (0, 10] and --top-p in (0, 1]; give values in range")


def answered_prompts(path: Path) -> frozenset[str]:
    """The prompts a chat corpus already answers (its records' `prompt` fields)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read --exclude {path} ({err.strerror}); give a chat corpus written by `chat-data`") from None
    except UnicodeDecodeError:
        raise DataError(f"--exclude {path} is not UTF-8 text; give a chat corpus written by `chat-data`") from None
    prompts = set()
    for number, line in enumerate(lines, 1):
        try:
            prompts.add(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"--exclude {path} line {number} is not a chat-data record with a prompt; give a file written by `chat-data`") from None
    return frozenset(prompts)


def _conversation(system: str | None, prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def write_chat_corpus(config: ChatCorpusConfig, out: Path, max_minutes: float | None = None) -> int:
    """Generate answers batch by batch into `out` (JSONL, written whole at the end); returns the records written.

    With `max_minutes`, generation stops after the batch that crosses the limit and the file holds the batches done."""
    if out.suffix != ".jsonl":
        raise DataError(f"{out} must end in .jsonl; training reads chat corpora as JSONL")
    if not out.parent.is_dir():
        raise DataError(f"folder {out.parent} does not exist; create it or choose another --out")
    exclude = answered_prompts(Path(config.exclude)) if config.exclude else frozenset()
    base = load_base_model(config.base)
    tokenizer, model = base.tokenizer, base.model
    if not tokenizer.chat_template:
        raise DataError(f"base model {config.base!r} has no chat template; give a chat (instruct) model")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if fast_bf16(device) else torch.float32
    model = model.to(device=device, dtype=dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:  # some transformers versions convert the GGUF's tokenizer without one
        tokenizer.pad_token = tokenizer.eos_token  # (padding is masked out: any token will do)
    pairs = chat_prompts(config.prompts, config.seed, exclude)
    if not pairs:
        raise DataError(f"--exclude {config.exclude} answers every prompt there is; nothing is left to generate")
    rendered = [tokenizer.apply_chat_template(_conversation(s, p), tokenize=False, add_generation_prompt=True) for s, p in pairs]
    by_length = sorted(range(len(pairs)), key=lambda i: len(rendered[i]))  # similar lengths batch with little padding
    batches = [by_length[i : i + config.batch_size] for i in range(0, len(by_length), config.batch_size)]
    random.Random(config.seed).shuffle(batches)  # a --max-minutes stop keeps a mix of every kind of request
    settings = asdict(config) | {"dtype": str(dtype).removeprefix("torch."), "device": device.type}
    torch.manual_seed(config.seed)
    deadline = time.monotonic() + max_minutes * 60 if max_minutes else None
    written = 0
    progress = Progress(
        TextColumn("[bold]teacher answers"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with atomic_path(out) as partial, partial.open("w", encoding="utf-8") as file, progress:
        task = progress.add_task("generate", total=len(pairs))
        for batch in batches:
            encoded = tokenizer([rendered[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with torch.no_grad():
                output = model.generate(
                    **encoded,
                    max_new_tokens=config.max_new_tokens,
                    do_sample=True,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    pad_token_id=tokenizer.pad_token_id,
                )
            for row, i in enumerate(batch):
                answer = tokenizer.decode(output[row, encoded["input_ids"].shape[1] :], skip_special_tokens=True).strip()
                # the template closes the turn itself (a tokenizer's eos_token need not be the turn's end)
                turn = _conversation(*pairs[i]) + [{"role": "assistant", "content": answer}]
                record = {
                    "text": tokenizer.apply_chat_template(turn, tokenize=False),
                    "system": pairs[i][0],
                    "prompt": pairs[i][1],
                    "answer": answer,
                    "generation": settings,
                }
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
            progress.advance(task, len(batch))
            if deadline is not None and time.monotonic() >= deadline and written < len(pairs):
                say(f"--max-minutes {max_minutes} reached after {written} of {len(pairs)} prompts; the file holds those")
                break
    return written
