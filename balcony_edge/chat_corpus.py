"""A chat corpus written by the teacher itself: its answers to varied prompts, rendered in its chat template.

Balconies serve chat, so they should learn the full model on text that looks like its own chat turns, not only
on news. Each JSONL record holds the rendered conversation (`text`, what training reads), the prompt, the answer
and the generation settings, so that the file says how it was made.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from balcony_edge.common.errors import DataError
from balcony_edge.common.jsonl import read_jsonl
from balcony_edge.prompts import chat_prompts
from balcony_edge.teacher_sampling import Teacher, TeacherConfig, check_out, write_samples


@dataclass(frozen=True)
class ChatCorpusConfig(TeacherConfig):
    """How the teacher's answers are generated (stored with every record)."""

    prompts: int = 1000
    exclude: str | None = None  # a chat corpus (JSONL) whose prompts are not drawn again


def answered_prompts(path: Path) -> frozenset[str]:
    """The prompts a chat corpus already answers (its records' `prompt` fields)."""
    fix = "give a chat corpus written by `chat-data`"
    prompts = set()
    for number, record in read_jsonl(path, "--exclude", "a chat-data record", fix, DataError):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f"--exclude {path}:{number} is not a chat-data record with a prompt; {fix}")
        prompts.add(record["prompt"])
    return frozenset(prompts)


def _conversation(system: str | None, prompt: str) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def write_chat_corpus(config: ChatCorpusConfig, out: Path, max_minutes: float | None = None) -> int:
    """Generate answers batch by batch into `out` (JSONL, written whole at the end); returns the records written.

    With `max_minutes`, generation stops after the batch that crosses the limit and the file holds the batches done."""
    check_out(out, max_minutes)
    exclude = answered_prompts(Path(config.exclude)) if config.exclude else frozenset()
    teacher = Teacher.load(config.base)
    if not teacher.tokenizer.chat_template:
        raise DataError(f"base model {config.base!r} has no chat template; give a chat (instruct) model")
    pairs = chat_prompts(config.prompts, config.seed, exclude)
    if not pairs:
        raise DataError(f"--exclude {config.exclude} answers every prompt there is; nothing is left to generate")
    rendered = [  # tokenize=False: the text
        cast(
            str, teacher.tokenizer.apply_chat_template(_conversation(s, p), tokenize=False, add_generation_prompt=True)
        )
        for s, p in pairs
    ]
    by_length = sorted(range(len(pairs)), key=lambda i: len(rendered[i]))  # similar lengths batch with little padding
    batches = [by_length[i : i + config.batch_size] for i in range(0, len(by_length), config.batch_size)]
    random.Random(config.seed).shuffle(batches)  # a --max-minutes stop keeps a mix of every kind of request
    settings = teacher.settings(config)

    def record(i: int, sample: str) -> dict:
        answer = sample.strip()
        # the template closes the turn itself (a tokenizer's eos_token need not be the turn's end)
        turn = _conversation(*pairs[i]) + [{"role": "assistant", "content": answer}]
        text = teacher.tokenizer.apply_chat_template(turn, tokenize=False)
        return {"text": text, "system": pairs[i][0], "prompt": pairs[i][1], "answer": answer, "generation": settings}

    return write_samples(out, teacher, rendered, batches, config, record, "teacher answers", max_minutes)
