"""Reading a whole JSON Lines file, with one-line errors that name the file, the line and the fix (torch-free)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_JSONL_BYTES = 256 << 20  # a telemetry file, a trace or a prompt list; a larger one is refused unread


def read_jsonl(
    path: str | Path, what: str, record: str, fix: str, error: type[Exception], max_bytes: int = MAX_JSONL_BYTES
) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of `path`, a regular file of at most max_bytes (a FIFO nobody
    writes to, or /dev/zero, would block or fill the memory).

    what: how the user named the file ("telemetry", "--exclude"); record: what each line should be ("a JSON
    telemetry record"); fix: what to give instead; error: the exception raised, once, with all of that in a line."""
    path = Path(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is not a regular file (a folder, FIFO or device); {fix}")
        if info.st_size > max_bytes:
            raise error(f"{what} {path} has {info.st_size:,} bytes, more than {max_bytes:,}; {fix}")
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"cannot read {what} {path} ({err.strerror}); {fix}") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not UTF-8 text; {fix}") from None
    return parse_jsonl(text, f"{what} {path}", record, fix, error)


def parse_jsonl(text: str, where: str, record: str, fix: str, error: type[Exception]) -> list[tuple[int, Any]]:
    """(line number, value) of every non-blank line of decoded JSON Lines text; `where` names it in errors."""
    values = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise error(f"{where}:{number} is not {record} ({err.msg}); {fix}") from None
    return values
