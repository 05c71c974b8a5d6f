"""A free-text corpus written by the teacher: what the model writes from a bare document start, at temperature 1.

Chat answers cover what users ask; free text covers the rest of what the model knows (web pages, code, lists,
stories, law), each kind as often as the model itself writes it. Distilling on the model's own text teaches the
balconies the model where it actually goes, without choosing kinds of text by hand. Each JSONL record holds the
sample (`text`, what training reads) and the generation settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from balcony_edge.common.errors import DataError
from balcony_edge.teacher_sampling import Teacher, TeacherConfig, check_out, write_samples

DOCUMENT_START = "<|endoftext|>"  # the document separator of GPT-2-style vocabularies (SmolLM2's among them)


@dataclass(frozen=True)
class FreeTextConfig(TeacherConfig):
    """How the teacher's free text is sampled (stored with every record)."""

    max_new_tokens: int = 512
    temperature: float = 1.0  # the model's own distribution
    top_p: float = 0.95
    samples: int = 1000
    start: str | None = None  # the text every sample starts from; default: the vocabulary's document start

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start is not None and not self.start.strip():
            raise DataError("--start is empty; give the text every sample starts from, or leave it out")


def document_start(tokenizer) -> str:
    """`<|endoftext|>` where the vocabulary has it, else its beginning-of-sequence token."""
    if DOCUMENT_START in tokenizer.get_vocab():
        return DOCUMENT_START
    if tokenizer.bos_token:
        return tokenizer.bos_token
    raise DataError(
        "the base model's tokenizer has neither <|endoftext|> nor a beginning-of-sequence token; give --start"
    )


def write_free_text(config: FreeTextConfig, out: Path, max_minutes: float | None = None) -> int:
    """Sample `config.samples` texts into `out` (JSONL, written whole at the end); returns the records written.

    A sample ends where the model ends the document (its end token, or the start token again when the start is a
    special token such as `<|endoftext|>`); a start that is plain text begins each record's text. Empty samples
    are dropped. With `max_minutes`, sampling stops after the batch that crosses the limit and the file holds the
    batches done."""
    check_out(out, max_minutes)
    teacher = Teacher.load(config.base)
    start = config.start if config.start is not None else document_start(teacher.tokenizer)
    special = start in teacher.tokenizer.all_special_tokens
    stops = (cast(int, teacher.tokenizer.convert_tokens_to_ids(start)),) if special else ()  # one token: one id
    settings = teacher.settings(config) | {"start": start}
    order = list(range(config.samples))
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]

    def record(_: int, text: str) -> dict | None:
        text = (text if special else start + text).strip()
        return {"text": text, "generation": settings} if text else None

    return write_samples(
        out, teacher, [start] * config.samples, batches, config, record, "teacher free text", max_minutes, stops
    )
