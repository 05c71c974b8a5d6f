"""The Balcony model: frozen backbone, exact full-depth logits, one pass equal to separate exit models."""

import pytest
import torch
from conftest import make_base_folder

from balcony_edge.base_model import load_base_model
from balcony_edge.checkpoint import build_model
from balcony_edge.common.errors import ExitsError
from balcony_edge.exits import parse_exits
from balcony_edge.generate import generate_greedy
from balcony_edge.model import BalconyConfig


def _ids(base, n=2, seq=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, base.model.config.vocab_size, (n, seq), generator=generator)


def test_exit_list_is_validated_and_sorted():
    assert parse_exits("24, 8,16", 30) == (8, 16, 24)
    assert parse_exits([3, 1], 4) == (1, 3)
    cases = (
        ("0,8", "out of range"),
        ("8,30", "out of range"),
        ("8,8", "twice"),
        ("8,x", "not an integer"),
        ("", "no exits"),
        ("8.5", "not an integer"),
    )
    for bad, words in cases:
        with pytest.raises(ExitsError, match=words):
            parse_exits(bad, 30)


def test_backbone_is_frozen_and_stays_in_eval_mode(tiny_base):
    model = build_model(tiny_base, BalconyConfig((1, 2)))
    model.train()
    assert not model.base.training
    assert all(not p.requires_grad for p in model.base.parameters())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("balconies.", "norms.")) for name in trainable)


def test_full_depth_logits_equal_the_base_model(tiny_base):
    model = build_model(tiny_base, BalconyConfig((1, 3)))
    ids = _ids(tiny_base)
    logits = model.all_logits(ids)
    torch.testing.assert_close(logits[model.num_layers], tiny_base.model(ids).logits, rtol=0, atol=0)


def test_balconies_change_nothing_of_the_backbone(tiny_base):
    before = {k: v.clone() for k, v in tiny_base.model.state_dict().items()}
    model = build_model(tiny_base, BalconyConfig((1, 2, 3)))
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    hiddens = model(_ids(tiny_base))
    sum(model.head(h).logsumexp(-1).mean() for h in hiddens.exits.values()).backward()
    optimizer.step()
    for name, tensor in tiny_base.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_one_backbone_pass_gives_the_logits_of_separate_exit_models(tmp_path, model_type):
    base = load_base_model(str(make_base_folder(tmp_path, model_type)))
    model = build_model(base, BalconyConfig((1, 2, 3)))
    ids = _ids(base, seq=20)
    together = model.all_logits(ids)
    for k in model.exits:
        separate = model.exit_model(k)(ids).logits
        assert model.exit_model(k).config.num_hidden_layers == k + 1
        torch.testing.assert_close(together[k], separate, rtol=1e-5, atol=1e-5)


def test_balcony_initialisations(tiny_base):
    last = tiny_base.model.model.layers[-1]
    copied = build_model(tiny_base, BalconyConfig((2,), "last", "final"))
    torch.testing.assert_close(copied.balconies["2"].mlp.down_proj.weight, last.mlp.down_proj.weight)
    torch.testing.assert_close(copied.norms["2"].weight, tiny_base.model.model.norm.weight)
    random_init = build_model(tiny_base, BalconyConfig((2,), "random", "exit_input"))
    assert not torch.equal(random_init.balconies["2"].mlp.down_proj.weight, last.mlp.down_proj.weight)
    torch.testing.assert_close(random_init.norms["2"].weight, tiny_base.model.model.layers[2].input_layernorm.weight)
    with pytest.raises(ExitsError, match="balcony init"):
        BalconyConfig((2,), "middle")


def test_cached_greedy_generation_equals_recomputing_the_whole_prefix(tiny_base):
    model = build_model(tiny_base, BalconyConfig((2,), "random"))
    prompt = [5, 17, 42, 7]
    for depth in (2, model.num_layers):
        new = generate_greedy(model, depth, prompt, max_new_tokens=10)
        ids = list(prompt)
        for _ in range(10):
            ids.append(int(model.exit_model(depth)(torch.tensor([ids])).logits[0, -1].argmax()))
        assert new == ids[len(prompt) :]


def test_exit_model_refuses_an_untrained_exit(tiny_base):
    model = build_model(tiny_base, BalconyConfig((2,)))
    with pytest.raises(ExitsError, match="trained exits: 2"):
        model.exit_model(1)


def test_a_deeper_balcony_starts_as_its_first_layer_and_runs_as_an_exit_model_of_k_plus_n_layers(tiny_base):
    shallow = build_model(tiny_base, BalconyConfig((1, 2)))
    deeper = build_model(tiny_base, BalconyConfig((1, 2), deeper=((1, 2),)))
    assert [len(deeper.balcony_layers(k)) for k in (1, 2)] == [2, 1]
    ids = _ids(tiny_base, seq=12)
    start = deeper.all_logits(ids)
    torch.testing.assert_close(start[1], shallow.all_logits(ids)[1], rtol=1e-5, atol=1e-5)  # the identity start
    for layer in deeper.balcony_layers(1)[1:]:
        torch.nn.init.normal_(layer.get_submodule("mlp.down_proj").weight, std=0.2)
    trained = deeper.all_logits(ids)
    assert not torch.allclose(trained[1], start[1])
    assert deeper.exit_model(1).config.num_hidden_layers == deeper.exit_layers(1) == 3
    torch.testing.assert_close(trained[1], deeper.exit_model(1)(ids).logits, rtol=1e-5, atol=1e-5)
    ids = [5, 17, 42]
    for _ in range(6):  # the cached generation (the extra layer's own KV slot) is the uncached one
        ids.append(int(deeper.exit_model(1)(torch.tensor([ids])).logits[0, -1].argmax()))
    assert generate_greedy(deeper, 1, [5, 17, 42], max_new_tokens=6) == ids[3:]
    assert any(name.startswith("extra_layers.1.0.") for name in deeper.balcony_state_dict())


@pytest.mark.parametrize(
    ("deeper", "match"),
    [(((3, 2),), "not one of the exits"), (((1, 9),), "give 1 to 4"), (((1, 2), (1, 3)), "name exit 1 twice")],
)
def test_balcony_layers_are_checked(deeper, match):
    with pytest.raises(ExitsError, match=match):
        BalconyConfig((1, 2), deeper=deeper)


def test_a_balcony_may_not_run_as_many_layers_as_the_full_model(tiny_base):
    layers = tiny_base.identity.num_layers
    with pytest.raises(ExitsError, match=f"would run {layers} of the base's {layers} layers.*at most 1"):
        build_model(tiny_base, BalconyConfig((layers - 2,), deeper=((layers - 2, 2),)))
