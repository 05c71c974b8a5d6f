"""An int8 KV cache (`export --kv-cache int8`): int8 codes with calibrated per-channel scales inside
GroupQueryAttention, switching as exact as with a float cache, close to the float export."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

from balcony_edge.cli import main
from balcony_edge.export.exporter import ExportConfig, export_checkpoint
from balcony_edge.export.kv_calibration import calibration_ids, kv_cache_scales
from balcony_edge.runtime import Engine
from balcony_edge.runtime.core.manifest import Manifest


@pytest.fixture(scope="module")
def engine(tiny_export_kv8):
    return Engine.load(tiny_export_kv8, providers=["cpu"], threads=1)


def test_the_manifest_and_every_cache_input_say_int8(tiny_export_kv8):
    manifest = Manifest.load(tiny_export_kv8)
    assert manifest.kv.dtype == "int8" and manifest.dtype == "fp32"
    assert json.loads((tiny_export_kv8 / "report.json").read_text())["kv_cache"] == "int8"
    for name in [p.graph for p in manifest.pieces] + [e.graph for e in manifest.exits]:
        graph = onnx.load(tiny_export_kv8 / name, load_external_data=False).graph
        caches = [v for v in [*graph.input, *graph.output] if v.name.startswith(("past_key_values.", "present."))]
        assert all(v.type.tensor_type.elem_type == onnx.TensorProto.INT8 for v in caches)
        for node in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert (attributes["k_quant_type"], attributes["v_quant_type"], attributes["kv_cache_bit_width"]) == (
                b"PER_CHANNEL",
                b"PER_CHANNEL",
                8,
            )
            assert node.input[12].endswith(".k_cache_scale") and node.input[13].endswith(".v_cache_scale")


def test_key_scales_bound_each_rotating_pair_and_every_attention_has_its_own(tiny_model, tiny_base):
    scales = kv_cache_scales(tiny_model, tiny_base.tokenizer)
    config = tiny_model.base.config
    expected = {f"base.model.layers.{i}.self_attn" for i in range(config.num_hidden_layers)} | {
        f"balconies.{k}.self_attn" for k in tiny_model.exits
    }
    assert set(scales) == expected
    half = scales["balconies.1.self_attn"].key.shape[-1] // 2
    for scale in scales.values():
        assert scale.key.shape == scale.value.shape == (1, config.num_key_value_heads, 1, 2 * half)
        assert (scale.key > 0).all() and (scale.value > 0).all()
        np.testing.assert_array_equal(scale.key[..., :half], scale.key[..., half:])  # a pair shares one bound


def test_the_calibration_text_fills_the_codes_without_saturating(engine, tiny_base):
    """Keys of the calibration text itself stay within [-127, 127] and, in every slot, use most of that range."""
    largest: dict[str, int] = {}
    for ids in calibration_ids(tiny_base.tokenizer):
        sequence = engine.sequence(ids)
        for exit in engine.exits:
            sequence.logits(exit)
        for slot in sequence.cache.filled:
            codes = sequence.cache.keys(slot, len(ids)).astype(np.int32)
            assert sequence.cache.keys(slot, 1).dtype == np.int8 and codes.min() >= -127 and codes.max() <= 127
            largest[slot] = max(largest.get(slot, 0), int(np.abs(codes).max()))
    assert min(largest.values()) >= 90, largest


def test_a_rope_attention_factor_widens_the_key_scales(tiny_model, tiny_base, monkeypatch):
    """Rope scalings such as YaRN multiply cos and sin by an attention factor; rotated keys grow by as much. (The factor
    also changes what later layers see; the first layer's keys and values come from the embedding alone.)"""
    first = "base.model.layers.0.self_attn"
    plain = kv_cache_scales(tiny_model, tiny_base.tokenizer)[first]
    monkeypatch.setattr(tiny_model.base.model.rotary_emb, "attention_scaling", 1.5)
    scaled = kv_cache_scales(tiny_model, tiny_base.tokenizer)[first]
    np.testing.assert_allclose(scaled.key, 1.5 * plain.key, rtol=1e-6)
    np.testing.assert_array_equal(scaled.value, plain.value)


def test_switching_exit_gives_static_exit_logits_with_an_int8_cache(engine):
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, engine.manifest.vocab_size, size=40).tolist()
    static = {}
    for exit in engine.exits:
        sequence = engine.sequence(tokens[:5])
        static[exit] = {4: sequence.logits(exit)}
        for position in range(5, len(tokens)):
            sequence.append(tokens[position])
            static[exit][position] = sequence.logits(exit)
    sequence = engine.sequence(tokens[:5])
    schedule = [engine.exits[0]] * 12 + list(rng.choice(engine.exits, size=len(tokens) - 16)) + [engine.exits[-1]]
    for position, exit in zip(range(4, len(tokens)), schedule):
        np.testing.assert_allclose(sequence.logits(int(exit)), static[int(exit)][position], rtol=0, atol=1e-4)
        if position + 1 < len(tokens):
            sequence.append(tokens[position + 1])


def test_an_int8_cache_stays_close_to_the_float_export(engine, tiny_export):
    float_engine = Engine.load(tiny_export, providers=["cpu"], threads=1)
    prompt = list(range(5, 45))
    for exit in engine.exits:
        got = engine.sequence(prompt).logits(exit, every_position=True)
        expected = float_engine.sequence(prompt).logits(exit, every_position=True)
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
        assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()
    checks = json.loads((engine.folder / "report.json").read_text())["verification"]["exits"]
    assert all(c["finite"] and c["top1_agreement"] >= 0.9 for c in checks)


def test_inspect_names_the_int8_cache(tiny_export_kv8):
    from balcony_edge.export.inspect import exits_table

    table = exits_table(
        tiny_export_kv8, Manifest.load(tiny_export_kv8), json.loads((tiny_export_kv8 / "report.json").read_text())
    )
    assert "fp32, int8 KV cache:" in str(table.title)


def test_an_int8_cache_export_is_named_so_by_default(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path))
    out = export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, exits="1", kv_cache="int8", verify=False))
    assert out == tmp_path / "exports" / "tiny-balcony-fp32-kv8" and Manifest.load(out).kv.dtype == "int8"
    assert ExportConfig(quantize="int4", kv_cache="int8").folder_suffix == "int4-kv8"
    assert ExportConfig(quantize="int4").folder_suffix == "int4"
    assert not ExportConfig(kv_cache="int8").exact


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-cache", "int4"], "--kv-cache 'int4' is unknown; choose one of float, int8"),
        (
            ["--format", "gguf", "--kv-cache", "int8"],
            "--kv-cache applies to --format onnx; leave it out for --format gguf",
        ),
        (
            ["--dtype", "fp16", "--kv-cache", "int8"],
            "--kv-cache int8 needs fp32 activations, not --dtype fp16; leave out --dtype (or --kv-cache)",
        ),
    ],
)
def test_a_bad_kv_cache_option_fails_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr(
        sys, "argv", ["balcony-edge", "export", str(tiny_checkpoint), "--out", str(tmp_path / "out"), *args]
    )
    with pytest.raises(SystemExit) as exit:
        main()
    output = capsys.readouterr()
    assert exit.value.code == 1 and message in output.out + output.err
    assert len((output.out + output.err).strip().splitlines()) == 1 and not (tmp_path / "out").exists()
