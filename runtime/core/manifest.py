"""manifest.json: the contract between an export folder and the runtime, one dataclass with a schema version.

Torch-free on purpose (json, dataclasses, hashlib): the runtime reads everything it needs from here. The file is
untrusted: `Manifest.from_json` checks every field against its annotation and refuses impossible values.
"""

from __future__ import annotations

import functools
import json
import math
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from balcony_edge.common.errors import BalconyError, ManifestError
from balcony_edge.common.validation import is_finite_number
from balcony_edge.runtime.core.sampling import SamplingConfig

# 2: exits as chains of pieces; 3: measured answers per exit, recommended sampling; 4: pieces take each row's sequence
# lengths (SEQLENS_K, TOTAL_SEQUENCE_LENGTH) where 2 and 3 took attention_mask
SCHEMA_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)  # what 3 added all has defaults; the runtime feeds 2's and 3's pieces a mask
LENGTHS_VERSION = 4  # the first schema whose pieces take sequence lengths
MANIFEST_FILE = "manifest.json"
EXIT_CHECKPOINTS_LISTING = "balcony_exits.json"  # what `export --format hf|gguf` writes instead of a manifest
PLAIN_RUNNERS = {"hf": "transformers (or any Hugging Face runtime)", "gguf": "llama.cpp (or any GGUF runtime)"}
REPORT_FILE = "report.json"  # the export's verification report, beside the manifest
MAX_MANIFEST_BYTES = 64 << 20  # a real one is well under 1 MiB; a larger one is not read into memory
FIX = "export again (`balcony-edge export --force`)"

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
KV_DTYPES = {"fp32": "float32", "fp16": "float16"}  # manifest dtype -> numpy name of activations and KV cache
QUANTIZED_KV_DTYPE = "int8"  # a KV cache of int8 codes with calibrated per-channel scales (`export --kv-cache int8`)
WEIGHT_DTYPES = {"float32": 4, "float16": 2, "uint8": 1}  # numpy names the exporter writes -> bytes per element
# Keys of the free-form `base` and `quantization` records that the runtime and tools read.
_REQUIRED_KEYS = {"base": ("name", "source", "sha256"), "quantization": ("method",)}

# Graph I/O names (the optimum / onnxruntime-genai convention). {slot} is the layer index in a standard exit graph
# and the cache slot name (layer.3, balcony.8) in a piece; pieces pass hidden states as hidden_{depth} and exit_hidden.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
PAST_KEY = "past_key_values.{slot}.key"
PAST_VALUE = "past_key_values.{slot}.value"
PRESENT_KEY = "present.{slot}.key"
PRESENT_VALUE = "present.{slot}.value"
EXIT_HIDDEN = "exit_hidden"  # a piece's normed hidden states that the head reads
# GroupQueryAttention's own inputs, which a piece takes instead of attention_mask (a standard exit graph makes them
# once from its attention_mask): each row's tokens - 1 (int32 [batch]) and the longest row's (int32 scalar).
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"


def hidden_name(depth: int) -> str:
    """The residual stream after `depth` backbone layers, as a piece's input or output."""
    return f"hidden_{depth}"


def default_io_names() -> dict[str, str]:
    """The graph I/O names by role; `{slot}` stands for the layer index (standard graphs) or cache slot (pieces)."""
    return {
        "input_ids": INPUT_IDS,
        "attention_mask": ATTENTION_MASK,
        "logits": LOGITS,
        "past_key": PAST_KEY,
        "past_value": PAST_VALUE,
        "present_key": PRESENT_KEY,
        "present_value": PRESENT_VALUE,
    }


@dataclass(frozen=True)
class WeightEntry:
    """One tensor in the weights file: where it lies (bytes) and how to view those bytes."""

    offset: int
    length: int
    dtype: str  # numpy name: float32, float16, uint8 (packed quantised weights)
    shape: list[int]


@dataclass(frozen=True)
class Piece:
    """One graph of an exit's chain: a backbone segment (layers first_layer..end_layer-1; from layer 0 it reads token
    ids, else hidden states), a balcony (of exit first_layer: its layer and exit norm), or the head."""

    name: str
    kind: str  # segment, balcony or head
    graph: str  # .onnx file in the export folder
    first_layer: int
    end_layer: int
    cache_slots: list[str]  # names of Manifest.cache_slots this piece reads and writes, in layer order
    weights: list[str]  # the graph's initializers that live in the weights file (keys of Manifest.weights)


@dataclass(frozen=True)
class AnswerFigures:
    """How one depth's answers to the held-out chat prompts read (`balcony-edge eval --chat`): what the controller's
    quality floor is drawn from."""

    judge_nll: float  # nats per answer token under the full model (its own answers: the floor)
    loop_share: float  # answers caught in a repetition loop, 0..1
    facts_right: float  # factual prompts answered with the right word, 0..1
    mean_length: float  # answer tokens
    prompts: int
    measured_on: str  # what wrote the answers: "checkpoint (torch fp32)" or "this export"


@dataclass(frozen=True)
class ExitGraph:
    """One exit: exit k runs backbone layers 0..k-1, then balcony k (k = num_layers: the full model), then the head.

    The runtime drives `chain`, pieces shared with the other exits; `graph` is the same computation as one
    ordinary decoder graph (optimum / onnxruntime-genai I/O names) for other clients, beside its genai config, and
    the runtime's step graph on the CPU (packed_weights.py)."""

    exit: int  # backbone layers before the head
    graph: str  # the standard .onnx graph of this exit in the export folder
    num_layers: int  # decoder layers: exit + 1, or num_layers for the full model
    chain: list[str]  # names of the pieces that compute this exit, in order
    weights: list[str]  # initializers of `graph` that live in the weights file (keys of Manifest.weights)
    weight_bytes_per_token: int  # bytes of weights read to decode one token (embedding: one row)
    quality: float | None = None  # top-1 agreement with the full model's next token, 0..1 (full model: 1.0)
    answers: AnswerFigures | None = None  # greedy held-out answers (None: not measured)

    @property
    def is_full(self) -> bool:
        return self.num_layers == self.exit


@dataclass(frozen=True)
class KVShape:
    """Shape of one cache slot's keys and values: [batch, kv_heads, tokens, head_dim], in `dtype`."""

    num_kv_heads: int
    head_dim: int
    num_attention_heads: int
    hidden_size: int
    dtype: str  # numpy name: float32 or float16 (the activations'), or int8 (codes; scales are in the graphs)


@dataclass(frozen=True)
class GenerationDefaults:
    """Token ids and limits generation starts from."""

    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    context_length: int  # tokens (max_position_embeddings)
    sampling: dict[str, float] = field(default_factory=dict)  # the model's recommended settings (SamplingConfig names)
    sampling_source: str = ""  # where they come from (its generation_config.json, its authors' model card)


@dataclass
class Manifest:
    """Everything the runtime needs to drive an export folder, serialised as manifest.json."""

    base: dict  # name, model_type, num_layers, sha256, source of the base model
    num_layers: int  # decoder layers of the full model
    vocab_size: int
    dtype: str  # fp32 or fp16: weights, activations, logits and KV cache
    quantization: dict | None  # None, or method (int8 / int4), bits, block_size, accuracy_level, tool
    weights_file: str  # the one external-data file every graph points into
    weights: dict[str, WeightEntry]  # every tensor in weights_file, each stored once
    kv: KVShape
    cache_slots: list[str]  # slot names: layer.{i} shared by all exits, then balcony.{k} one per exit
    pieces: list[Piece]  # segments in depth order, balconies, the head
    exits: list[ExitGraph]  # ascending; the last is the full model
    generation: GenerationDefaults
    tokenizer_files: list[str]
    chat_template: str | None  # file name of the Jinja chat template, if the model has one
    io_names: dict[str, str] = field(default_factory=default_io_names)  # graph I/O names by role
    files: dict[str, str] = field(default_factory=dict)  # every file but manifest.json -> sha256
    schema_version: int = SCHEMA_VERSION

    def exit_graph(self, exit: int) -> ExitGraph:
        """The graph of exit `exit` (num_layers: the full model)."""
        for entry in self.exits:
            if entry.exit == exit:
                return entry
        raise ManifestError(
            f"exit {exit} is not in this export; exported exits: {', '.join(str(e.exit) for e in self.exits)}"
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse manifest.json, refusing any field of the wrong type or impossible value (unknown fields too:
        a writer that adds one must raise SCHEMA_VERSION)."""
        raw = _parse_json(text)
        version = raw.get("schema_version")
        if type(version) is not int or version not in READABLE_VERSIONS:
            raise ManifestError(
                f"manifest schema version {short_repr(version)} is not one this balcony-edge reads "
                f"({', '.join(map(str, READABLE_VERSIONS))}); export again with this version"
            )
        manifest = typing.cast(Manifest, _build(cls, raw, ""))  # a dataclass type builds an instance of it
        _check_values(manifest)
        return manifest

    @classmethod
    def load(cls, folder: Path | str) -> Manifest:
        """Read manifest.json of an export folder."""
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            listing = Path(folder) / EXIT_CHECKPOINTS_LISTING
            if listing.is_file():
                raise ManifestError(
                    f"{folder} holds {_plain_exits(listing)}; for chat and serve, export ONNX (`balcony-edge export`)"
                )
            raise ManifestError(f"{folder} has no {MANIFEST_FILE}; give a folder written by `balcony-edge export`")
        try:
            size = path.stat().st_size
            if size > MAX_MANIFEST_BYTES:
                raise ManifestError(
                    f"{path} has {size} bytes, more than a manifest can have ({MAX_MANIFEST_BYTES}); {FIX}"
                )
            return cls.from_json(path.read_bytes())
        except OSError as err:
            raise ManifestError(f"cannot read {path} ({err.strerror or err}); check its permissions") from None

    def named_files(self) -> list[str]:
        """Every file name this manifest gives, each once: graphs, weights, tokenizer files, chat template, checksummed
        files."""
        names = [piece.graph for piece in self.pieces] + [entry.graph for entry in self.exits]
        names += [self.weights_file, *self.tokenizer_files]
        names += [self.chat_template] if self.chat_template is not None else []
        return list(dict.fromkeys(names + list(self.files)))


def _plain_exits(listing: Path) -> str:
    """What a folder of plain exit checkpoints holds and what runs it, from its listing."""
    try:
        kind = json.loads(listing.read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        kind = None
    runner = PLAIN_RUNNERS.get(kind, "another runtime") if isinstance(kind, str) else "another runtime"
    return f"exits as plain {kind or ''} checkpoints (export --format {kind or 'hf|gguf'}), which {runner} runs"


def _parse_json(text: str | bytes) -> dict:
    """The JSON object in text, or a one-line ManifestError (invalid JSON or UTF-8, too deep, not an object)."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError, huge ints
        raise ManifestError(f"manifest is not valid JSON ({short_repr(str(err))}); {FIX}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"manifest is {short_repr(raw)}, not a JSON object; {FIX}")
    return raw


_KIND_NAMES = {
    int: "an int",
    float: "a number",
    str: "a string",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def _refuse(path: str, problem: str) -> ManifestError:
    return ManifestError(f"manifest field {path} {problem}; {FIX}")


def short_repr(value: object) -> str:
    """repr of a value read from an untrusted file: one line (repr escapes control characters), at most 100
    characters."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _kind(tp: type) -> type:
    """The Python type json.loads gives for a field annotated tp: dataclass -> dict, list[int] -> list."""
    return dict if is_dataclass(tp) else typing.get_origin(tp) or tp


def _is_kind(value: object, kind: type) -> bool:
    if kind is float:  # JSON has one number type; NaN, infinities and ints past the float range are refused
        return is_finite_number(value)
    return type(value) is kind  # not isinstance: True is no int here


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _build(tp: type, value: typing.Any, path: str) -> object:  # value: parsed JSON, checked here
    """value (parsed JSON) as an instance of the annotation tp, or a ManifestError naming the field at path."""
    nullable = typing.get_origin(tp) is types.UnionType  # X | None, the only union in the manifest
    if nullable:
        if value is None:
            return None
        (tp,) = [arg for arg in typing.get_args(tp) if arg is not type(None)]
    if not _is_kind(value, _kind(tp)):
        raise _refuse(path, f"is {short_repr(value)}, not {_KIND_NAMES[_kind(tp)]}{' or null' if nullable else ''}")
    if is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    args = typing.get_args(tp)
    if _kind(tp) is list:
        return [_build(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if _kind(tp) is dict and args:
        return {key: _build(args[1], item, f"{path}[{short_repr(key)}]") for key, item in value.items()}
    return float(value) if tp is float else value


def _build_dataclass(cls: type, raw: dict, path: str) -> object:
    types_ = _field_types(cls)
    prefix = f"{path}." if path else ""
    unknown = [key for key in raw if key not in types_]
    if unknown:
        raise _refuse(
            f"{path}[{short_repr(unknown[0])}]" if path else short_repr(unknown[0]),
            "is not part of this schema version",
        )
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise _refuse(prefix + missing[0], "is missing")
    return cls(**{name: _build(types_[name], value, prefix + name) for name, value in raw.items()})


def _check_values(manifest: Manifest) -> None:
    """Refuse values no export can have: negative sizes, unknown dtypes, exits out of order, dangling references."""
    _check_positive(manifest, ("num_layers", "vocab_size"), "")
    _check_positive(manifest.kv, ("num_kv_heads", "head_dim", "num_attention_heads", "hidden_size"), "kv.")
    _check_positive(manifest.generation, ("context_length",), "generation.")
    if manifest.dtype not in KV_DTYPES:
        raise _refuse("dtype", f"is {short_repr(manifest.dtype)}, not one of {', '.join(KV_DTYPES)}")
    if manifest.kv.dtype not in (KV_DTYPES[manifest.dtype], QUANTIZED_KV_DTYPE):
        raise _refuse(
            "kv.dtype",
            f"is {short_repr(manifest.kv.dtype)}, not {KV_DTYPES[manifest.dtype]} "
            f"(as dtype {manifest.dtype} needs) or {QUANTIZED_KV_DTYPE}",
        )
    for field_name, keys in _REQUIRED_KEYS.items():
        _check_keys(getattr(manifest, field_name), keys, field_name)
    for name, entry in manifest.weights.items():
        _check_weight(entry, f"weights[{short_repr(name)}]")
    _check_token_ids(manifest.generation, manifest.vocab_size)
    _check_sampling(manifest.generation.sampling)
    _check_against_weights(manifest)
    _check_exits(manifest)
    _check_files(manifest)


def _check_files(manifest: Manifest) -> None:
    """Every file the manifest names is a plain name in the folder (onnxruntime reads a graph's external data beside
    the graph, so a graph in a subfolder would read an unchecked weights file) and has a sha256 in `files`."""
    for name in manifest.named_files():
        if "/" in name or "\\" in name:
            raise _refuse(
                f"file {short_repr(name)}", "is not a plain file name; an export keeps every file at its top level"
            )
        if name not in manifest.files:
            raise _refuse("files", f"has no sha256 for {short_repr(name)}; every named file must have one")
    for name, digest in manifest.files.items():
        if not SHA256_HEX.fullmatch(digest):
            raise _refuse(f"files[{short_repr(name)}]", f"is {short_repr(digest)}, not a sha256 (64 hex digits)")


def _check_positive(record: object, names: tuple[str, ...], prefix: str) -> None:
    for name in names:
        if getattr(record, name) < 1:
            raise _refuse(prefix + name, f"is {getattr(record, name)}, not a positive int")


def _check_keys(record: dict | None, keys: tuple[str, ...], path: str) -> None:
    """The keys of a free-form record the runtime reads must be strings."""
    if record is None:
        return
    for key in keys:
        if type(record.get(key)) is not str:
            raise _refuse(f"{path}[{key!r}]", f"is {short_repr(record.get(key))}, not a string")


def _check_weight(entry: WeightEntry, path: str) -> None:
    if entry.dtype not in WEIGHT_DTYPES:
        raise _refuse(f"{path}.dtype", f"is {short_repr(entry.dtype)}, not one of {', '.join(WEIGHT_DTYPES)}")
    for name, value in (
        ("offset", entry.offset),
        ("length", entry.length),
        *((f"shape[{i}]", d) for i, d in enumerate(entry.shape)),
    ):
        if value < 0:
            raise _refuse(f"{path}.{name}", f"is {value}, not a size (>= 0)")
    expected = math.prod(entry.shape) * WEIGHT_DTYPES[entry.dtype]
    if entry.length != expected:
        raise _refuse(
            f"{path}.length", f"is {entry.length}, not {expected} bytes ({entry.dtype} of shape {entry.shape})"
        )


EMBEDDING = "base.model.embed_tokens.weight"
ROTARY_TABLE = "base.rotary.cos_cache"


def _check_against_weights(manifest: Manifest) -> None:
    """vocab_size is the embedding's rows and the context fits the rotary table, as the weights file describes them."""
    embedding, rotary = manifest.weights.get(EMBEDDING), manifest.weights.get(ROTARY_TABLE)
    if embedding is None or rotary is None:
        raise _refuse("weights", f"lacks {EMBEDDING if embedding is None else ROTARY_TABLE}, which every export has")
    if embedding.shape[:1] != [manifest.vocab_size]:
        raise _refuse("vocab_size", f"is {manifest.vocab_size}, not the embedding's {embedding.shape[:1]} rows")
    if manifest.generation.context_length > rotary.shape[0]:
        raise _refuse(
            "generation.context_length",
            f"is {manifest.generation.context_length}, more than the {rotary.shape[0]} positions the graphs hold",
        )


def _check_token_ids(generation: GenerationDefaults, vocab_size: int) -> None:
    ids: dict[str, int | None] = {f"generation.eos_token_ids[{i}]": t for i, t in enumerate(generation.eos_token_ids)}
    ids |= {"generation.bos_token_id": generation.bos_token_id, "generation.pad_token_id": generation.pad_token_id}
    for path, token in ids.items():
        if token is not None and not 0 <= token < vocab_size:
            raise _refuse(path, f"is {token}, not a token id below vocab_size {vocab_size}")


def _check_sampling(settings: dict[str, float]) -> None:
    try:
        SamplingConfig.of(settings)
    except BalconyError as err:
        raise _refuse("generation.sampling", f"is not usable ({err})") from None


PIECE_KINDS = ("segment", "balcony", "head")


def _check_exits(manifest: Manifest) -> None:
    """Pieces are well formed; exits ascend, the last is the full model, and each chain runs its layers in order."""
    pieces: dict[str, Piece] = {}
    for i, piece in enumerate(manifest.pieces):
        _check_piece(manifest, piece, f"pieces[{i}]", pieces)
        pieces[piece.name] = piece
    if not manifest.exits:
        raise _refuse("exits", "is empty, not a list ending with the full model")
    for i, entry in enumerate(manifest.exits):
        _check_exit_depth(manifest, i)
        _check_exit_references(manifest, entry, f"exits[{i}]")
        _check_chain(manifest, entry, pieces, f"exits[{i}].chain")


def _check_piece(manifest: Manifest, piece: Piece, path: str, earlier: dict) -> None:
    if piece.name in earlier:
        raise _refuse(f"{path}.name", f"is {short_repr(piece.name)}, the name of an earlier piece")
    if piece.kind not in PIECE_KINDS:
        raise _refuse(f"{path}.kind", f"is {short_repr(piece.kind)}, not one of {', '.join(PIECE_KINDS)}")
    if not 0 <= piece.first_layer <= piece.end_layer <= manifest.num_layers:
        raise _refuse(
            f"{path}.first_layer", f"is {piece.first_layer}, not a layer range within 0..{manifest.num_layers}"
        )
    slots = piece.end_layer - piece.first_layer if piece.kind == "segment" else 1 if piece.kind == "balcony" else 0
    if len(piece.cache_slots) != slots:
        raise _refuse(
            f"{path}.cache_slots", f"has {len(piece.cache_slots)} slots, not {slots} for a {piece.kind} of its layers"
        )
    for j, slot in enumerate(piece.cache_slots):
        if slot not in manifest.cache_slots:
            raise _refuse(f"{path}.cache_slots[{j}]", f"is {short_repr(slot)}, not one of cache_slots")
    for j, name in enumerate(piece.weights):
        if name not in manifest.weights:
            raise _refuse(f"{path}.weights[{j}]", f"is {short_repr(name)}, not a key of weights")


def _check_chain(manifest: Manifest, entry: ExitGraph, pieces: dict, path: str) -> None:
    """Segments from layer 0 up to the exit's depth without gap, then its balcony (none for the full model), then the
    head."""
    depth = 0
    for j, name in enumerate(entry.chain):
        piece = pieces.get(name)
        if piece is None:
            raise _refuse(f"{path}[{j}]", f"is {short_repr(name)}, not the name of a piece")
        last = j == len(entry.chain) - 1
        expected = "head" if last else "balcony" if depth == entry.exit else "segment"
        if piece.kind != expected or (piece.kind != "head" and piece.first_layer != depth):
            raise _refuse(f"{path}[{j}]", f"is {short_repr(name)}, not the {expected} that follows depth {depth}")
        if piece.kind == "segment":
            depth = piece.end_layer
        elif piece.kind == "balcony":
            depth = -1  # only the head may follow
    reached = depth == manifest.num_layers if entry.exit == manifest.num_layers else depth == -1
    if not reached:
        raise _refuse(path, f"stops before exit {entry.exit} (its segments, balcony and head)")


def _check_exit_depth(manifest: Manifest, i: int) -> None:
    entry, path = manifest.exits[i], f"exits[{i}]"
    last = i == len(manifest.exits) - 1
    if i and entry.exit <= manifest.exits[i - 1].exit:
        raise _refuse(f"{path}.exit", f"is {entry.exit}, not above the exit before it ({manifest.exits[i - 1].exit})")
    if not (entry.exit == manifest.num_layers if last else 1 <= entry.exit < manifest.num_layers):
        wanted = (
            f"num_layers ({manifest.num_layers}), the full model"
            if last
            else f"between 1 and {manifest.num_layers - 1}"
        )
        raise _refuse(f"{path}.exit", f"is {entry.exit}, not {wanted}")
    layers = manifest.num_layers if last else entry.exit + 1  # an exit graph runs its balcony as one more layer
    if entry.num_layers != layers:
        raise _refuse(f"{path}.num_layers", f"is {entry.num_layers}, not {layers} for exit {entry.exit}")


def _check_exit_references(manifest: Manifest, entry: ExitGraph, path: str) -> None:
    for j, name in enumerate(entry.weights):
        if name not in manifest.weights:
            raise _refuse(f"{path}.weights[{j}]", f"is {short_repr(name)}, not a key of weights")
    if entry.weight_bytes_per_token < 0:
        raise _refuse(f"{path}.weight_bytes_per_token", f"is {entry.weight_bytes_per_token}, not a size (>= 0)")
    if entry.quality is not None and not 0 <= entry.quality <= 1:
        raise _refuse(f"{path}.quality", f"is {entry.quality}, not between 0 and 1")
    if entry.answers is not None:
        for name in ("loop_share", "facts_right"):
            value = getattr(entry.answers, name)
            if not 0 <= value <= 1:
                raise _refuse(f"{path}.answers.{name}", f"is {value}, not between 0 and 1")
        _check_positive(entry.answers, ("prompts",), f"{path}.answers.")
        if not (math.isfinite(entry.answers.judge_nll) and entry.answers.judge_nll >= 0):
            raise _refuse(f"{path}.answers.judge_nll", f"is {entry.answers.judge_nll}, not a finite NLL of 0 or more")
