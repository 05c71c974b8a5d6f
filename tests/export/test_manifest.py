"""The manifest: the export folder's contract with the runtime (torch-free)."""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balcony_edge.common.errors import ManifestError
from balcony_edge.runtime.core import manifest as manifest_module
from balcony_edge.runtime.core.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    ExitGraph,
    GenerationDefaults,
    KVShape,
    Manifest,
    Piece,
    WeightEntry,
)


def _segment(start: int, end: int) -> Piece:
    return Piece(
        f"layers_{start}_{end - 1}",
        "segment",
        f"layers_{start}_{end - 1}.onnx",
        start,
        end,
        [f"layer.{i}" for i in range(start, end)],
        [],
    )


PIECES = [
    _segment(0, 8),
    _segment(8, 16),
    _segment(16, 30),
    Piece("balcony_8", "balcony", "balcony_8.onnx", 8, 8, ["balcony.8"], ["norms.8.weight"]),
    Piece("balcony_16", "balcony", "balcony_16.onnx", 16, 16, ["balcony.16"], []),
    Piece("head", "head", "head.onnx", 30, 30, [], ["base.model.embed_tokens.weight"]),
]


def _manifest(files: dict[str, str] | None = None) -> Manifest:
    """A SmolLM2-like manifest; every file it names has a sha256, `files` adds or overrides some."""
    manifest = Manifest(
        base={"name": "smollm2", "model_type": "llama", "num_layers": 30, "sha256": "ab" * 32, "source": "smollm2"},
        num_layers=30,
        vocab_size=49152,
        dtype="fp32",
        quantization=None,
        weights_file="weights.bin",
        weights={
            "base.model.embed_tokens.weight": WeightEntry(
                offset=0, length=113246208, dtype="float32", shape=[49152, 576]
            ),
            "norms.8.weight": WeightEntry(offset=113246208, length=2304, dtype="float32", shape=[576]),
            "base.rotary.cos_cache": WeightEntry(offset=113250304, length=1048576, dtype="float32", shape=[8192, 32]),
        },
        kv=KVShape(num_kv_heads=3, head_dim=64, num_attention_heads=9, hidden_size=576, dtype="float32"),
        cache_slots=[f"layer.{i}" for i in range(30)] + ["balcony.8", "balcony.16"],
        pieces=PIECES,
        exits=[
            ExitGraph(
                8,
                "exit_8.onnx",
                9,
                ["layers_0_7", "balcony_8", "head"],
                ["norms.8.weight"],
                weight_bytes_per_token=1,
                quality=0.39,
            ),
            ExitGraph(
                16,
                "exit_16.onnx",
                17,
                ["layers_0_7", "layers_8_15", "balcony_16", "head"],
                [],
                weight_bytes_per_token=2,
                quality=0.46,
            ),
            ExitGraph(
                30,
                "full.onnx",
                30,
                ["layers_0_7", "layers_8_15", "layers_16_29", "head"],
                [],
                weight_bytes_per_token=3,
                quality=1.0,
            ),
        ],
        generation=GenerationDefaults(eos_token_ids=[2], bos_token_id=1, pad_token_id=2, context_length=8192),
        tokenizer_files=["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
        chat_template="chat_template.jinja",
    )
    manifest.files = {**{name: "00" * 32 for name in manifest.named_files()}, **(files or {})}
    return manifest


def test_manifest_round_trips_through_json():
    manifest = _manifest({"weights.bin": "00" * 32})
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.exit_graph(16).chain[-2] == "balcony_16" and again.pieces[2].cache_slots[-1] == "layer.29"
    assert again.weights["norms.8.weight"] == WeightEntry(113246208, 2304, "float32", [576])
    assert again.exit_graph(30).is_full and not again.exit_graph(8).is_full
    assert json.loads(manifest.to_json())["schema_version"] == SCHEMA_VERSION


def test_unknown_exit_names_the_exported_ones():
    with pytest.raises(ManifestError, match="exit 12 is not in this export; exported exits: 8, 16, 30"):
        _manifest().exit_graph(12)


def test_other_schema_version_is_refused_with_the_fix():
    raw = json.loads(_manifest().to_json())
    raw["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ManifestError, match="export again"):
        Manifest.from_json(json.dumps(raw))


def _raw() -> dict:
    return json.loads(_manifest({"weights.bin": "00" * 32}).to_json())


def _refusal(raw: dict | str | bytes) -> str:
    """The one-line message from_json refuses raw (a JSON tree, or the text itself) with."""
    with pytest.raises(ManifestError) as error:
        Manifest.from_json(raw if isinstance(raw, (str, bytes)) else json.dumps(raw))
    assert "\n" not in str(error.value) and str(error.value).endswith("export again (`balcony-edge export --force`)")
    return str(error.value)


def test_an_int8_cache_is_accepted_beside_either_float_dtype():
    for dtype in ("fp32", "fp16"):
        raw = _raw()
        raw["dtype"], raw["kv"]["dtype"] = dtype, "int8"
        assert Manifest.from_json(json.dumps(raw)).kv.dtype == "int8"


def _set(raw: dict, path: tuple, value) -> dict:
    """raw with the field at path (keys and list indices) set to value; deleted when value is _DELETE."""
    *parents, last = path
    for key in parents:
        raw = raw[key]
    if value is _DELETE:
        del raw[last]
    else:
        raw[last] = value
    return raw


_DELETE = object()
EMBED = "base.model.embed_tokens.weight"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("exits", 1, "chain", 0), 3, "field exits[1].chain[0] is 3, not a string"),
        (("pieces", 0, "first_layer"), "0", "field pieces[0].first_layer is '0', not an int"),
        (("num_layers",), True, "field num_layers is True, not an int"),
        (("num_layers",), 30.0, "field num_layers is 30.0, not an int"),
        (("vocab_size",), None, "field vocab_size is None, not an int"),
        (("kv",), [3, 64], "field kv is [3, 64], not an object"),
        (("kv", "dtype"), 4, "field kv.dtype is 4, not a string"),
        (("io_names", "logits"), 7, "field io_names['logits'] is 7, not a string"),
        (("weights", EMBED, "shape"), "49152x576", f"field weights['{EMBED}'].shape is '49152x576', not a list"),
        (("exits", 0, "quality"), "high", "field exits[0].quality is 'high', not a number or null"),
        (("exits", 0, "quality"), float("nan"), "field exits[0].quality is nan, not a number or null"),
        (("generation", "bos_token_id"), "1", "field generation.bos_token_id is '1', not an int or null"),
        (("chat_template",), ["a"], "field chat_template is ['a'], not a string or null"),
        (("files", "weights.bin"), None, "field files['weights.bin'] is None, not a string"),
        (("quantization",), "int4", "field quantization is 'int4', not an object or null"),
        (("kv",), _DELETE, "field kv is missing"),
        (("kv", "junk"), 1, "field kv['junk'] is not part of this schema version"),
        (("junk\n[/red]",), 1, "field 'junk\\n[/red]' is not part of this schema version"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_with_its_path(path, value, message):
    raw = _raw()
    _set(raw, path, value)
    assert message in _refusal(raw)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("weights", EMBED, "offset"), -1, f"field weights['{EMBED}'].offset is -1, not a size"),
        (("weights", EMBED, "shape", 0), -3, f"field weights['{EMBED}'].shape[0] is -3, not a size"),
        (
            ("weights", EMBED, "length"),
            4,
            f"field weights['{EMBED}'].length is 4, not 113246208 bytes (float32 of shape [49152, 576])",
        ),
        (
            ("weights", EMBED, "dtype"),
            "object",
            f"field weights['{EMBED}'].dtype is 'object', not one of float32, float16, uint8",
        ),
        (("exits", 1, "exit"), 4, "field exits[1].exit is 4, not above the exit before it (8)"),
        (("exits", 2, "exit"), 29, "field exits[2].exit is 29, not num_layers (30), the full model"),
        (("exits", 0, "exit"), 0, "field exits[0].exit is 0, not between 1 and 29"),
        (("exits", 1, "num_layers"), 16, "field exits[1].num_layers is 16, not 17 for exit 16"),
        (
            ("pieces", 1, "cache_slots"),
            ["layer.8"],
            "field pieces[1].cache_slots has 1 slots, not 8 for a segment of its layers",
        ),
        (
            ("pieces", 1, "cache_slots", 7),
            "layer.31",
            "field pieces[1].cache_slots[7] is 'layer.31', not one of cache_slots",
        ),
        (("pieces", 1, "kind"), "tail", "field pieces[1].kind is 'tail', not one of segment, balcony, head"),
        (("pieces", 1, "name"), "layers_0_7", "field pieces[1].name is 'layers_0_7', the name of an earlier piece"),
        (("pieces", 1, "end_layer"), 31, "field pieces[1].first_layer is 8, not a layer range within 0..30"),
        (
            ("pieces", 3, "weights", 0),
            "norms.9.weight",
            "field pieces[3].weights[0] is 'norms.9.weight', not a key of weights",
        ),
        (
            ("exits", 1, "chain", 1),
            "layers_16_29",
            "field exits[1].chain[1] is 'layers_16_29', not the segment that follows depth 8",
        ),
        (
            ("exits", 1, "chain", 2),
            "balcony_8",
            "field exits[1].chain[2] is 'balcony_8', not the balcony that follows depth 16",
        ),
        (("exits", 1, "chain", 3), "nowhere", "field exits[1].chain[3] is 'nowhere', not the name of a piece"),
        (("exits", 0, "chain"), ["layers_0_7", "head"], "field exits[0].chain stops before exit 8"),
        (("exits", 2, "chain"), ["layers_0_7", "layers_8_15", "head"], "field exits[2].chain stops before exit 30"),
        (
            ("exits", 0, "weights", 0),
            "norms.9.weight",
            "field exits[0].weights[0] is 'norms.9.weight', not a key of weights",
        ),
        (("exits", 0, "quality"), 1.5, "field exits[0].quality is 1.5, not between 0 and 1"),
        (("exits", 0, "weight_bytes_per_token"), -1, "field exits[0].weight_bytes_per_token is -1, not a size"),
        (("exits",), [], "field exits is empty"),
        (("generation", "context_length"), 0, "field generation.context_length is 0, not a positive int"),
        (
            ("generation", "context_length"),
            10**12,
            "field generation.context_length is 1000000000000, more than the 8192 positions",
        ),
        (("vocab_size",), 5, "field vocab_size is 5, not the embedding's [49152] rows"),
        (("vocab_size",), 10**40, "field vocab_size is 10000000000000000000000000000000000000000, not the embedding's"),
        (
            ("generation", "eos_token_ids", 0),
            49152,
            "field generation.eos_token_ids[0] is 49152, not a token id below vocab_size 49152",
        ),
        (("generation", "pad_token_id"), -2, "field generation.pad_token_id is -2, not a token id"),
        (("kv", "head_dim"), 0, "field kv.head_dim is 0, not a positive int"),
        (("kv", "dtype"), "float16", "field kv.dtype is 'float16', not float32 (as dtype fp32 needs) or int8"),
        (("dtype",), "bf16", "field dtype is 'bf16', not one of fp32, fp16"),
        (("base", "name"), 3, "field base['name'] is 3, not a string"),
        (("quantization",), {"bits": 4}, "field quantization['method'] is None, not a string"),
    ],
)
def test_an_impossible_value_is_refused_with_its_path(path, value, message):
    raw = _raw()
    _set(raw, path, value)
    assert message in _refusal(raw)


@pytest.mark.parametrize("version", ["1", True, 1.0, None])
def test_a_schema_version_that_is_not_an_int_is_refused(version):
    raw = _raw()
    raw["schema_version"] = version
    with pytest.raises(
        ManifestError, match=f"manifest schema version {re.escape(repr(version))} is not one this balcony-edge reads"
    ):
        Manifest.from_json(json.dumps(raw))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "manifest is not valid JSON"),
        ('{"schema_version": 1', "manifest is not valid JSON"),
        (b'{"a": "\xff\xfe"}', "manifest is not valid JSON"),
        ("[" * 100_000, "manifest is not valid JSON"),
        ("1" * 5000, "manifest is not valid JSON"),
        ("[1, 2]", "manifest is [1, 2], not a JSON object"),
    ],
)
def test_text_that_is_no_json_object_is_refused_in_one_line(text, message):
    assert message in _refusal(text)


def test_load_refuses_an_invalid_utf8_file_and_an_oversized_one(tmp_path, monkeypatch):
    (tmp_path / MANIFEST_FILE).write_bytes(b'{"schema_version": 1, "base": "\xc3\x28"}')
    with pytest.raises(ManifestError, match="manifest is not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(_manifest().to_json())
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 1024)
    with pytest.raises(ManifestError, match=r"manifest.json has \d+ bytes, more than a manifest can have \(1024\)"):
        Manifest.load(tmp_path)


def test_quality_written_as_an_int_is_read_as_a_float():
    raw = _raw()
    raw["exits"][2]["quality"] = 1
    quality = Manifest.from_json(json.dumps(raw)).exits[2].quality
    assert quality == 1.0 and type(quality) is float


def test_named_files_lists_every_file_once_in_order():
    manifest = _manifest({"weights.bin": "00" * 32, "report.json": "11" * 32})
    assert manifest.named_files() == [
        "layers_0_7.onnx",
        "layers_8_15.onnx",
        "layers_16_29.onnx",
        "balcony_8.onnx",
        "balcony_16.onnx",
        "head.onnx",
        "exit_8.onnx",
        "exit_16.onnx",
        "full.onnx",
        "weights.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "report.json",
    ]


def test_load_names_a_folder_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match=f"has no {MANIFEST_FILE}"):
        Manifest.load(tmp_path)


# --- fuzzing: from_json returns a well-typed manifest or raises ManifestError, nothing else ----------------

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
# Half scalars, so that many mutations keep the JSON kind of a field and reach the value checks.


def json_containers(children):
    return st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)


JSON_VALUES = SCALARS | st.recursive(SCALARS, json_containers, max_leaves=8)


def _paths(tree, prefix: tuple = ()) -> list[tuple]:
    """The path of every value inside a JSON tree (keys and list indices), parents before children."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    return [path for key, child in items for path in [(*prefix, key), *_paths(child, (*prefix, key))]]


VALID = _raw()
VALID_PATHS = _paths(VALID)
VALID_BYTES = json.dumps(VALID).encode()
# Bytes of a valid manifest with a few overwritten anywhere (broken UTF-8, broken JSON, changed digits), or random.
DAMAGED_BYTES = st.binary(max_size=64) | st.builds(
    lambda at, junk: VALID_BYTES[:at] + junk + VALID_BYTES[at + len(junk) :],
    st.integers(0, len(VALID_BYTES)),
    st.binary(min_size=1, max_size=4),
)


@st.composite
def mutated_manifests(draw) -> dict:
    """A valid manifest with one value anywhere replaced by random JSON, deleted, or given a junk key or item."""
    raw = json.loads(json.dumps(VALID))
    path = draw(st.sampled_from(VALID_PATHS))
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[path[-1]] = draw(JSON_VALUES)
    elif action == "delete":
        del parent[path[-1]]
    else:  # add junk to the value if it is a list or an object, else beside it
        target = parent[path[-1]] if isinstance(parent[path[-1]], (dict, list)) else parent
        if isinstance(target, dict):
            target[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            target.append(draw(JSON_VALUES))
    return raw


def _has_annotated_type(value, annotation) -> bool:
    """Whether value, and everything inside it, has the type its dataclass annotation names (bool is no int)."""
    if dataclasses.is_dataclass(annotation):
        if type(value) is not annotation:
            return False
        hints = typing.get_type_hints(annotation)
        fields_typed = all(
            _has_annotated_type(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(annotation)
        )
        return type(value) is annotation and fields_typed
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is types.UnionType:
        return any(_has_annotated_type(value, arg) for arg in args)
    if origin is list:
        return type(value) is list and all(_has_annotated_type(item, args[0]) for item in value)
    if origin is dict:
        return type(value) is dict and all(type(k) is str and _has_annotated_type(v, args[1]) for k, v in value.items())
    return value is None if annotation is type(None) else type(value) is annotation


def _parses_or_refuses(text: str | bytes) -> None:
    try:
        manifest = Manifest.from_json(text)
    except ManifestError as error:
        assert "\n" not in str(error)
        return
    assert _has_annotated_type(manifest, Manifest)


@FUZZ
@given(mutated_manifests())
def test_a_manifest_mutated_anywhere_parses_well_typed_or_is_refused(raw):
    _parses_or_refuses(json.dumps(raw))


@FUZZ
@given(DAMAGED_BYTES)
def test_random_or_damaged_bytes_are_refused_with_a_manifest_error(text):
    _parses_or_refuses(text)


def test_the_annotation_check_of_the_fuzz_tests_tells_a_wrong_type():
    manifest = Manifest.from_json(json.dumps(VALID))
    assert _has_annotated_type(manifest, Manifest)
    assert not _has_annotated_type(dataclasses.replace(manifest, num_layers=True), Manifest)
    assert not _has_annotated_type(
        dataclasses.replace(manifest, exits=[dataclasses.replace(manifest.exits[0], quality=1)]), Manifest
    )


def test_graph_io_names_follow_the_optimum_convention():
    io_names = _manifest().io_names
    assert (io_names["input_ids"], io_names["attention_mask"], io_names["logits"]) == (
        "input_ids",
        "attention_mask",
        "logits",
    )
    assert (
        io_names["past_key"].format(slot=3) == "past_key_values.3.key"
        and io_names["present_value"] == "present.{slot}.value"
    )


def test_manifest_module_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, balcony_edge.runtime.core.manifest; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda raw: raw["exits"][0].update(graph="sub/exit_8.onnx"),
            "file 'sub/exit_8.onnx' is not a plain file name",
        ),
        (lambda raw: raw.update(weights_file="..\\weights.bin"), "is not a plain file name"),
        (lambda raw: raw["files"].pop("full.onnx"), "files has no sha256 for 'full.onnx'"),
        (
            lambda raw: raw["files"].update({"weights.bin": "../../escape"}),
            "files['weights.bin'] is '../../escape', not a sha256",
        ),
    ],
)
def test_every_named_file_is_a_plain_name_with_a_sha256(change, words):
    raw = _raw()
    change(raw)
    with pytest.raises(ManifestError, match=re.escape(words)):
        Manifest.from_json(json.dumps(raw))
