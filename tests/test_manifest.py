"""The manifest: the export folder's contract with the runtime (torch-free)."""

from __future__ import annotations

import json

import pytest

from balcony_edge.errors import ManifestError
from balcony_edge.runtime.manifest import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    ExitGraph,
    GenerationDefaults,
    KVShape,
    Manifest,
    WeightEntry,
    checksum_failures,
    file_sha256,
    graph_input_names,
    graph_output_names,
)


def _manifest(files: dict[str, str] | None = None) -> Manifest:
    return Manifest(
        base={"name": "smollm2", "model_type": "llama", "num_layers": 30, "sha256": "ab" * 32, "source": "smollm2"},
        num_layers=30,
        vocab_size=49152,
        dtype="fp32",
        quantization=None,
        weights_file="weights.bin",
        weights={
            "base.model.embed_tokens.weight": WeightEntry(offset=0, length=113246208, dtype="float32", shape=[49152, 576]),
            "norms.8.weight": WeightEntry(offset=113246208, length=2304, dtype="float32", shape=[576]),
        },
        kv=KVShape(num_kv_heads=3, head_dim=64, num_attention_heads=9, hidden_size=576, dtype="float32"),
        cache_slots=[f"layer.{i}" for i in range(30)] + ["balcony.8", "balcony.16"],
        exits=[
            ExitGraph(8, "exit_8.onnx", 9, [*range(8), 30], ["norms.8.weight"], weight_bytes_per_token=1, quality=0.39),
            ExitGraph(16, "exit_16.onnx", 17, [*range(16), 31], [], weight_bytes_per_token=2, quality=0.46),
            ExitGraph(30, "full.onnx", 30, list(range(30)), [], weight_bytes_per_token=3, quality=1.0),
        ],
        generation=GenerationDefaults(eos_token_ids=[2], bos_token_id=1, pad_token_id=2, context_length=8192),
        tokenizer_files=["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"],
        chat_template="chat_template.jinja",
        files=files or {},
    )


def test_manifest_round_trips_through_json():
    manifest = _manifest({"weights.bin": "00" * 32})
    again = Manifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.exit_graph(16).cache_slots[-1] == 31
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


def test_malformed_manifest_is_refused_in_one_line():
    raw = json.loads(_manifest().to_json())
    del raw["kv"]
    with pytest.raises(ManifestError, match="malformed") as error:
        Manifest.from_json(json.dumps(raw))
    assert "\n" not in str(error.value)


def test_load_names_a_folder_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match=f"has no {MANIFEST_FILE}"):
        Manifest.load(tmp_path)


def test_checksums_find_a_changed_and_a_missing_file(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"graph")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    manifest = _manifest({name: file_sha256(tmp_path / name) for name in ("a.onnx", "weights.bin")})
    (tmp_path / MANIFEST_FILE).write_text(manifest.to_json())
    assert checksum_failures(tmp_path, Manifest.load(tmp_path)) == {}

    (tmp_path / "weights.bin").write_bytes(b"\x00" * 63 + b"\x01")
    (tmp_path / "a.onnx").unlink()
    assert checksum_failures(tmp_path, manifest) == {"a.onnx": "missing", "weights.bin": "sha256 differs"}


def test_graph_io_names_follow_the_optimum_convention():
    assert graph_input_names(2) == [
        "input_ids", "attention_mask", "position_ids",
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value",
    ]
    assert graph_output_names(1) == ["logits", "present.0.key", "present.0.value"]
    io_names = _manifest().io_names
    assert io_names["past_key"].format(i=3) == "past_key_values.3.key" and io_names["present_value"] == "present.{i}.value"


def test_manifest_module_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, balcony_edge.runtime.manifest; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
