"""Varied training text beside BBC news and the teacher's chat answers, from what a Python install ships, for
`balcony-edge train --data`:

- code: the standard library's top-level modules (Lib/*.py; PSF licence). The held-out code of
  scripts/unseen_texts.py comes from the json, email, http and logging packages, which are folders, so the two
  never share a file.
- readmes: the long descriptions (README text in dist-info METADATA) of installed packages whose licence
  metadata names MIT, BSD, Apache, ISC or the PSF licence, leaving out any that quotes licence text (the
  held-out legal kind stays unseen).

python scripts/training_texts.py --out data-extra    # writes data-extra/{code,readmes}.jsonl
"""

import argparse
import importlib.metadata
import sysconfig
from pathlib import Path

from balcony_edge.data import write_jsonl_kinds

PERMISSIVE = ("MIT", "BSD", "APACHE", "ISC", "PSF", "PYTHON SOFTWARE FOUNDATION")
MIN_README_CHARS = 2000
LICENCE_MARKERS = (
    "Permission is hereby granted",
    "Redistribution and use",
    "Licensed under the Apache",
    "WITHOUT WARRANTY",
)


def code() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]


def licence_of(metadata) -> str:
    fields = [metadata.get("License-Expression") or "", (metadata.get("License") or "")[:200]]
    fields += [c for c in metadata.get_all("Classifier") or [] if c.startswith("License ::")]
    return " ".join(fields).upper()


def readmes() -> list[str]:
    texts = {}
    for dist in importlib.metadata.distributions():
        metadata = dist.metadata
        body = metadata.get_payload() or metadata.get("Description") or ""
        quotes_licence = any(marker.upper() in body.upper() for marker in LICENCE_MARKERS)
        if (
            len(body) >= MIN_README_CHARS
            and not quotes_licence
            and any(name in licence_of(metadata) for name in PERMISSIVE)
        ):
            texts[body.strip()] = None  # a package installed twice once
    return sorted(texts)


parser = argparse.ArgumentParser()
parser.add_argument("--out", type=Path, required=True)
args = parser.parse_args()
print("\n".join(write_jsonl_kinds(args.out, {"code": code(), "readmes": readmes()})))
