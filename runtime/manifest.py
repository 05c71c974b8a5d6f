"""manifest.json: the contract between an export folder and the runtime, one dataclass with a schema version.

Torch-free on purpose (json, dataclasses, hashlib): the runtime reads everything it needs from here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checksums import file_sha256
from ..errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
REPORT_FILE = "report.json"  # the export's verification report, beside the manifest

# Graph I/O names (the optimum / onnxruntime-genai convention); {i} is the layer index inside one graph.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.{i}.key"
PAST_VALUE = "past_key_values.{i}.value"
PRESENT_KEY = "present.{i}.key"
PRESENT_VALUE = "present.{i}.value"


def default_io_names() -> dict[str, str]:
    """The graph I/O names by role; `{i}` stands for the layer index inside one graph."""
    return {
        "input_ids": INPUT_IDS,
        "attention_mask": ATTENTION_MASK,
        "position_ids": POSITION_IDS,
        "logits": LOGITS,
        "past_key": PAST_KEY,
        "past_value": PAST_VALUE,
        "present_key": PRESENT_KEY,
        "present_value": PRESENT_VALUE,
    }


def graph_input_names(num_layers: int) -> list[str]:
    """Input names of a graph with num_layers decoder layers, in order."""
    past = [name.format(i=i) for i in range(num_layers) for name in (PAST_KEY, PAST_VALUE)]
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past]


def graph_output_names(num_layers: int) -> list[str]:
    """Output names of a graph with num_layers decoder layers, in order."""
    present = [name.format(i=i) for i in range(num_layers) for name in (PRESENT_KEY, PRESENT_VALUE)]
    return [LOGITS, *present]


@dataclass(frozen=True)
class WeightEntry:
    """One tensor in the weights file: where it lies (bytes) and how to view those bytes."""

    offset: int
    length: int
    dtype: str  # numpy name: float32, float16, uint8 (packed quantised weights)
    shape: list[int]


@dataclass(frozen=True)
class ExitGraph:
    """One exit's graph: exit k runs backbone layers 0..k-1, then balcony k (k = num_layers: the full model)."""

    exit: int  # backbone layers before the head
    graph: str  # .onnx file in the export folder
    num_layers: int  # decoder layers in the graph: exit + 1, or num_layers for the full model
    cache_slots: list[int]  # graph layer i reads and writes KV-cache slot cache_slots[i]
    weights: list[str]  # the graph's initializers that live in the weights file (keys of Manifest.weights)
    weight_bytes_per_token: int  # bytes of weights read to decode one token (embedding: one row)
    quality: float | None = None  # top-1 agreement with the full model's next token, 0..1 (full model: 1.0)

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
    dtype: str  # numpy name: float32 or float16


@dataclass(frozen=True)
class GenerationDefaults:
    """Token ids and limits generation starts from."""

    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int | None
    context_length: int  # tokens (max_position_embeddings)


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
        raise ManifestError(f"exit {exit} is not in this export; exported exits: {', '.join(str(e.exit) for e in self.exits)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            raw = json.loads(text)
            version = raw.get("schema_version")
            if version != SCHEMA_VERSION:
                raise ManifestError(
                    f"manifest schema version {version!r} is not {SCHEMA_VERSION}, the one this balcony-edge reads; "
                    "export again with this version"
                )
            return cls(
                **{
                    **raw,
                    "kv": KVShape(**raw["kv"]),
                    "weights": {name: WeightEntry(**entry) for name, entry in raw["weights"].items()},
                    "exits": [ExitGraph(**entry) for entry in raw["exits"]],
                    "generation": GenerationDefaults(**raw["generation"]),
                }
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ManifestError(f"manifest is malformed ({err!r}); export the model again") from None

    @classmethod
    def load(cls, folder: Path | str) -> Manifest:
        """Read manifest.json of an export folder."""
        path = Path(folder) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{folder} has no {MANIFEST_FILE}; give a folder written by `balcony-edge export`")
        return cls.from_json(path.read_text())


def checksum_failures(folder: Path | str, manifest: Manifest) -> dict[str, str]:
    """Files of the export that do not match the manifest -> why (missing, sha256 differs); empty when all match."""
    folder = Path(folder)
    failures = {}
    for name, expected in sorted(manifest.files.items()):
        path = folder / name
        if not path.is_file():
            failures[name] = "missing"
        elif file_sha256(path) != expected:
            failures[name] = "sha256 differs"
    return failures
