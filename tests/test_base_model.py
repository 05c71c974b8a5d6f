"""Base models: the embedded default, Hugging Face folders of several families, GGUF files, and their errors."""

import numpy as np
import pytest

from balcony_edge import base_model
from balcony_edge.base_model import DEFAULT_BASE, load_base_model, resolve_base_folder
from balcony_edge.errors import BaseModelError

from conftest import make_base_folder


def test_default_model_is_smollm2_from_the_embedded_gguf(smollm2):
    config = smollm2.model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert smollm2.identity.name == DEFAULT_BASE and len(smollm2.identity.sha256) == 64
    assert not smollm2.model.training and not any(p.requires_grad for p in smollm2.model.parameters())
    assert smollm2.tokenizer.chat_template
    # Converted once: the folder is reused and the identity is stable.
    assert resolve_base_folder(DEFAULT_BASE)[0] == smollm2.folder


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_hugging_face_folders_of_each_family_load(tmp_path, model_type):
    loaded = load_base_model(str(make_base_folder(tmp_path, model_type)))
    assert loaded.identity.model_type == model_type and loaded.identity.num_layers == 4


def test_identity_hash_follows_the_weights(tmp_path):
    a = load_base_model(str(make_base_folder(tmp_path / "a", seed=0)))
    again = load_base_model(str(tmp_path / "a"))
    b = load_base_model(str(make_base_folder(tmp_path / "b", seed=1)))
    assert a.identity.sha256 == again.identity.sha256 != b.identity.sha256


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), arch="gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BaseModelError, match="architecture 'gpt2'"):
        load_base_model(str(path))


def test_no_disk_space_for_the_cache_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base_model.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1_000_000})())
    with pytest.raises(BaseModelError, match="not enough disk space.*BALCONY_EDGE_CACHE"):
        load_base_model(DEFAULT_BASE)
    assert not any((tmp_path / "cache").rglob("config.json"))
