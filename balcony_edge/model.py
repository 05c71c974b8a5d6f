"""The Balcony model: a frozen decoder LM plus, at each exit depth k, a trainable decoder layer and RMSNorm.

Exit k computes lm_head(norm_k(balcony_k(h_k))), where h_k is the hidden state after k backbone layers.
A balcony is one decoder layer by default; `BalconyConfig.deeper` gives an exit more (the capacity experiment,
docs/training.md), the layers after the first starting as the identity (their output projections zero).
One backbone pass yields every exit's hidden states; `exit_model(k)` is the same computation as an
ordinary causal LM of k + n layers (n: the balcony's layers; shared modules, no copies), used for generation
and export.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from balcony_edge.common.errors import ExitsError
from balcony_edge.exits import parse_exits

if TYPE_CHECKING:
    from balcony_edge.base_model import CausalLM

BALCONY_INITS = ("last", "random")
MAX_BALCONY_LAYERS = 4
NORM_INITS = ("final", "exit_input")
# Measured on SmolLM2-135M (docs/training.md, "Initialisation"): the final norm's gains start the exit logits at the
# right temperature; the exit layer's input norm (gains near 0.3) starts them far too flat.
DEFAULT_NORM_INIT = "final"


@dataclass(frozen=True)
class BalconyConfig:
    """Which exits carry a balcony and how the balconies start."""

    exits: tuple[int, ...]
    balcony_init: str = "last"
    norm_init: str = DEFAULT_NORM_INIT
    # (exit, layers) for each exit whose balcony has more than one decoder layer; every other exit has one.
    deeper: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.balcony_init not in BALCONY_INITS:
            raise ExitsError(f"balcony init {self.balcony_init!r} is unknown; choose one of {', '.join(BALCONY_INITS)}")
        if self.norm_init not in NORM_INITS:
            raise ExitsError(f"norm init {self.norm_init!r} is unknown; choose one of {', '.join(NORM_INITS)}")
        for k, n in self.deeper:
            if k not in self.exits:
                listed = ",".join(map(str, self.exits))
                raise ExitsError(f"balcony layers given for exit {k}, which is not one of the exits {listed}")
            if not 2 <= n <= MAX_BALCONY_LAYERS:  # (exit, 1) is the default, written as no entry
                raise ExitsError(f"exit {k}'s balcony of {n} layers: give 1 to {MAX_BALCONY_LAYERS}")
        if len({k for k, _ in self.deeper}) != len(self.deeper):
            raise ExitsError(f"balcony layers name exit {self.deeper[0][0]} twice; give each exit once")

    def layers_at(self, k: int) -> int:
        """Decoder layers in exit k's balcony."""
        return dict(self.deeper).get(k, 1)


@dataclass
class ExitHiddens:
    """Hidden states of one backbone pass: final (normed), backbone h_k, and each exit's normed balcony output."""

    final: torch.Tensor
    backbone: dict[int, torch.Tensor] = field(default_factory=dict)
    exits: dict[int, torch.Tensor] = field(default_factory=dict)


_LAYER_KWARGS = ("attention_mask", "position_embeddings", "position_ids")


class BalconyModel(nn.Module):
    """Frozen base causal LM with a balcony (one decoder layer, or more) and RMSNorm per exit; the LM head is shared."""

    def __init__(self, base: CausalLM, config: BalconyConfig, seed: int = 0):
        super().__init__()
        self.base = base
        self.base.eval()
        self.base.requires_grad_(False)
        exits = parse_exits(config.exits, self.num_layers)
        self.config = BalconyConfig(exits, config.balcony_init, config.norm_init, config.deeper)
        for k, n in self.config.deeper:
            if k + n >= self.num_layers:
                raise ExitsError(
                    f"exit {k}'s balcony of {n} layers would run {k + n} of the base's {self.num_layers} layers, "
                    f"no fewer than the full model; give it at most {max(1, self.num_layers - k - 1)}"
                )
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.balconies = nn.ModuleDict({str(k): self._new_balcony(k) for k in self.exits})
        torch.random.set_rng_state(generator_state)
        # The layers after a balcony's first, for exits with a deeper balcony (`balcony_layers(k)` lists them all).
        self.extra_layers = nn.ModuleDict(
            {str(k): nn.ModuleList(self._new_extra_layer(k + i) for i in range(1, n)) for k, n in self.config.deeper}
        )
        self.norms = nn.ModuleDict({str(k): self._new_norm(k) for k in self.exits})
        self._exit_models: dict[int, CausalLM] = {}

    @property
    def exits(self) -> tuple[int, ...]:
        return self.config.exits

    @property
    def num_layers(self) -> int:
        return self.base.config.num_hidden_layers

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.model.layers

    def _layer_copy(self, slot: int) -> nn.Module:
        """A trainable copy of the last backbone layer whose attention writes KV-cache slot `slot` of the exit model."""
        layer = copy.deepcopy(self.layers[-1])
        attention: Any = layer.get_submodule("self_attn")  # transformers' attention, whose layer_idx is a plain int
        attention.layer_idx = slot
        return layer.requires_grad_(True)

    def _new_balcony(self, k: int) -> nn.Module:
        layer = self._layer_copy(k)  # the first layer after backbone layer k - 1: slot k
        if self.config.balcony_init == "random":
            std = getattr(self.base.config, "initializer_range", 0.02)
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif type(module).__name__.endswith("RMSNorm"):
                    nn.init.ones_(module.get_parameter("weight"))
        return layer

    def _new_extra_layer(self, slot: int) -> nn.Module:
        """A balcony layer after the first: a copy of the last layer whose output projections are zero, so that it
        starts as the identity (the exit computes what it did with one layer) and learns a residual."""
        layer = self._layer_copy(slot)
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            projection: Any = layer.get_submodule(name)
            nn.init.zeros_(projection.weight)
            if projection.bias is not None:
                nn.init.zeros_(projection.bias)
        return layer

    def balcony_layers(self, k: int) -> list[nn.Module]:
        """Exit k's balcony, its decoder layers in order."""
        extra: Any = self.extra_layers[str(k)] if str(k) in self.extra_layers else []  # a ModuleList
        return [self.balconies[str(k)], *extra]

    def _new_norm(self, k: int) -> nn.Module:
        final = self.config.norm_init == "final"
        source = self.base.get_submodule("model.norm") if final else self.layers[k].get_submodule("input_layernorm")
        return copy.deepcopy(source).requires_grad_(True)

    def train(self, mode: bool = True) -> BalconyModel:
        super().train(mode)
        self.base.eval()  # the backbone never leaves eval mode
        return self

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared, frozen LM head: hidden [..., d] -> logits [..., vocab]."""
        return self.base.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor) -> ExitHiddens:
        """One backbone pass over packed (unpadded) token blocks [batch, seq]; balconies run on h_k."""
        captured: dict[int, torch.Tensor] = {}
        layer_kwargs: dict = {}

        def keep_output(k):
            return lambda module, args, output: captured.__setitem__(k, output)

        def keep_kwargs(module, args, kwargs):
            layer_kwargs.update({name: kwargs.get(name) for name in _LAYER_KWARGS})

        # The balcony is a copy of the last layer, so it takes the mask that layer gets (sliding windows too).
        hooks = [self.layers[k - 1].register_forward_hook(keep_output(k)) for k in self.exits]
        hooks.append(self.layers[-1].register_forward_pre_hook(keep_kwargs, with_kwargs=True))
        try:
            with torch.no_grad():
                final = self.base.model(input_ids=input_ids, use_cache=False).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        hiddens = ExitHiddens(final=final, backbone=captured)
        for k in self.exits:
            hidden = captured[k]
            for layer in self.balcony_layers(k):
                hidden = layer(hidden, **layer_kwargs)
            hiddens.exits[k] = self.norms[str(k)](hidden)
        return hiddens

    @torch.no_grad()
    def all_logits(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Logits of every exit and of the full model (key num_layers) from one backbone pass."""
        hiddens = self.forward(input_ids)
        logits = {k: self.head(h) for k, h in hiddens.exits.items()}
        logits[self.num_layers] = self.head(hiddens.final)
        return logits

    def exit_model(self, k: int) -> CausalLM:
        """Exit k as an ordinary causal LM of k + n layers (n: its balcony's) sharing this model's modules
        (k = num_layers: the base)."""
        if k == self.num_layers:
            return self.base
        if k not in self.exits:
            raise ExitsError(
                f"exit {k} has no balcony; trained exits: "
                f"{', '.join(map(str, self.exits))} (or {self.num_layers}, the full model)"
            )
        if k not in self._exit_models:
            balcony = self.balcony_layers(k)
            config = copy.deepcopy(self.base.config)
            config.num_hidden_layers = self.exit_layers(k)
            if getattr(config, "layer_types", None):
                config.layer_types = list(config.layer_types[:k]) + [config.layer_types[-1]] * len(balcony)
            with torch.device("meta"):
                model = type(self.base)(config)
            model.model.embed_tokens = self.base.model.embed_tokens
            model.model.layers = nn.ModuleList([*self.layers[:k], *balcony])
            model.model.norm = self.norms[str(k)]
            model.model.rotary_emb = self.base.model.rotary_emb
            model.lm_head = self.base.lm_head
            model.generation_config = self.base.generation_config
            self._exit_models[k] = model.eval()
        return self._exit_models[k]

    def exit_layers(self, k: int) -> int:
        """Decoder layers exit k runs: k backbone layers and its balcony's (the full model's L for k = L)."""
        return k if k == self.num_layers else k + self.config.layers_at(k)

    def balcony_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the trainable tensors: `balconies.{k}.*`, `extra_layers.{k}.{i}.*` and `norms.{k}.*`."""
        prefixes = ("balconies.", "extra_layers.", "norms.")
        return {name: tensor for name, tensor in self.state_dict().items() if name.startswith(prefixes)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
