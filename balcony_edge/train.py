"""Self-distillation training of the balconies: AdamW, warmup + cosine, accumulation, clipping, budgets,
atomic periodic checkpoints, exact --resume, and DDP under torchrun (gradients only for the balconies)."""

from __future__ import annotations

import math
import os
import random
import reprlib
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from balcony_edge.base_model import DEFAULT_BASE, BaseModel, load_base_model
from balcony_edge.checkpoint import (
    STATE_FILE,
    WEIGHTS_FILE,
    build_model,
    copy_balcony_weights,
    is_checkpoint_folder,
    read_info,
    read_weights,
    resume_hint,
    save_checkpoint,
)
from balcony_edge.common.atomic import exclusive_target, readable_folder
from balcony_edge.common.console import console, log_warning, say
from balcony_edge.common.errors import BalconyError, CheckpointError, TrainingStopped
from balcony_edge.common.paths import check_replace_target
from balcony_edge.common.validation import is_finite_number, is_whole_number
from balcony_edge.data import DEFAULT_CORPUS, check_sources, load_corpus, pack, weighted_sources
from balcony_edge.distill import DIVERGENCES, distill_backward
from balcony_edge.exits import parse_balcony_layers, parse_exits
from balcony_edge.model import (
    BALCONY_INITS,
    DEFAULT_NORM_INIT,
    NORM_INITS,
    BalconyConfig,
    BalconyModel,
)
from balcony_edge.on_policy import OnPolicy, OnPolicySettings
from balcony_edge.precision import fast_bf16

PRECISIONS = ("auto", "bf16", "fp32")
# Fields that may differ on --resume without changing the computation of the steps still to run.
RESUMABLE_FIELDS = ("out", "max_minutes", "save_every", "save_dtype", "threads")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# What training_state.pt holds, by type: checked before any of it is used.
STATE_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "step": int,
    "tokens_seen": int,
    "wall_seconds": float,
    "kl_history": list,
    "rng": (dict, list),
    "init_training": (dict, type(None)),
}
# Of the saved TrainConfig values, compared on --resume.
SETTING_TYPES = (str, int, float, type(None), list, tuple)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# Each numeric TrainConfig field: its rule as the error message states it, and the test of a value.
MAX_ANSWERS, MAX_ANSWER_TOKENS = 256, 4096  # per exit and step, written and trained on as one batch
COUNT = ("an integer of at least 1", lambda v: is_whole_number(v) and v >= 1)
POSITIVE = ("a positive finite number", lambda v: is_finite_number(v) and v > 0)
FRACTION = ("a number from 0 to 1", lambda v: is_finite_number(v) and 0 <= v <= 1)
FIELD_RULES = {
    "seq_len": COUNT,
    "batch_size": COUNT,
    "micro_batch_size": COUNT,
    "lr": POSITIVE,
    "min_lr_ratio": FRACTION,
    "warmup_fraction": FRACTION,
    "weight_decay": ("zero or a positive finite number", lambda v: is_finite_number(v) and v >= 0),
    "grad_clip": POSITIVE,
    "epochs": POSITIVE,
    "max_tokens": COUNT,
    "max_minutes": POSITIVE,
    "save_every": COUNT,
    "seed": ("an integer of at least 0", lambda v: is_whole_number(v) and v >= 0),
    "threads": COUNT,
    "kl_chunk": COUNT,
    "distill_top_k": ("an integer of at least 0", lambda v: is_whole_number(v) and v >= 0),
    # One step writes on_policy answers of up to answer_tokens per exit as one batch, then trains on them as one.
    "on_policy": (f"an integer from 0 to {MAX_ANSWERS}", lambda v: is_whole_number(v) and 0 <= v <= MAX_ANSWERS),
    "answer_tokens": (
        f"an integer from 1 to {MAX_ANSWER_TOKENS}",
        lambda v: is_whole_number(v) and 1 <= v <= MAX_ANSWER_TOKENS,
    ),
    "answer_temperature": POSITIVE,
    "on_policy_weight": POSITIVE,
}
OPTIONAL_FIELDS = ("epochs", "max_tokens", "max_minutes", "threads", "init_from")  # None: not given
CHOICES = {
    "precision": PRECISIONS,
    "save_dtype": tuple(SAVE_DTYPES),
    "balcony_init": BALCONY_INITS,
    "norm_init": NORM_INITS,
    "divergence": DIVERGENCES,
}


def _flag(name: str) -> str:
    """The command-line option of a TrainConfig field."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything that decides a training run (saved with it; --resume must not change the run-defining fields)."""

    exits: tuple[int, ...]
    out: str
    base: str = DEFAULT_BASE
    data: list[str] = field(default_factory=list)
    seq_len: int = 512
    batch_size: int = 16  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 4  # sequences per forward on one rank
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    epochs: float | None = None  # passes over the data; None: 1, unless max_tokens is given
    max_tokens: int | None = None  # schedule horizon; default: epochs x training tokens
    max_minutes: float | None = None  # wall-clock stop for this invocation (min)
    save_every: int = 100  # steps
    seed: int = 0
    precision: str = "auto"
    balcony_init: str = "last"
    norm_init: str = DEFAULT_NORM_INIT
    balcony_layers: str = ""  # EXIT:LAYERS for balconies of more than one decoder layer, such as "8:2"
    kl_chunk: int = 256  # tokens
    distill_top_k: int = 32  # KL over the union of the teacher's top-k tokens per chunk; 0: the whole vocabulary
    save_dtype: str = "fp32"
    threads: int | None = None
    init_from: str | None = None  # a checkpoint folder whose balconies (same base; its exits or more) start this run
    on_policy: int = 0  # answers each exit writes per step (and rank) to train on (on_policy.py); 0: off
    answer_tokens: int = 128  # the longest answer, tokens
    answer_temperature: float = 1.0
    divergence: str = "forward"
    on_policy_weight: float = 1.0  # of the on-policy loss beside the teacher-forced one

    def __post_init__(self) -> None:
        self.exits = parse_exits(self.exits, None)  # the syntax now; the range once the base model's depth is known
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise BalconyError(
                    f"{_flag(name)} {reprlib.repr(getattr(self, name))} is unknown; choose one of {', '.join(choices)}"
                )
        for name, (rule, valid) in FIELD_RULES.items():
            value = getattr(self, name)
            if not (value is None and name in OPTIONAL_FIELDS) and not valid(value):
                raise BalconyError(f"{_flag(name)} must be {rule}, not {reprlib.repr(value)}")
        if not isinstance(self.balcony_layers, str):
            raise BalconyError(f"--balcony-layers must be text such as '8:2', not {reprlib.repr(self.balcony_layers)}")
        deeper = BalconyConfig(self.exits, deeper=parse_balcony_layers(self.balcony_layers, self.exits)).deeper
        self.balcony_layers = ",".join(f"{k}:{n}" for k, n in deeper)  # one spelling, compared on --resume
        if self.micro_batch_size > self.batch_size:
            raise BalconyError(
                f"--micro-batch-size {self.micro_batch_size} is larger than "
                f"--batch-size {self.batch_size}; give at most {self.batch_size}"
            )
        if self.epochs is not None and self.max_tokens is not None:
            raise BalconyError("--epochs and --max-tokens both set; give one of them")


@dataclass
class Distributed:
    """This process's place among torchrun's ranks (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device, backend = torch.device("cuda", local_rank), "nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank=dist.get_rank(), world=dist.get_world_size(), device=device)

    @property
    def main(self) -> bool:
        return self.rank == 0


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class BlockOrder:
    """Which training block is the g-th of the run: a fresh seeded permutation every epoch, so a step alone fixes the
    data position."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed = num_blocks, seed
        self._perms: dict[int, torch.Tensor] = {}

    def __getitem__(self, g: int) -> int:
        epoch, index = divmod(g, self.num_blocks)
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_blocks, generator=generator)}
        return int(self._perms[epoch][index])


class MixedOrder:
    """Block order over several sources by weight: each position of an epoch (as many positions as blocks in all)
    draws its source with the weights, seeded per epoch; a source's draws walk a fresh permutation of its blocks,
    wrapping when the weight asks for more than it has. Blocks are numbered across sources in order, and a step
    alone fixes the data position, as in BlockOrder."""

    def __init__(self, source_blocks: list[int], weights: list[float], seed: int):
        self.sizes, self.seed = source_blocks, seed
        self._epochs: dict[int, torch.Tensor] = {}
        self.offsets = [sum(source_blocks[:i]) for i in range(len(source_blocks))]
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.num_blocks = sum(source_blocks)

    def _epoch(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        sources = torch.multinomial(self.weights, self.num_blocks, replacement=True, generator=generator)
        order = torch.empty(self.num_blocks, dtype=torch.long)
        for s, size in enumerate(self.sizes):
            where = (sources == s).nonzero().flatten()
            perm = torch.randperm(size, generator=generator)
            order[where] = self.offsets[s] + perm[torch.arange(len(where)) % size]
        return order

    def __getitem__(self, g: int) -> int:
        epoch, index = divmod(g, self.num_blocks)
        if epoch not in self._epochs:
            self._epochs = {epoch: self._epoch(epoch)}
        return int(self._epochs[epoch][index])


def rng_state() -> dict:
    """This process's random generator states, as tensors, ints, floats, strings and tuples (weights_only loads
    them)."""
    # numpy's global generator is an MT19937, whose legacy state is this tuple.
    name, key, *rest = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state(legacy=True))
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": (name, key.tolist(), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Put back the generator states that rng_state() returned."""
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopSignals:
    """While entered (in the main thread), the first SIGINT or SIGTERM is only noted; a second one acts as it did
    before."""

    def __init__(self):
        self.received = 0  # the first signal's number; 0: none yet
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python handles signals only there
            self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler not set from Python

    def __exit__(self, *exc) -> None:
        self._restore()


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return fast_bf16(device)
    return precision == "bf16"


class Trainer:
    """One training run: set up from a TrainConfig (fresh or resumed), then `run()`."""

    def __init__(self, config: TrainConfig, base: BaseModel | None = None, resume: bool = False, force: bool = False):
        """force: replace a checkpoint already in config.out (never a folder of other files)."""
        self.config = config
        self.out = Path(config.out)
        if resume and force:
            raise BalconyError("--resume and --force both given: continue the run in --out, or replace it; give one")
        check_replace_target(
            self.out,
            resume or force,
            is_checkpoint_folder,
            "a balcony-edge checkpoint",
            "continue it with --resume, or replace it with --force",
            error=CheckpointError,
        )
        self.dist = Distributed.from_env()
        if config.threads:
            torch.set_num_threads(config.threads)
        per_step = config.micro_batch_size * self.dist.world
        if config.batch_size % per_step:
            raise BalconyError(
                f"--batch-size {config.batch_size} is not a multiple of "
                f"--micro-batch-size x ranks = {per_step}; change one of them"
            )
        self.accum = config.batch_size // per_step
        check_sources(config.data)
        self.base = base or load_base_model(config.base)
        exits = parse_exits(config.exits, self.base.identity.num_layers)
        config.exits = exits
        resume_state = self._resume_state() if resume else None

        torch.manual_seed(config.seed)
        self.model: BalconyModel = build_model(
            self.base,
            BalconyConfig(
                exits, config.balcony_init, config.norm_init, parse_balcony_layers(config.balcony_layers, exits)
            ),
            seed=config.seed,
        )
        # What the run started from (--init-from): that checkpoint's training record, kept in this run's record.
        self.init_training = None
        if config.init_from:
            self.init_training = (
                self._start_from(Path(config.init_from)) if resume_state is None else resume_state["init_training"]
            )
        self.model.to(self.dist.device).train()
        sources = weighted_sources(config.data)
        if sources is None:
            self.blocks = pack(load_corpus(config.data).train, self.base.tokenizer, config.seq_len)
            self.order: BlockOrder | MixedOrder = BlockOrder(len(self.blocks), config.seed)
        else:
            parts = [pack(load_corpus([source.path]).train, self.base.tokenizer, config.seq_len) for source in sources]
            self.blocks = torch.cat(parts)
            self.order = MixedOrder([len(part) for part in parts], [source.weight for source in sources], config.seed)
        tokens_per_step = config.batch_size * config.seq_len
        epochs = 1.0 if config.epochs is None else config.epochs
        horizon = config.max_tokens or int(epochs * len(self.blocks) * config.seq_len)
        self.total_steps = max(1, math.ceil(horizon / tokens_per_step))
        self.warmup_steps = max(1, int(config.warmup_fraction * self.total_steps))
        params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, config.min_lr_ratio)
        )
        self.on_policy = None
        if config.on_policy:
            settings = OnPolicySettings(
                config.on_policy,
                config.answer_tokens,
                config.answer_temperature,
                config.divergence,
                config.on_policy_weight,
            )
            self.on_policy = OnPolicy(
                self.model, self.base.tokenizer, settings, config.seed, self.dist.rank, self.dist.world
            )
        self.step, self.tokens_seen, self.on_policy_tokens, self.wall_before = 0, 0, 0, 0.0
        self.kl_history: list[dict] = []
        if resume_state is not None:
            self._restore(resume_state)
        self.ddp = None
        if self.dist.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None
            )
        self.bf16 = _use_bf16(config.precision, self.dist.device)

    def _resume_state(self) -> dict:
        folder = readable_folder(self.out)
        path = folder / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"--resume: {path} not found; start without --resume or point --out at a run folder")
        self._check_same_balconies(read_info(folder), "--resume", self.out, "trains", "resume with")
        state = _load_training_state(path)
        # A setting newer than the run's state file was, for that run, its default (how the older code behaved).
        saved = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING} | state["config"]
        for name, value in asdict(self.config).items():
            if name in RESUMABLE_FIELDS or name == "exits":
                continue
            if saved.get(name) != value:
                raise CheckpointError(
                    f"--resume: {self.out} was trained with {name}={reprlib.repr(saved.get(name))}, "
                    f"not {value!r}; resume with the same settings"
                )
        return state

    def _check_same_base(self, info, option: str, folder: Path, fix: str) -> None:
        """Refuse a checkpoint (to resume or start from) trained on another base model."""
        if info.base["sha256"] != self.base.identity.sha256:
            raise CheckpointError(
                f"{option}: {folder} was trained on base {info.base.get('name')!r}, "
                f"not {self.base.identity.name!r}; {fix} the same --base"
            )

    def _check_same_balconies(self, info, option: str, folder: Path, verb: str, fix: str) -> None:
        """Refuse a checkpoint to resume of another base model or other exits."""
        self._check_same_base(info, option, folder, fix)
        if tuple(info.config.exits) != tuple(self.config.exits):
            theirs = ",".join(map(str, info.config.exits))
            raise CheckpointError(
                f"{option}: {folder} {verb} exits {theirs}, not "
                f"{','.join(map(str, self.config.exits))}; {fix} --exits {theirs}"
            )

    def _check_can_start_from(self, info, folder: Path) -> None:
        """Refuse a checkpoint to start from (--init-from) of another base model, without a balcony at an exit this
        run trains, or with a deeper one there; it may hold more exits and shallower balconies."""
        self._check_same_base(info, "--init-from", folder, "train with")
        for k in self.config.exits:
            if k not in info.config.exits:
                raise CheckpointError(
                    f"--init-from: {folder} holds no balcony at exit {k}; "
                    f"train --exits among those it holds ({','.join(map(str, info.config.exits))})"
                )
            n = info.config.layers_at(k)
            if n > self.model.config.layers_at(k):
                raise CheckpointError(
                    f"--init-from: {folder} holds a balcony of {n} layers at exit {k}; "
                    f"give --balcony-layers {k}:{n} or more"
                )

    def _start_from(self, folder: Path) -> dict:
        """Copy a trained checkpoint's balconies into the fresh model; returns that checkpoint's training record."""
        folder = readable_folder(folder)
        info = read_info(folder)
        self._check_can_start_from(info, folder)
        copy_balcony_weights(self.model, read_weights(folder), folder / WEIGHTS_FILE, start_from=info.config)
        before, c = info.training or {}, self.config
        if (
            before.get("seed") == c.seed
            and before.get("data") == (c.data or [DEFAULT_CORPUS])
            and before.get("seq_len") == c.seq_len
        ):
            log_warning(
                f"--init-from {folder} was trained on the same data with "
                f"the same --seed {c.seed}: this run would see its text "
                "again, in the same order; give another --seed to draw other text"
            )
        return info.training

    def _restore(self, state: dict) -> None:
        path = self.out / STATE_FILE
        copy_balcony_weights(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            restore_rng_state(state["rng"][self.dist.rank] if isinstance(state["rng"], list) else state["rng"])
        except Exception as err:  # noqa: BLE001 - damaged values fail in many ways (KeyError, OverflowError, ...)
            raise CheckpointError(
                f"--resume: {path} does not fit this run ({type(err).__name__}: "
                f"{reprlib.repr(str(err))}); restore the file, or train again without --resume"
            ) from None
        self.step, self.tokens_seen, self.wall_before = state["step"], state["tokens_seen"], state["wall_seconds"]
        self.on_policy_tokens = state.get("on_policy_tokens", 0)  # absent from states written before on-policy training
        self.kl_history = state["kl_history"]

    def _micro_batches(self, step: int):
        """This rank's micro-batches of the step's global batch: [micro, seq_len] each."""
        c = self.config
        per_rank = c.batch_size // self.dist.world
        first = step * c.batch_size + self.dist.rank * per_rank
        indices = [self.order[g] for g in range(first, first + per_rank)]
        for start in range(0, per_rank, c.micro_batch_size):
            yield self.blocks[indices[start : start + c.micro_batch_size]].to(self.dist.device)

    def train_step(self, step: int) -> tuple[dict[int, float], dict[int, float], int]:
        """One optimizer step; returns this rank's mean teacher-forced KL per exit (nats/token), its mean on-policy
        divergence per exit (empty without on-policy training) and the answer tokens that divergence saw."""
        module = self.ddp or self.model
        kl = {k: 0.0 for k in self.model.exits}
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        on_policy, answer_tokens = {}, 0
        if self.on_policy is not None:  # first, so that the last teacher-forced micro-batch's backward syncs ranks
            written = self.on_policy.write(step, autocast)
            answer_tokens = sum(t.answer_tokens for t in written.values())
            with nullcontext() if self.ddp is None else self.ddp.no_sync():
                on_policy = self.on_policy.backward(module, written, self.config.kl_chunk, autocast)
        for i, batch in enumerate(self._micro_batches(step)):
            last = i == self.accum - 1
            sync = nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                with autocast:
                    hiddens = module(batch)
                    step_kl = distill_backward(
                        self.model.base.lm_head,
                        hiddens.final,
                        hiddens.exits,
                        1.0 / self.accum,
                        self.config.kl_chunk,
                        self.config.distill_top_k,
                    )
            for k, value in step_kl.items():
                kl[k] += value / self.accum
        torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return kl, on_policy, answer_tokens

    def _state(self) -> dict:
        rng: dict | list[dict | None] = rng_state()
        if self.dist.world > 1:
            gathered: list[dict | None] = [None] * self.dist.world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        return {
            "config": asdict(self.config),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.balcony_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "on_policy_tokens": self.on_policy_tokens,
            "wall_seconds": self.wall_before + (time.monotonic() - self.started),
            "kl_history": self.kl_history,
            "rng": rng,
            "init_training": self.init_training,
        }

    def summary(self) -> dict:
        c = self.config
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens_seen": self.tokens_seen,
            "wall_seconds": round(self.wall_before + (time.monotonic() - self.started), 1),
            "data": c.data or [DEFAULT_CORPUS],
            "seq_len": c.seq_len,
            "batch_size": c.batch_size,
            "lr": c.lr,
            "distill_top_k": c.distill_top_k,
            **(
                {
                    "on_policy": {
                        "answers_per_exit": c.on_policy,
                        "max_new_tokens": c.answer_tokens,
                        "temperature": c.answer_temperature,
                        "divergence": c.divergence,
                        "weight": c.on_policy_weight,
                        "answer_tokens": self.on_policy_tokens,
                    }
                }
                if c.on_policy
                else {}
            ),
            "seed": c.seed,  # with the data, it fixes which text each step saw
            "precision": "bf16" if self.bf16 else "fp32",
            "ranks": self.dist.world,
            **({"init_from": {"path": c.init_from, "training": self.init_training}} if c.init_from else {}),
            "final_kl": self.kl_history[-1]["kl"] if self.kl_history else None,
        }

    def save(self) -> None:
        state = self._state()  # every rank takes part in gathering RNG states
        if self.dist.main:
            save_checkpoint(
                self.model,
                self.config.base,
                self.out,
                self.summary(),
                state=state,
                dtype=SAVE_DTYPES[self.config.save_dtype],
            )

    def run(self) -> dict:
        """Train until the schedule ends or a budget is spent; returns the training summary."""
        c = self.config
        self.started = time.monotonic()
        deadline = self.started + c.max_minutes * 60 if c.max_minutes else None
        tokens_per_step = c.batch_size * c.seq_len
        progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("{task.fields[rate]} tok/s"),
            TextColumn("{task.fields[kl]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.dist.main,
        )
        stopped_by = 0
        with progress, StopSignals() as signals:
            task = progress.add_task("train", total=self.total_steps, completed=self.step, rate="-", kl="")
            while self.step < self.total_steps:
                stopped_by, out_of_time = self._stop_request(signals, deadline)
                if stopped_by:
                    break
                if out_of_time:
                    if self.dist.main:
                        say(f"--max-minutes {c.max_minutes} reached at step {self.step}; resume with --resume")
                    break
                tick = time.monotonic()
                kl, on_policy, answer_tokens = self.train_step(self.step)
                self.step += 1
                self.tokens_seen += tokens_per_step
                self.on_policy_tokens += answer_tokens
                rate = (tokens_per_step + answer_tokens) / (time.monotonic() - tick)
                record = {"step": self.step, "kl": {str(k): round(v, 5) for k, v in kl.items()}}
                if on_policy:
                    record |= {
                        "on_policy": {str(k): round(v, 5) for k, v in on_policy.items()},
                        "answer_tokens": answer_tokens,
                    }
                self.kl_history.append(record)
                shown = " ".join(f"KL@{k} {v:.3f}" for k, v in kl.items())
                if on_policy:
                    shown += " | " + " ".join(f"{c.divergence}@{k} {v:.3f}" for k, v in on_policy.items())
                progress.update(task, completed=self.step, rate=f"{rate:,.0f}", kl=shown)
                if self.step % c.save_every == 0 and self.step < self.total_steps:
                    self.save()
                    if self.dist.main and not console.is_terminal:  # a log file gets a line per checkpoint
                        say(f"step {self.step}/{self.total_steps} {shown} {rate:,.0f} tok/s; checkpoint saved")
            self.save()  # inside StopSignals: a first signal now lets the final checkpoint finish
        if stopped_by:
            raise TrainingStopped(
                f"training stopped by {signal.Signals(stopped_by).name} at step {self.step}/{self.total_steps}; "
                f"checkpoint saved in {self.out}; {resume_hint(self.out)}",
                stopped_by,
            )
        return self.summary()

    def _stop_request(self, signals: StopSignals, deadline: float | None) -> tuple[int, bool]:
        """(the stop signal's number or 0, whether --max-minutes is spent), the same on every rank so that all stop
        together."""
        request = torch.tensor([signals.received, deadline is not None and time.monotonic() >= deadline])
        if self.dist.world > 1:
            request = request.to(self.dist.device)
            dist.all_reduce(request, op=dist.ReduceOp.MAX)
        stopped_by, out_of_time = request.tolist()
        return stopped_by, bool(out_of_time)


def _load_training_state(path: Path) -> dict:
    """training_state.pt, unpickled with weights_only (tensors and plain containers: no code runs) and type-checked."""
    try:
        with warnings.catch_warnings():  # a damaged file may also warn (pickle protocol); the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    # noqa: BLE001 - fuzzing a damaged file raises a dozen types (UnpicklingError, KeyError, ...)
    except Exception as err:
        raise CheckpointError(
            f"--resume: {path} is damaged, foreign, or from a balcony-edge before 0.2 (which pickled its RNG state) "
            f"({type(err).__name__}); restore the file, or train again without --resume (its checkpoint still loads)"
        ) from None
    if not (
        isinstance(state, dict)
        and all(isinstance(state.get(key), kind) for key, kind in STATE_TYPES.items())
        and all(isinstance(value, SETTING_TYPES) for value in state["config"].values())
    ):
        raise CheckpointError(
            f"--resume: {path} is not a balcony-edge training state; restore the file, or train again without --resume"
        )
    return state


def train(config: TrainConfig, resume: bool = False, base: BaseModel | None = None, force: bool = False) -> dict:
    """Run `balcony-edge train`: returns the training summary written into the checkpoint. The run folder is locked
    for the whole run (by rank 0): a second run into the same folder is refused at once."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with exclusive_target(Path(config.out), "the training run") if main_rank else nullcontext():
        trainer = Trainer(config, base=base, resume=resume, force=force)
        try:
            return trainer.run()
        finally:
            if trainer.dist.world > 1 and dist.is_initialized():
                dist.destroy_process_group()
