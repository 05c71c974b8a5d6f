"""Exits as plain checkpoints: a transformers folder per exit (llama, qwen2, mistral) whose logits equal the
Balcony exit's, and a GGUF file per exit of the default model that llama.cpp reads and runs like torch."""

import json

import gguf
import numpy as np
import pytest
import torch
from conftest import make_base_folder, spread
from transformers import AutoModelForCausalLM, AutoTokenizer

from balcony_edge.base_model import default_gguf_path, load_base_model
from balcony_edge.checkpoint import (
    SHIPPED_CHECKPOINT,
    build_model,
    copy_balcony_weights,
    load_checkpoint,
    save_checkpoint,
)
from balcony_edge.cli import _eval_engine, main
from balcony_edge.common.errors import BalconyError, ExportError
from balcony_edge.export.exit_checkpoints import LISTING_FILE, ExitCheckpointConfig, export_exit_checkpoints
from balcony_edge.export.exporter import ExportConfig, export_checkpoint
from balcony_edge.export.gguf_exits import read_source, write_exit_gguf
from balcony_edge.model import BalconyConfig

PROMPT = "The weather in Paris is lovely today, and the museums"


def _tiny_checkpoint(tmp_path, model_type):
    base_dir = make_base_folder(tmp_path / f"base-{model_type}", model_type=model_type, layers=4)
    base = load_base_model(str(base_dir))
    model = build_model(base, BalconyConfig((1, 2), balcony_init="random"))
    spread(model.balcony_state_dict().values())
    folder = tmp_path / f"ckpt-{model_type}"
    save_checkpoint(
        model, str(base_dir), folder, training={"tokens_seen": 1234, "data": ["bbc-news:0.5", "chat.jsonl:0.5"]}
    )
    return folder


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_each_hf_exit_loads_in_plain_transformers_with_the_exits_logits(tmp_path, model_type):
    checkpoint = _tiny_checkpoint(tmp_path, model_type)
    out, names = export_exit_checkpoints(ExitCheckpointConfig(format="hf", checkpoint=checkpoint, out=tmp_path / "hf"))
    assert names == ["exit_1", "exit_2"]
    model, _, base = load_checkpoint(checkpoint)
    ids = torch.tensor([base.tokenizer.encode("a tiny text for the tiny model, with some words")])
    reference = model.all_logits(ids)
    for k in (1, 2):
        folder = out / f"exit_{k}"
        plain = AutoModelForCausalLM.from_pretrained(folder)
        assert type(plain).__name__ == type(model.base).__name__ and plain.config.num_hidden_layers == k + 1
        assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()  # tied stays tied
        torch.testing.assert_close(plain(ids).logits, reference[k], atol=1e-4, rtol=0)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert tokenizer.encode("some words") == base.tokenizer.encode("some words")
        assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        card = (folder / "README.md").read_text()
        front = card.split("---")[1]
        assert (
            f"exit_depth: {k}" in front and f"num_hidden_layers: {k + 1}" in front and "training_tokens: 1234" in front
        )
        assert "base_model_sha256" in front and "non-commercial research use" in card and "chat.jsonl" in card
    assert json.loads((out / LISTING_FILE).read_text())["files"] == names


def test_hf_exit_in_fp16_loads_as_fp16(tmp_path):
    checkpoint = _tiny_checkpoint(tmp_path, "llama")
    out, _ = export_exit_checkpoints(
        ExitCheckpointConfig(format="hf", checkpoint=checkpoint, out=tmp_path / "hf", exits="2", dtype="fp16")
    )
    plain = AutoModelForCausalLM.from_pretrained(out / "exit_2", dtype="auto")
    assert plain.dtype == torch.float16 and not (out / "exit_1").exists()


@pytest.fixture(scope="module")
def gguf_exit_8(tmp_path_factory):
    """Exit 8 of the shipped checkpoint as an fp32 and an f16 GGUF file."""
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for dtype in ("fp32", "f16"):
        folder, names = export_exit_checkpoints(
            ExitCheckpointConfig(format="gguf", out=out / dtype, exits="8", dtype=dtype)
        )
        files[dtype] = folder / names[0]
    return files


def test_gguf_exit_keeps_the_base_files_metadata_and_llama_cpps_tensor_layout(gguf_exit_8):
    path = gguf_exit_8["fp32"]
    assert path.name == "smollm2-balcony-exit_8.gguf"
    written, source = gguf.GGUFReader(path), gguf.GGUFReader(default_gguf_path())
    assert written.fields["llama.block_count"].contents() == 9
    for name in (
        "tokenizer.ggml.tokens",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
        "llama.attention.head_count_kv",
    ):
        assert written.fields[name].contents() == source.fields[name].contents(), name
    tensors = {t.name: t for t in written.tensors}
    source_tensors = {t.name: t for t in source.tensors}
    expected = {name for name in source_tensors if not name.startswith("blk.") or int(name.split(".")[1]) < 9}
    assert set(tensors) == expected  # blk.8 is the balcony, in the place of the base's layer 8
    for name, tensor in tensors.items():
        assert list(tensor.shape) == list(source_tensors[name].shape), name
    # Backbone layers equal the source's own (dequantised) tensors: the query/key rows are in llama.cpp's order.
    for name in ("blk.0.attn_q.weight", "blk.5.attn_k.weight", "blk.7.ffn_down.weight"):
        original = gguf.quants.dequantize(source_tensors[name].data, source_tensors[name].tensor_type)
        np.testing.assert_array_equal(np.asarray(tensors[name].data), original)


def test_gguf_exit_generates_the_torch_exits_tokens_in_llama_cpp(gguf_exit_8):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, _, base = load_checkpoint()
    ids = base.tokenizer.encode(PROMPT)
    expected = (
        model.exit_model(8).generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :].tolist()
    )

    def greedy(path):
        llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
        tokens = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            tokens.append(token)
            if len(tokens) == 32:
                return tokens

    assert greedy(gguf_exit_8["fp32"]) == expected
    f16 = greedy(gguf_exit_8["f16"])
    agreement = sum(a == b for a, b in zip(f16, expected))
    print(f"f16 GGUF exit 8: {agreement}/32 greedy tokens equal torch fp32")
    assert f16[:8] == expected[:8]


def test_bad_exit_checkpoint_requests_are_one_line_errors(tmp_path, tiny_checkpoint, capsys):
    cases = [
        (["export", "--format", "safetensors"], "--format 'safetensors' is unknown"),
        (["export", "--format", "gguf", "--dtype", "int4"], "--dtype 'int4' does not apply to --format gguf"),
        (["export", "--format", "hf", "--quantize", "int4"], "--quantize applies to --format onnx"),
        (["export", str(tiny_checkpoint), "--format", "gguf"], "needs a base that came from a GGUF file"),
        (["export", str(tiny_checkpoint), "--format", "hf", "--exits", "3"], "exit 3 has no trained balcony"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            main([*args, "--out", str(tmp_path / "out")])
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert stop.value.code == 1 and message in output and len(output.strip().splitlines()) == 1, output
    assert not (tmp_path / "out").exists()


def test_force_replaces_only_a_folder_this_export_wrote(tmp_path, tiny_checkpoint):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="holds files that are not a balcony-edge export"):
        export_exit_checkpoints(ExitCheckpointConfig(format="hf", checkpoint=tiny_checkpoint, out=mine, force=True))
    assert (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "exits"
    export_exit_checkpoints(ExitCheckpointConfig(format="hf", checkpoint=tiny_checkpoint, out=out, exits="1"))
    with pytest.raises(ExportError, match="already holds a balcony-edge export"):
        export_exit_checkpoints(ExitCheckpointConfig(format="hf", checkpoint=tiny_checkpoint, out=out))
    export_exit_checkpoints(ExitCheckpointConfig(format="hf", checkpoint=tiny_checkpoint, out=out, force=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(["exit_1", "exit_2", LISTING_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder or lock left behind


def test_a_card_counts_the_tokens_and_data_of_every_run_it_started_from():
    from balcony_edge.export.exit_card import data_terms, training_tokens

    first = {"tokens_seen": 100, "data": ["bbc-news:0.7", "chat.jsonl:0.3"]}
    second = {"tokens_seen": 20, "data": ["code.jsonl"], "init_from": {"path": "runs/a", "training": first}}
    third = {
        "tokens_seen": 3,
        "data": ["code.jsonl:0.5", "readmes.jsonl:0.5"],
        "init_from": {"path": "runs/b", "training": second},
    }
    assert training_tokens(third) == 123
    terms = data_terms(third)
    assert [t.split(":")[0] for t in terms] == ["code.jsonl", "readmes.jsonl", "bbc-news", "chat.jsonl"]
    assert "non-commercial" in terms[2]


def test_chat_on_a_folder_of_plain_exits_says_what_runs_them(tiny_checkpoint, tmp_path):
    from balcony_edge.common.errors import ManifestError
    from balcony_edge.runtime.core.manifest import Manifest

    out = tmp_path / "exits"
    export_exit_checkpoints(ExitCheckpointConfig(format="hf", checkpoint=tiny_checkpoint, out=out, exits="1"))
    with pytest.raises(
        ManifestError,
        match=r"holds exits as plain hf checkpoints \(export --format hf\), which "
        r"transformers .* runs; for chat and serve, export ONNX",
    ):
        Manifest.load(out)


def test_a_deeper_balcony_exports_as_an_hf_exit_of_k_plus_n_layers_and_onnx_refuses_it(tmp_path):
    base_dir = make_base_folder(tmp_path / "base", layers=4)
    model = build_model(load_base_model(str(base_dir)), BalconyConfig((1, 2), "random", deeper=((1, 2),)))
    spread(model.balcony_state_dict().values())
    checkpoint = tmp_path / "deep"
    save_checkpoint(model, str(base_dir), checkpoint, training={"tokens_seen": 10})
    out, _ = export_exit_checkpoints(ExitCheckpointConfig(format="hf", checkpoint=checkpoint, out=tmp_path / "hf"))
    model, info, base = load_checkpoint(checkpoint)
    ids = torch.tensor([base.tokenizer.encode("a tiny text for the tiny model")])
    plain = AutoModelForCausalLM.from_pretrained(out / "exit_1")
    assert plain.config.num_hidden_layers == 3 and "num_hidden_layers: 3" in (out / "exit_1" / "README.md").read_text()
    torch.testing.assert_close(plain(ids).logits, model.all_logits(ids)[1], atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="exit 1's balcony has 2 layers .* --exits"):
        export_checkpoint(ExportConfig(checkpoint=checkpoint, out=tmp_path / "onnx"))
    assert not (tmp_path / "onnx").exists()
    export_checkpoint(ExportConfig(checkpoint=checkpoint, out=tmp_path / "onnx", exits="2"))  # verified against torch
    # An export whose exit 1 has one layer was made from another checkpoint: eval --chat --export refuses it.
    shallow = build_model(base, BalconyConfig((1, 2), "random"))
    save_checkpoint(shallow, str(base_dir), tmp_path / "shallow", training={"tokens_seen": 10})
    export_checkpoint(ExportConfig(checkpoint=tmp_path / "shallow", out=tmp_path / "shallow-onnx", verify=False))
    with pytest.raises(BalconyError, match="has exit 1, whose balcony in the checkpoint has 2 layers"):
        _eval_engine(tmp_path / "shallow-onnx", info, info.config.exits)


@pytest.fixture(scope="module")
def deeper_gguf_exit_8(tmp_path_factory):
    """The shipped exit 8 and a second balcony layer moved off its identity start, as an fp32 GGUF file."""
    shipped, _, base = load_checkpoint()
    model = build_model(base, BalconyConfig((8,), deeper=((8, 2),)))
    copy_balcony_weights(model, shipped.balcony_state_dict(), SHIPPED_CHECKPOINT, start_from=shipped.config)
    second = model.balcony_layers(8)[1]
    for name in ("self_attn.o_proj", "mlp.down_proj"):  # away from the identity start, so that the layer counts
        torch.nn.init.normal_(second.get_submodule(name).weight, std=0.01, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("deeper-gguf") / "exit_8.gguf"
    write_exit_gguf(path, 8, model, read_source(default_gguf_path()), "fp32")
    return model, base, path


def test_a_deeper_balcony_becomes_more_blocks_of_a_gguf_exit(deeper_gguf_exit_8):
    _, _, path = deeper_gguf_exit_8
    written = gguf.GGUFReader(path)
    assert written.fields["llama.block_count"].contents() == 10
    assert {t.name for t in written.tensors if t.name.startswith("blk.9.")}


def test_a_deeper_gguf_exit_generates_the_torch_exits_tokens_in_llama_cpp(deeper_gguf_exit_8):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, base, path = deeper_gguf_exit_8
    ids, expected = base.tokenizer.encode(PROMPT), []
    for _ in range(12):  # torch's greedy tokens, up to the first near tie (fp32 sums may break it either way)
        top = model.exit_model(8)(torch.tensor([ids + expected])).logits[0, -1].topk(2)
        if float(top.values[0] - top.values[1]) < 0.01:
            break
        expected.append(int(top.indices[0]))
    assert len(expected) >= 6
    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
    tokens = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        tokens.append(token)
        if len(tokens) == len(expected):
            break
    assert tokens == expected
