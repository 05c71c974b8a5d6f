"""Export: piece graphs (segments, balconies, head) and one standard graph per exit, weights stored once, a manifest,
verified against torch."""

# ruff: noqa: F811  (the fixtures come from export_fixtures; pytest passes them in by name)

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import CHAT_TEMPLATE, TINY_EXITS, TINY_LAYERS

from balcony_edge.cli import main
from balcony_edge.common.errors import BalconyError, ExportError
from balcony_edge.export import exporter
from balcony_edge.export.exporter import ExportConfig, export_checkpoint
from balcony_edge.export.inspect import inspect_export
from balcony_edge.export.verify import ExitCheck, GraphDecoder, graph_tolerance
from balcony_edge.export.weights import PAGE_ALIGNMENT, WeightFile
from balcony_edge.generate import generate_greedy
from balcony_edge.runtime.core.engine import Engine
from balcony_edge.runtime.core.manifest import Manifest

PROMPT = [5, 17, 42, 99, 7]


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """Run `balcony-edge ARGS` through main(); returns the exit code and stdout + stderr."""
    monkeypatch.setattr(sys, "argv", ["balcony-edge", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        main()
    captured = capsys.readouterr()
    return exit.value.code or 0, captured.out + captured.err


def external_tensors(folder: Path) -> dict[str, list[tuple[str, int, int]]]:
    """Every initializer stored in a data file: name -> [(location, offset, length) per graph using it]."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    manifest = Manifest.load(folder)
    for file in [p.graph for p in manifest.pieces] + [e.graph for e in manifest.exits]:
        graph = onnx.load(folder / file, load_external_data=False)
        for tensor in graph.graph.initializer:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                info = {item.key: item.value for item in tensor.external_data}
                found.setdefault(tensor.name, []).append((info["location"], int(info["offset"]), int(info["length"])))
    return found


def session(folder: Path, exit: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(folder / Manifest.load(folder).exit_graph(exit).graph), providers=["CPUExecutionProvider"]
    )


# --- the graphs --------------------------------------------------------------------------------------------


def test_every_exit_and_the_full_model_get_a_graph(tiny_export):
    manifest = Manifest.load(tiny_export)
    assert [e.exit for e in manifest.exits] == [*TINY_EXITS, TINY_LAYERS]
    assert [e.num_layers for e in manifest.exits] == [k + 1 for k in TINY_EXITS] + [TINY_LAYERS]
    assert all((tiny_export / e.graph).is_file() for e in manifest.exits)
    assert all((tiny_export / p.graph).is_file() for p in manifest.pieces)


def test_exits_are_chains_of_pieces(tiny_export):
    manifest = Manifest.load(tiny_export)
    assert [(p.name, p.kind, p.first_layer, p.end_layer) for p in manifest.pieces] == [
        ("layers_0_0", "segment", 0, 1),
        ("layers_1_1", "segment", 1, 2),
        ("layers_2_3", "segment", 2, 4),
        ("balcony_1", "balcony", 1, 1),
        ("balcony_2", "balcony", 2, 2),
        ("head", "head", 4, 4),
    ]
    assert [e.chain for e in manifest.exits] == [
        ["layers_0_0", "balcony_1", "head"],
        ["layers_0_0", "layers_1_1", "balcony_2", "head"],
        ["layers_0_0", "layers_1_1", "layers_2_3", "head"],
    ]
    owners: dict[str, str] = {}
    for piece in manifest.pieces:
        for name in piece.weights:
            # The rotary tables are read by every segment and balcony; the tied embedding by segment 0 and the head.
            if not name.startswith("base.rotary.") and name != "base.model.embed_tokens.weight":
                assert owners.setdefault(name, piece.name) == piece.name, (
                    f"{name} is in {owners[name]} and {piece.name}"
                )


def test_pieces_use_onnxruntime_fused_ops(tiny_export):
    segment = onnx.load(tiny_export / "layers_2_3.onnx", load_external_data=False)
    ops = [n.op_type for n in segment.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and ops.count("SkipSimplifiedLayerNormalization") == 4
    assert ops.count("MatMul") == 4 * 2  # per layer: fused QKV, output, fused gate/up, down
    assert "Transpose" not in ops and "Softmax" not in ops


def test_pieces_take_sequence_lengths_and_a_standard_graph_makes_them_once(tiny_export):
    manifest = Manifest.load(tiny_export)
    for piece in manifest.pieces:
        inputs = ort.InferenceSession(str(tiny_export / piece.graph), providers=["CPUExecutionProvider"]).get_inputs()
        names = [i.name for i in inputs]
        assert "attention_mask" not in names
        if piece.kind == "head":
            assert names == ["exit_hidden"]
            continue
        assert names[1:3] == ["seqlens_k", "total_sequence_length"], piece.name
        assert [(i.type, i.shape) for i in inputs[1:3]] == [("tensor(int32)", ["batch_size"]), ("tensor(int32)", [])]
    for entry in manifest.exits:
        ops = [n.op_type for n in onnx.load(tiny_export / entry.graph, load_external_data=False).graph.node]
        assert ops.count("ReduceSum") == 1 and ops.count("GroupQueryAttention") == entry.num_layers


@pytest.mark.parametrize("exit", [*TINY_EXITS, TINY_LAYERS])
def test_standard_graph_has_the_decoder_io_contract_with_dynamic_dims(tiny_export, exit):
    manifest = Manifest.load(tiny_export)
    layers, kv = manifest.exit_graph(exit).num_layers, manifest.kv
    graph = session(tiny_export, exit)
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert [i.name for i in graph.get_inputs()] == ["input_ids", "attention_mask", *past_names]
    assert [o.name for o in graph.get_outputs()] == ["logits"] + [
        f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")
    ]
    shapes = {i.name: i.shape for i in graph.get_inputs()}
    assert shapes["input_ids"] == ["batch_size", "sequence_length"]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert shapes["past_key_values.0.key"] == ["batch_size", kv.num_kv_heads, "cache_length", kv.head_dim]

    def run(ids: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
        batch, length, cached = ids.shape[0], ids.shape[1], past[0].shape[2]
        feeds = {"input_ids": ids, "attention_mask": np.ones((batch, cached + length), np.int64)}
        feeds.update(zip(past_names, past))
        return graph.run(None, feeds)

    empty = [np.zeros((1, kv.num_kv_heads, 0, kv.head_dim), np.float32)] * (2 * layers)
    logits, *present = run(np.array([PROMPT]), empty)  # prefill: batch 1, 5 tokens
    assert logits.shape == (1, 5, manifest.vocab_size)
    assert present[0].shape == (1, kv.num_kv_heads, 5, kv.head_dim)
    step, *present = run(np.array([[3]]), present)  # decode one token with 5 cached
    assert present[-1].shape == (1, kv.num_kv_heads, 6, kv.head_dim)
    whole, *_ = run(np.array([PROMPT + [3]]), empty)
    np.testing.assert_allclose(step[0, -1], whole[0, -1], atol=1e-5)
    batched, *_ = run(np.array([PROMPT, PROMPT[::-1]]), [np.concatenate([p, p]) for p in empty])
    np.testing.assert_allclose(batched[0], logits[0], atol=1e-5)


# --- weights once ------------------------------------------------------------------------------------------


def test_every_weight_lies_once_in_the_one_data_file(tiny_export, tiny_model):
    tensors = external_tensors(tiny_export)
    for entry in Manifest.load(tiny_export).exits:
        graph = onnx.load(tiny_export / entry.graph, load_external_data=False)
        inline = [
            t.name
            for t in graph.graph.initializer
            if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() > 256
        ]
        assert inline == [], f"{entry.graph} keeps weights inline"
    assert {location for places in tensors.values() for location, _, _ in places} == {"weights.bin"}
    assert all(len(set(places)) == 1 for places in tensors.values()), "a shared weight points to two places"
    data = (tiny_export / "weights.bin").read_bytes()
    spans = sorted(places[0][1:] for places in tensors.values())
    assert all(offset + length <= next_offset for (offset, length), (next_offset, _) in itertools.pairwise(spans))
    digests = [hashlib.sha256(data[offset : offset + length]).hexdigest() for offset, length in spans]
    assert len(set(digests)) == len(digests), "the same content is stored twice"
    assert all(offset % PAGE_ALIGNMENT == 0 for offset, length in spans if length >= PAGE_ALIGNMENT)
    parameters = sum(p.numel() * p.element_size() for p in tiny_model.parameters())
    rotary = sum(length for name, [(_, _, length), *_] in tensors.items() if name.startswith("base.rotary."))
    assert (
        rotary == 2 * tiny_model.base.config.max_position_embeddings * Manifest.load(tiny_export).kv.head_dim // 2 * 4
    )
    assert parameters + rotary <= len(data) <= 1.05 * (parameters + rotary)


FUSED = {".qkv_proj.weight.T": ("q_proj", "k_proj", "v_proj"), ".gate_up_proj.weight.T": ("gate_proj", "up_proj")}


def expected_weight(state: dict, name: str) -> tuple[np.ndarray, list[str]]:
    """What a stored weight must hold, from the torch parameters, and which parameters it holds."""
    for suffix, parts in FUSED.items():
        if name.endswith(suffix):
            prefix = name.removesuffix(suffix)
            names = [f"{prefix}.{part}.weight" for part in parts]
            return np.concatenate([state[n].numpy() for n in names]).T, names
    if name.endswith(".T"):
        return state[name.removesuffix(".T")].numpy().T, [name.removesuffix(".T")]
    return state[name].numpy(), [name]


def test_stored_weights_are_the_torch_parameters(tiny_export, tiny_model):
    data = (tiny_export / "weights.bin").read_bytes()
    state = dict(tiny_model.named_parameters())
    state = {name: p.detach() for name, p in state.items()}
    covered = set()
    for name, [(_, offset, length), *_] in external_tensors(tiny_export).items():
        stored = np.frombuffer(data[offset : offset + length], dtype=np.float32)
        if name.startswith("base.rotary."):
            assert (
                stored.size
                == tiny_model.base.config.max_position_embeddings * Manifest.load(tiny_export).kv.head_dim // 2
            )
            continue
        expected, parameters = expected_weight(state, name)
        np.testing.assert_array_equal(stored, np.ascontiguousarray(expected).ravel(), err_msg=name)
        covered.update(parameters)
    assert covered == set(state)


def test_manifest_weight_table_matches_the_graphs(tiny_export):
    manifest = Manifest.load(tiny_export)
    tensors = external_tensors(tiny_export)
    assert {name: places[0][1:] for name, places in tensors.items()} == {
        name: (entry.offset, entry.length) for name, entry in manifest.weights.items()
    }
    for entry in [*manifest.pieces, *manifest.exits]:
        graph = onnx.load(tiny_export / entry.graph, load_external_data=False)
        assert entry.weights == [
            t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        ]
    embedding = manifest.weights["base.model.embed_tokens.weight"]
    assert (embedding.dtype, embedding.shape) == ("float32", [manifest.vocab_size, manifest.kv.hidden_size])


def test_tied_head_reads_the_embedding_itself(tiny_export):
    for file in ("head.onnx", "full.onnx"):
        graph = onnx.load(tiny_export / file, load_external_data=False)
        names = {t.name for t in graph.graph.initializer}
        assert "base.model.embed_tokens.weight" in names and not any(
            "lm_head" in n or "embed_tokens.weight.T" in n for n in names
        )
        gemm = [n for n in graph.graph.node if n.op_type == "Gemm"]
        assert [n.input[1] for n in gemm] == ["base.model.embed_tokens.weight"]


# --- manifest, report and inspect --------------------------------------------------------------------------


def test_manifest_describes_the_export(tiny_export, tiny_model):
    manifest = Manifest.load(tiny_export)
    config = tiny_model.base.config
    assert manifest.base["sha256"] == tiny_model.base_identity.sha256
    assert manifest.cache_slots == ["layer.0", "layer.1", "layer.2", "layer.3", "balcony.1", "balcony.2"]
    assert [p.cache_slots for p in manifest.pieces] == [
        ["layer.0"],
        ["layer.1"],
        ["layer.2", "layer.3"],
        ["balcony.1"],
        ["balcony.2"],
        [],
    ]
    assert (manifest.kv.num_kv_heads, manifest.kv.head_dim, manifest.kv.dtype) == (2, 16, "float32")
    assert manifest.generation.eos_token_ids == [config.eos_token_id]
    assert manifest.generation.context_length == config.max_position_embeddings
    assert (tiny_export / manifest.chat_template).read_text() == CHAT_TEMPLATE
    assert "tokenizer.json" in manifest.tokenizer_files
    assert set(manifest.tokenizer_files) <= set(manifest.files)
    assert set(manifest.files) == {p.name for p in tiny_export.iterdir() if p.is_file()} - {"manifest.json"}
    per_token = [e.weight_bytes_per_token for e in manifest.exits]
    assert per_token == sorted(per_token) and per_token[0] > 0
    assert all(0.0 <= e.quality <= 1.0 for e in manifest.exits) and manifest.exits[-1].quality == 1.0


def test_fp32_export_matches_torch_logits_and_greedy_tokens(tiny_export, tiny_model):
    manifest = Manifest.load(tiny_export)
    engine = Engine.load(tiny_export, providers=["cpu"])
    for entry in manifest.exits:
        with torch.no_grad():
            expected = tiny_model.exit_model(entry.exit)(input_ids=torch.tensor([PROMPT])).logits[0].numpy()
        standard = GraphDecoder(tiny_export / entry.graph, entry, manifest.kv).prompt_logits(PROMPT)
        np.testing.assert_allclose(standard, expected, atol=1e-4)
        sequence = engine.sequence(PROMPT)
        chain = sequence.logits(entry.exit, every_position=True)
        np.testing.assert_allclose(chain, expected, atol=1e-4)
        tokens = []
        for _ in range(16):
            tokens.append(int(np.argmax(sequence.logits(entry.exit))))
            sequence.append(tokens[-1])
        assert tokens == generate_greedy(tiny_model, entry.exit, PROMPT, 16)


def test_report_records_the_verification(tiny_export):
    report = json.loads((tiny_export / "report.json").read_text())
    checks = report["verification"]["exits"]
    assert [c["exit"] for c in checks] == [*TINY_EXITS, TINY_LAYERS]
    assert all(c["max_abs_diff"] <= 1e-4 and c["greedy_matched"] == c["greedy_tokens"] == 32 for c in checks)
    assert all(c["graph_max_abs_diff"] <= 1e-5 for c in checks)
    assert (
        report["export_seconds"] >= 0
        and report["verify_seconds"] > 0
        and report["weights_file_bytes"] >= report["parameter_bytes"]
    )


def test_inspect_passes_a_clean_export_and_fails_a_corrupted_byte(tiny_export, tmp_path, capsys, monkeypatch):
    code, output = run_cli(["inspect", tiny_export], capsys, monkeypatch)
    assert code == 0 and "checks OK" in output and "CPUExecutionProvider" in output
    assert "CPUExecutionProvider" in inspect_export(tiny_export).providers

    copy = tmp_path / "copy"
    shutil.copytree(tiny_export, copy)
    with open(copy / "weights.bin", "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    code, output = run_cli(["inspect", copy], capsys, monkeypatch)
    assert code == 1 and "weights.bin: sha256 differs" in output
    assert inspect_export(copy).problems == {"weights.bin": "sha256 differs"}


def test_inspect_json_prints_one_object_on_stdout(tiny_export, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["balcony-edge", "inspect", str(tiny_export), "--json"])
    with pytest.raises(SystemExit) as stop:
        main()
    printed = json.loads(capsys.readouterr().out)  # stdout holds the JSON and nothing else
    assert stop.value.code == 0 and printed["checks_ok"] and printed["problems"] == {}
    assert [e["exit"] for e in printed["manifest"]["exits"]] == [1, 2, 4] and printed["file_bytes"]["weights.bin"] > 0


# --- precision ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "method"), [("fp32", "int8"), ("fp32", "int4"), ("fp16", "int4")])
def test_quantized_export_runs_without_nan_and_reports_agreement(tiny_checkpoint, tmp_path, dtype, method):
    config = ExportConfig(checkpoint=tiny_checkpoint, out=tmp_path / method, exits="1", dtype=dtype, quantize=method)
    out = export_checkpoint(config)
    manifest = Manifest.load(out)
    assert manifest.quantization["method"] == method and manifest.quantization["block_size"] == 32
    assert manifest.kv.dtype == {"fp32": "float32", "fp16": "float16"}[dtype]
    checks = json.loads((out / "report.json").read_text())["verification"]["exits"]
    assert [c["exit"] for c in checks] == [1, TINY_LAYERS]
    assert all(c["finite"] and 0.5 <= c["top1_agreement"] <= 1.0 for c in checks)
    full = onnx.load(out / "full.onnx", load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in full.graph.node) == 4 * TINY_LAYERS + 1  # the head too
    tensors = external_tensors(out)
    assert all(len(set(places)) == 1 for places in tensors.values())
    assert f"base.model.layers.0.self_attn.qkv_proj.weight.T_Q{method[3:]}" in tensors
    used_by = {name: len(places) for name, places in tensors.items()}
    assert used_by["base.model.embed_tokens.weight"] == 3  # layers_0_0.onnx, exit_1.onnx, full.onnx
    assert used_by["base.model.layers.0.mlp.gate_up_proj.weight.T_scales"] == 3


def test_a_block_size_is_honoured_recorded_and_named(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "b64"
    code, output = run_cli(
        ["export", tiny_checkpoint, "--out", out, "--exits", "1", "--quantize", "int4", "--block-size", "64"],
        capsys,
        monkeypatch,
    )
    assert code == 0, output
    assert Manifest.load(out).quantization["block_size"] == 64
    nodes = [n for n in onnx.load(out / "full.onnx", load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    blocks = [a.i for n in nodes for a in n.attribute if a.name == "block_size"]
    assert nodes and blocks == [64] * len(nodes)
    config = ExportConfig(checkpoint=tiny_checkpoint, quantize="int4", block_size=64)
    assert config.folder_suffix == "int4-b64" and ExportConfig(quantize="int4").folder_suffix == "int4"


def test_fp16_export_halves_the_weights_and_agrees_with_fp32(tiny_checkpoint, tiny_export, tmp_path):
    out = export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, out=tmp_path / "fp16", exits="2", dtype="fp16"))
    manifest = Manifest.load(out)
    assert manifest.dtype == "fp16" and manifest.kv.dtype == "float16"
    fp32_bytes = (tiny_export / "weights.bin").stat().st_size
    assert (out / "weights.bin").stat().st_size < 0.55 * fp32_bytes
    checks = json.loads((out / "report.json").read_text())["verification"]["exits"]
    assert all(c["finite"] and c["top1_agreement"] >= 0.9 and c["max_abs_diff"] < 0.05 for c in checks)


def test_the_standard_graph_may_round_differently_from_the_chain_only_in_fp16():
    logits = np.array([[-3.0, 20.0, 4.0]], dtype=np.float32)
    assert graph_tolerance("float32", logits) == 1e-2
    assert graph_tolerance("float16", logits) == pytest.approx(8 * 2**-10 * 20)  # 8 float16 steps at 20
    check = ExitCheck(
        exit=8,
        max_abs_diff=0.1,
        top1_agreement=1.0,
        greedy_matched=32,
        greedy_tokens=32,
        finite=True,
        graph_max_abs_diff=0.04,
    )
    assert (
        check.failure(exact=False)
        == "the standard graph of exit 8 differs from its chain by 4.00e-02 in logits (tolerance 1.00e-02)"
    )
    fp16 = dataclasses.replace(check, graph_tolerance=graph_tolerance("float16", logits))
    assert fp16.failure(exact=False) is None
    assert (
        dataclasses.replace(fp16, graph_max_abs_diff=1.0)
        .failure(exact=False)
        .startswith("the standard graph of exit 8 differs")
    )


# --- bad input, one line each ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--exits", "3"], "exit 3 has no trained balcony"),
        (["--exits", "9"], "exit 9 is out of range"),
        (["--dtype", "bf16"], "--dtype 'bf16' is unknown; choose one of fp32, fp16"),
        (["--quantize", "int3"], "--quantize 'int3' is unknown; choose one of int8, int4"),
        (["--quantize", "int4", "--block-size", "48"], "--block-size 48 is not one MatMulNBits takes"),
        (["--block-size", "64"], "--block-size applies to quantised weights; give --quantize int8 or int4"),
        (["--format", "hf", "--block-size", "64"], "--block-size applies to --format onnx with --quantize"),
    ],
)
def test_bad_options_fail_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch, args, message):
    code, output = run_cli(["export", tiny_checkpoint, "--out", tmp_path / "out", *args], capsys, monkeypatch)
    assert code == 1 and message in output
    assert len(output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_untrained_exit_names_the_trained_ones(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    _, output = run_cli(["export", tiny_checkpoint, "--out", tmp_path / "out", "--exits", "1,3"], capsys, monkeypatch)
    assert "trained exits: 1, 2" in output


def test_unwritable_and_existing_targets_are_refused(tiny_checkpoint, tiny_export, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("")
    code, output = run_cli(["export", tiny_checkpoint, "--out", tmp_path / "a-file" / "out"], capsys, monkeypatch)
    assert code == 1 and "cannot write to" in output and "choose a writable --out" in output
    code, output = run_cli(["export", tiny_checkpoint, "--out", tiny_export], capsys, monkeypatch)
    assert code == 1 and "already holds a balcony-edge export (with its manifest.json); pass --force" in output
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    code, output = run_cli(["export", tiny_checkpoint, "--out", tmp_path / "home", "--force"], capsys, monkeypatch)
    assert code == 1 and "holds files that are not a balcony-edge export (with its manifest.json) (notes.txt)" in output
    assert (tmp_path / "home" / "notes.txt").read_text() == "precious"
    (tmp_path / "link").symlink_to(tiny_export)
    code, output = run_cli(["export", tiny_checkpoint, "--out", tmp_path / "link", "--force"], capsys, monkeypatch)
    assert code == 1 and "is a symbolic link" in output and (tmp_path / "link").is_symlink()


def test_incomplete_checkpoint_and_missing_base_are_refused(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_checkpoint, incomplete)
    (incomplete / "balconies.safetensors").unlink()
    code, output = run_cli(["export", incomplete, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1 and "incomplete: balconies.safetensors is missing" in output

    orphan = tmp_path / "orphan"
    shutil.copytree(tiny_checkpoint, orphan)
    config = json.loads((orphan / "balcony_config.json").read_text())
    config["base_model"]["source"] = str(tmp_path / "no-such-model")
    (orphan / "balcony_config.json").write_text(json.dumps(config))
    code, output = run_cli(["export", orphan, "--out", tmp_path / "out"], capsys, monkeypatch)
    assert code == 1 and "not found" in output
    assert not (tmp_path / "out").exists()


def test_running_out_of_disk_mid_way_leaves_nothing_behind(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    appended = []

    def full_disk(self, data):
        if appended:
            raise OSError(errno.ENOSPC, "No space left on device")
        appended.append(len(data))
        return original(self, data)

    original = WeightFile._append
    monkeypatch.setattr(WeightFile, "_append", full_disk)
    code, output = run_cli(["export", tiny_checkpoint, "--out", tmp_path / "exports" / "out"], capsys, monkeypatch)
    assert code == 1 and "No space left on device" in output and "free disk space" in output
    assert list((tmp_path / "exports").iterdir()) == []


def test_interrupted_export_leaves_nothing_behind(tiny_checkpoint, tmp_path, monkeypatch):
    exported = []

    def interrupt_at_the_second_graph(*args, **kwargs):
        if exported:
            raise KeyboardInterrupt
        exported.append(original(*args, **kwargs))
        return exported[-1]

    original = exporter.save_graph
    monkeypatch.setattr(exporter, "save_graph", interrupt_at_the_second_graph)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, out=tmp_path / "exports" / "out", exits="1"))
    assert list((tmp_path / "exports").iterdir()) == []


def test_force_refuses_a_folder_whose_manifest_is_not_an_export_manifest(
    tiny_checkpoint, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "notes.txt").write_text("my notes")
    code, output = run_cli(
        ["export", tiny_checkpoint, "--out", out, "--exits", "1", "--no-verify", "--force"], capsys, monkeypatch
    )
    assert code == 1 and "holds files that are not a balcony-edge export" in output
    assert len(output.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "notes.txt"]


def test_force_replaces_an_existing_export(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"schema_version": 1, "exits": [], "weights_file": "weights.bin"}))
    (out / "stale.onnx").write_text("")
    args = ["export", tiny_checkpoint, "--out", out, "--exits", "1", "--no-verify", "--force"]
    code, output = run_cli(args, capsys, monkeypatch)
    assert code == 0 and "exported" in output
    assert [e.exit for e in Manifest.load(out).exits] == [1, TINY_LAYERS] and not (out / "stale.onnx").exists()
    assert json.loads((out / "report.json").read_text())["verification"] is None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_default_out_dir_is_named_after_the_checkpoint(tiny_checkpoint):
    assert exporter.export_name(tiny_checkpoint) == "tiny-balcony"
    assert exporter.export_name(exporter.SHIPPED_CHECKPOINT) == "smollm2-balcony"


def test_export_error_is_a_balcony_error():
    from balcony_edge.common.errors import BalconyError

    assert issubclass(ExportError, BalconyError)


# --- the default model, end to end (slow: minutes) ---------------------------------------------------------


@pytest.mark.slow
def test_shipped_checkpoint_exports_with_weights_once_and_matches_torch(default_export):
    from balcony_edge.checkpoint import load_checkpoint

    out = default_export
    manifest = Manifest.load(out)
    assert [e.exit for e in manifest.exits] == [8, 16, 24, 30]
    assert (manifest.kv.num_kv_heads, manifest.kv.head_dim, manifest.generation.context_length) == (3, 64, 8192)
    report = json.loads((out / "report.json").read_text())
    checks = report["verification"]["exits"]
    assert all(c["max_abs_diff"] <= 1e-3 and c["greedy_matched"] == 32 for c in checks)
    model, _, _ = load_checkpoint()
    parameters = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
    assert parameters <= (out / "weights.bin").stat().st_size <= 1.05 * parameters
    on_disk = sum(p.stat().st_size for p in out.iterdir())
    assert on_disk <= 1.05 * parameters
    assert inspect_export(out).problems == {}
    print(
        f"\ndefault model export: {report['export_seconds']:.0f} s, "
        f"{on_disk / 1e6:.1f} MB on disk, parameters {parameters / 1e6:.1f} MB"
    )
    print(json.dumps(checks, indent=1))


def test_a_second_export_to_the_same_folder_is_refused_while_the_first_writes(tiny_checkpoint, tmp_path):
    import subprocess
    import textwrap

    out = tmp_path / "exports" / "out"
    holder = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from balcony_edge.common.atomic import exclusive_target
        with exclusive_target(Path({str(out)!r}), "the export"):
            print("locked", flush=True)
            time.sleep(30)
    """)
    first = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(BalconyError, match="another process is writing the export"):
            export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, out=out, exits="1", verify=False))
    finally:
        first.kill()
        first.wait()
    export_checkpoint(
        ExportConfig(checkpoint=tiny_checkpoint, out=out, exits="1", verify=False)
    )  # the lock went with the process
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # the killed holder's lock file reused, then removed


def test_each_exit_has_an_onnxruntime_genai_folder_of_links(tiny_export):
    manifest = Manifest.load(tiny_export)
    for entry in manifest.exits:
        folder = tiny_export / "genai" / Path(entry.graph).stem
        config = json.loads((folder / "genai_config.json").read_text())
        decoder = config["model"]["decoder"]
        assert decoder["filename"] == entry.graph and decoder["num_hidden_layers"] == entry.num_layers
        assert (
            config["search"]["past_present_share_buffer"] is True
            and config["model"]["vocab_size"] == manifest.vocab_size
        )
        for name in (entry.graph, "weights.bin", "tokenizer.json"):
            assert (folder / name).is_symlink() and (folder / name).resolve() == (tiny_export / name).resolve()
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())  # a copy with the template in it
        assert tokenizer_config["chat_template"] == (tiny_export / manifest.chat_template).read_text()


@pytest.mark.parametrize("fixture", ["tiny_export", "tiny_export_kv8"])
def test_onnxruntime_genai_runs_an_exit_graph_as_the_engine_does(request, fixture):
    """With a float cache and with an int8 one (`--kv-cache int8`)."""
    og = pytest.importorskip(
        "onnxruntime_genai", reason="onnxruntime-genai is installed in an environment of its own (docs/export.md)"
    )
    tiny_export = request.getfixturevalue(fixture)
    engine = Engine.load(tiny_export, providers=["cpu"])
    prompt = [5, 17, 42, 99, 7]
    for entry in engine.manifest.exits:
        model = og.Model(str(tiny_export / "genai" / Path(entry.graph).stem))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        sequence, expected = engine.sequence(prompt), []
        for _ in tokens:
            expected.append(int(np.argmax(sequence.logits(entry.exit))))
            sequence.append(expected[-1])
        assert tokens == expected
        tokenizer = og.Tokenizer(model)
        rendered = tokenizer.apply_chat_template(
            json.dumps([{"role": "user", "content": "Hi"}]), add_generation_prompt=True
        )
        assert rendered == engine.codec.template.render(
            messages=[{"role": "user", "content": "Hi"}],
            add_generation_prompt=True,
            bos_token=engine.codec.bos_token,
            eos_token=engine.codec.eos_token,
        )


def test_a_quantizer_dependency_that_is_missing_is_named_with_the_fix(monkeypatch):
    """onnxruntime 1.31's MatMulNBitsQuantizer imports onnx_ir, which onnxruntime does not install."""
    from balcony_edge.export.quantize import _matmul_nbits_quantizer

    monkeypatch.delitem(sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", raising=False)
    monkeypatch.setitem(sys.modules, "onnx_ir", None)  # as if not installed
    with pytest.raises(ExportError, match=r"needs the package onnx-ir: run `pip install onnx-ir`"):
        _matmul_nbits_quantizer()
