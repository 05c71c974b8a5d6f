"""Base models: the embedded default, Hugging Face folders of several families, GGUF files, and their errors."""

import copy
import errno
import json
import os
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch
from conftest import make_base_folder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from balcony_edge import base_model
from balcony_edge.base_model import (
    DEFAULT_BASE,
    DEFAULT_BASE_HUB_ID,
    load_base_model,
    recommended_sampling,
    resolve_base_folder,
)
from balcony_edge.common.errors import BaseModelError


def refused(spec, match: str) -> str:
    """Load `spec`, expect a BaseModelError matching `match` on one line, and return its message."""
    with pytest.raises(BaseModelError, match=match) as caught:
        load_base_model(str(spec))
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def model_copy(tiny_base_dir, tmp_path):
    """A private copy of the tiny Llama folder, for a test to break."""
    return shutil.copytree(tiny_base_dir, tmp_path / "model")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty balcony-edge cache folder, so that conversions never touch the user's cache."""
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cache_entries(cache) -> list[str]:
    """Everything under the cache's models folder: converted models and staging folders alike."""
    models = cache / "models"
    return sorted(path.name for path in models.iterdir()) if models.is_dir() else []


def write_tiny_gguf(folder, path, skip_tensor: str | None = None, extra_merges: tuple[str, ...] = ()):
    """Write the tiny Llama folder as a float32 GGUF with its byte-level BPE vocabulary, as llama.cpp lays it out."""
    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = [token for token, _ in sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])]
    special = {token["content"] for token in tokenizer["added_tokens"]}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in vocab])
    writer.add_token_merges([" ".join(merge) for merge in tokenizer["model"]["merges"]] + list(extra_merges))
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    for name, tensor in load_file(folder / "model.safetensors").items():
        if name != skip_tensor:
            writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tiny_base_dir, tmp_path_factory):
    """The bytes of the tiny Llama written as a GGUF (about 0.7 MB)."""
    return write_tiny_gguf(tiny_base_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


def test_default_model_is_smollm2_from_the_embedded_gguf(smollm2):
    config = smollm2.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama",
        30,
        576,
        49152,
    )
    assert smollm2.identity.name == DEFAULT_BASE and len(smollm2.identity.sha256) == 64
    assert not smollm2.model.training and not any(p.requires_grad for p in smollm2.model.parameters())
    assert smollm2.tokenizer.chat_template
    # Converted once: the folder is reused and the identity is stable.
    assert resolve_base_folder(DEFAULT_BASE)[0] == smollm2.folder
    # Its GGUF carries no sampling settings: its authors' model card does.
    assert recommended_sampling(smollm2) == (
        {"temperature": 0.2, "top_p": 0.9},
        f"the model card of {DEFAULT_BASE_HUB_ID}",
    )


def test_a_folders_generation_config_gives_the_recommended_sampling_when_it_samples(tiny_base_dir, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_base_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    assert recommended_sampling(load_base_model(str(folder))) == (
        {},
        "generation_config.json (greedy: do_sample is not set)",
    )
    config |= {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    (folder / "generation_config.json").write_text(json.dumps(config))
    settings, source = recommended_sampling(load_base_model(str(folder)))
    assert settings == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.05}
    assert source == "generation_config.json"


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_hugging_face_folders_of_each_family_load(tmp_path, model_type):
    loaded = load_base_model(str(make_base_folder(tmp_path, model_type)))
    assert loaded.identity.model_type == model_type and loaded.identity.num_layers == 4


def test_identity_hash_follows_the_weights(tmp_path):
    a = load_base_model(str(make_base_folder(tmp_path / "a", seed=0)))
    again = load_base_model(str(tmp_path / "a"))
    b = load_base_model(str(make_base_folder(tmp_path / "b", seed=1)))
    assert a.identity.sha256 == again.identity.sha256 != b.identity.sha256


@pytest.mark.parametrize("name", ["no-such-model", "no-such-model.gguf"])
def test_missing_base_model_is_refused_with_the_accepted_forms(tmp_path, name):
    message = refused(tmp_path / name, "not found")
    assert name in message and "give `smollm2`, a Hugging Face model folder or a .gguf file" in message


def test_file_that_is_not_gguf_is_refused(model_copy):
    message = refused(model_copy / "model.safetensors", "is not a .gguf file")
    assert "give a GGUF file or a model folder" in message


def test_folder_with_config_and_tokenizer_but_no_weights_is_refused(model_copy):
    (model_copy / "model.safetensors").unlink()
    message = refused(model_copy, "has no weights")
    assert str(model_copy) in message and "model.safetensors" in message and "download the model again" in message


def cut_in_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def header_claiming_more_bytes(data: bytes) -> bytes:
    """The same header with its last tensor made 16 times longer than the bytes that follow."""
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    last = max((name for name in header if name != "__metadata__"), key=lambda name: header[name]["data_offsets"][1])
    start, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [start, start + 16 * (end - start)]
    header[last]["shape"] = [16 * header[last]["shape"][0]]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda data: os.urandom(4096),
        lambda data: b"",
        cut_in_half,
        lambda data: struct.pack("<Q", 2 * len(data)) + data[8:],
        header_claiming_more_bytes,
    ],
    ids=["garbage", "empty", "cut-in-half", "header-longer-than-file", "tensor-beyond-file"],
)
def test_corrupt_safetensors_is_refused_naming_the_file(model_copy, corrupt):
    weights = model_copy / "model.safetensors"
    weights.write_bytes(corrupt(weights.read_bytes()))
    before = weights.read_bytes()
    message = refused(model_copy, "is corrupt or cut short")
    assert str(weights) in message and "download or save it again" in message
    assert weights.read_bytes() == before


@pytest.mark.parametrize("change", ["drop", "reshape"])
def test_weights_that_do_not_fit_the_config_are_refused_not_filled_at_random(model_copy, change):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.1.mlp.up_proj.weight"
    if change == "drop":
        del tensors[name]
    else:
        tensors[name] = torch.zeros(3, 3)
    save_file(tensors, weights, metadata={"format": "pt"})
    message = refused(model_copy, "lacks 1 of the weight tensors" if change == "drop" else "cannot load the causal LM")
    assert str(model_copy) in message


def test_sharded_folder_loads_and_is_refused_naming_a_missing_shard(tiny_base_dir, tmp_path):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_base_dir).save_pretrained(sharded, max_shard_size="300KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_base_dir / name, sharded)
    whole = load_base_model(str(tiny_base_dir))
    assert load_base_model(str(sharded)).identity.sha256 == whole.identity.sha256
    last_shard = max(sharded.glob("model-*.safetensors"))
    last_shard.unlink()
    message = refused(sharded, "missing from")
    assert (
        f"model.safetensors.index.json names {last_shard.name}," in message and "download the missing shards" in message
    )


def test_shard_index_that_is_not_json_is_refused(model_copy):
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors.index.json").write_text('{"weight_map": ')
    message = refused(model_copy, "is not a valid weight index")
    assert "model.safetensors.index.json" in message


@pytest.mark.parametrize(
    ("config_text", "match"),
    [
        ("{not json", "config.json is not valid JSON"),
        ("[1, 2]", "config.json names no model_type"),
        (json.dumps({"hidden_size": 64}), "config.json names no model_type"),
        (json.dumps({"model_type": "gpt2", "n_layer": 2}), "holds a 'gpt2' model, not a Llama-family causal LM"),
    ],
    ids=["not-json", "not-an-object", "no-model-type", "gpt2"],
)
def test_unusable_config_is_refused(model_copy, config_text, match):
    (model_copy / "config.json").write_text(config_text)
    message = refused(model_copy, match)
    assert "restore it from the model's source" in message or "supported: llama, mistral, qwen2, qwen3" in message
    assert (model_copy / "config.json").read_text() == config_text


def test_folder_without_config_is_refused(model_copy):
    (model_copy / "config.json").unlink()
    refused(model_copy, "has no config.json: give a Hugging Face causal LM folder")


def test_folder_without_tokenizer_is_refused(model_copy):
    (model_copy / "tokenizer.json").unlink()
    (model_copy / "tokenizer_config.json").unlink()
    message = refused(model_copy, "cannot read the tokenizer in")
    assert "copy its tokenizer files from the model's source" in message


def as_pickled_weights(folder) -> None:
    """Replace the folder's safetensors weights with the same tensors in pytorch_model.bin (a pickle)."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_pickled_weights_load_as_plain_tensors(model_copy, tiny_base_dir):
    as_pickled_weights(model_copy)
    assert load_base_model(str(model_copy)).identity.sha256 == load_base_model(str(tiny_base_dir)).identity.sha256


class OpensAFile:
    """A pickle payload that creates a file when unpickled: stands in for a pickle that runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_that_runs_code_is_refused_without_running_it(model_copy, tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model.embed_tokens.weight": OpensAFile(marker)}, model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    message = refused(model_copy, "torch refuses the pickled weights")
    assert "convert the model to safetensors" in message
    assert not marker.exists()


def test_cut_pickled_weights_are_refused(model_copy):
    as_pickled_weights(model_copy)
    weights = model_copy / "pytorch_model.bin"
    weights.write_bytes(cut_in_half(weights.read_bytes()))
    message = refused(model_copy, "cannot load the causal LM in")
    assert "download the model again" in message


def test_tiny_gguf_converts_once_into_the_cache(tiny_gguf_bytes, tiny_base_dir, tmp_path, cache, monkeypatch):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf_bytes)
    loaded = load_base_model(str(path))
    assert (loaded.identity.name, loaded.identity.num_layers, loaded.model.config.hidden_size) == ("tiny", 4, 64)
    source = load_file(tiny_base_dir / "model.safetensors")
    assert torch.equal(loaded.model.model.embed_tokens.weight, source["model.embed_tokens.weight"])
    assert cache_entries(cache) == [loaded.folder.name]
    monkeypatch.setattr(base_model, "_dequantised_gguf", lambda path: pytest.fail("converted a second time"))
    assert resolve_base_folder(str(path))[0] == loaded.folder


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path, cache):
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused(path, "architecture 'gpt2'")
    assert cache_entries(cache) == []


@pytest.mark.parametrize(
    "corrupt",
    [cut_in_half, lambda data: data[:1000], lambda data: data[:-1], lambda data: os.urandom(100_000), lambda data: b""],
    ids=["cut-in-half", "cut-in-metadata", "last-byte-missing", "garbage", "empty"],
)
def test_corrupt_gguf_is_refused_and_leaves_nothing_in_the_cache(tiny_gguf_bytes, tmp_path, cache, corrupt):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(corrupt(tiny_gguf_bytes))
    message = refused(path, "is not a readable GGUF file, corrupt or cut short")
    assert str(path) in message and "download it again" in message
    assert cache_entries(cache) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_gguf_cut_anywhere_is_refused_in_one_line(tiny_gguf_bytes, tmp_path, cache, data):
    path = tmp_path / "whole.gguf"
    path.write_bytes(tiny_gguf_bytes)
    metadata_end = gguf.GGUFReader(path).data_offset
    # Half the cuts fall in the metadata (mostly the vocabulary), which fails in more ways than the tensor data.
    cut = data.draw(st.one_of(st.integers(0, metadata_end), st.integers(metadata_end, len(tiny_gguf_bytes) - 1)))
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf_bytes[:cut])
    refused(path, "is not a readable GGUF file")
    assert cache_entries(cache) == []


def test_gguf_missing_a_tensor_is_refused_not_filled_at_random(tiny_base_dir, tmp_path, cache):
    path = write_tiny_gguf(tiny_base_dir, tmp_path / "tiny.gguf", skip_tensor="model.layers.1.mlp.up_proj.weight")
    message = refused(path, "lacks 1 of the weight tensors its config needs")
    assert "model.layers.1.mlp.up_proj.weight" in message
    assert cache_entries(cache) == []


def test_gguf_with_a_malformed_vocabulary_is_refused(tiny_base_dir, tmp_path, cache):
    path = write_tiny_gguf(tiny_base_dir, tmp_path / "tiny.gguf", extra_merges=("no-such-token another",))
    message = refused(path, "cannot be converted")
    assert "out of vocabulary" in message and "convert_hf_to_gguf.py" in message
    assert cache_entries(cache) == []


@pytest.mark.parametrize(
    ("fault", "raised"),
    [(OSError(errno.ENOSPC, "No space left on device"), BaseModelError), (KeyboardInterrupt(), KeyboardInterrupt)],
    ids=["disk-full", "ctrl-c"],
)
def test_conversion_stopped_while_writing_leaves_no_half_folder(
    tiny_gguf_bytes, tmp_path, cache, monkeypatch, fault, raised
):
    def write_part_then_stop(model, folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        raise fault

    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf_bytes)
    with monkeypatch.context() as patch, pytest.raises(raised) as caught:
        patch.setattr(PreTrainedModel, "save_pretrained", write_part_then_stop)
        load_base_model(str(path))
    if raised is BaseModelError:
        assert "could not write the converted model" in str(caught.value) and "free disk space" in str(caught.value)
    assert cache_entries(cache) == []
    # The next run is not fooled by the stopped one: it converts afresh.
    converted = load_base_model(str(path)).folder
    assert cache_entries(cache) == [converted.name] and (converted / "model.safetensors").stat().st_size > 1000


def test_no_disk_space_for_the_cache_is_a_clear_error(tiny_gguf_bytes, tmp_path, monkeypatch, cache):
    monkeypatch.setattr(base_model.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1_000_000})())
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny_gguf_bytes)
    refused(path, "not enough disk space.*BALCONY_EDGE_CACHE")
    assert cache_entries(cache) == []


def test_a_converted_tokenizer_gets_the_models_end_and_padding_tokens(tiny_base):
    """transformers 5.17 converted SmolLM2's GGUF tokenizer with <|im_start|> as eos_token and no pad token."""
    tokenizer, config = copy.deepcopy(tiny_base.tokenizer), copy.deepcopy(tiny_base.model.config)
    end = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    assert end == "<|im_end|>"
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
    config.pad_token_id = config.eos_token_id
    base_model._match_special_tokens(tokenizer, config)
    assert tokenizer.eos_token == tokenizer.pad_token == end
