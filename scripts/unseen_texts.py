"""Held-out text of kinds the balconies never train on, from what every Python install ships, for
`balcony-edge eval --data`:

- docs: the Python language reference and library topics (pydoc_data.topics, PSF licence);
- code: Python source of the standard library (json, email, http, logging packages);
- legal: the licence texts that installed packages ship in their dist-info folders.

python scripts/unseen_texts.py --out eval-texts      # writes eval-texts/{docs,code,legal}.jsonl
"""

import argparse
import importlib.metadata
import sys
from pathlib import Path
from pydoc_data.topics import topics

from balcony_edge.data import write_jsonl_kinds

CODE_PACKAGES = ("json", "email", "http", "logging")


def docs() -> list[str]:
    return [topics[name] for name in sorted(topics)]


def code() -> list[str]:
    root = Path(sys.modules["json"].__file__).parent.parent
    return [p.read_text(encoding="utf-8") for package in CODE_PACKAGES for p in sorted((root / package).glob("*.py"))]


def legal() -> list[str]:
    texts = {}
    for dist in importlib.metadata.distributions():
        for file in dist.files or []:
            name = file.name.upper()
            if name.startswith(("LICENSE", "LICENCE", "COPYING")) and file.suffix in ("", ".txt", ".md", ".rst"):
                path = Path(file.locate())
                text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None
                if text and len(text) > 500:
                    texts[text.strip()] = None  # the same licence text once
    return sorted(texts)


parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
args = parser.parse_args()
print("\n".join(write_jsonl_kinds(args.out, {"docs": docs(), "code": code(), "legal": legal()})))
