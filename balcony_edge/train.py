"""Self-distillation training of the balconies: AdamW, warmup + cosine, accumulation, clipping, budgets,
atomic periodic checkpoints, exact --resume, and DDP under torchrun (gradients only for the balconies)."""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .base_model import DEFAULT_BASE, BaseModel, load_base_model
from .checkpoint import STATE_FILE, build_model, read_info, save_checkpoint
from .console import console, say
from .data import DEFAULT_CORPUS, load_corpus, pack
from .distill import distill_backward
from .errors import BalconyError, CheckpointError
from .exits import parse_exits
from .model import DEFAULT_NORM_INIT, BalconyConfig, BalconyModel

PRECISIONS = ("auto", "bf16", "fp32")
# Fields that may differ on --resume without changing the computation of the steps still to run.
RESUMABLE_FIELDS = ("out", "max_minutes", "save_every", "save_dtype", "threads")
SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
    epochs: float = 1.0
    max_tokens: int | None = None  # schedule horizon; default: epochs x training tokens
    max_minutes: float | None = None  # wall-clock stop for this invocation (min)
    save_every: int = 100  # steps
    seed: int = 0
    precision: str = "auto"
    balcony_init: str = "last"
    norm_init: str = DEFAULT_NORM_INIT
    kl_chunk: int = 256  # tokens
    save_dtype: str = "fp32"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise BalconyError(f"precision {self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        if self.save_dtype not in SAVE_DTYPES:
            raise BalconyError(f"save dtype {self.save_dtype!r} is unknown; choose one of {', '.join(SAVE_DTYPES)}")
        for name in ("seq_len", "batch_size", "micro_batch_size", "save_every", "kl_chunk"):
            if getattr(self, name) < 1:
                raise BalconyError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise BalconyError(f"--lr must be positive, not {self.lr}")


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
    """Which training block is the g-th of the run: a fresh seeded permutation every epoch, so a step alone fixes the data position."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed, self._perms = num_blocks, seed, {}

    def __getitem__(self, g: int) -> int:
        epoch, index = divmod(g, self.num_blocks)
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_blocks, generator=generator)}
        return int(self._perms[epoch][index])


def _rng_state() -> dict:
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


class Trainer:
    """One training run: set up from a TrainConfig (fresh or resumed), then `run()`."""

    def __init__(self, config: TrainConfig, base: BaseModel | None = None, resume: bool = False):
        self.config = config
        self.dist = Distributed.from_env()
        if config.threads:
            torch.set_num_threads(config.threads)
        per_step = config.micro_batch_size * self.dist.world
        if config.batch_size % per_step:
            raise BalconyError(
                f"--batch-size {config.batch_size} is not a multiple of --micro-batch-size x ranks = {per_step}; "
                "change one of them"
            )
        self.accum = config.batch_size // per_step
        self.base = base or load_base_model(config.base)
        exits = parse_exits(config.exits, self.base.identity.num_layers)
        config.exits = exits
        self.out = Path(config.out)
        resume_state = self._resume_state() if resume else None

        torch.manual_seed(config.seed)
        self.model: BalconyModel = build_model(self.base, BalconyConfig(exits, config.balcony_init, config.norm_init), seed=config.seed)
        self.model.to(self.dist.device).train()
        corpus = load_corpus(config.data)
        self.blocks = pack(corpus.train, self.base.tokenizer, config.seq_len)
        self.order = BlockOrder(len(self.blocks), config.seed)
        tokens_per_step = config.batch_size * config.seq_len
        horizon = config.max_tokens or int(config.epochs * len(self.blocks) * config.seq_len)
        self.total_steps = max(1, math.ceil(horizon / tokens_per_step))
        self.warmup_steps = max(1, int(config.warmup_fraction * self.total_steps))
        params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, self.warmup_steps, config.min_lr_ratio)
        )
        self.step, self.tokens_seen, self.wall_before = 0, 0, 0.0
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
        path = self.out / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"--resume: {path} not found; start without --resume or point --out at a run folder")
        info = read_info(self.out)
        if info.base["sha256"] != self.base.identity.sha256:
            raise CheckpointError(
                f"--resume: {self.out} was trained on base {info.base.get('name')!r}, not {self.base.identity.name!r}; "
                "resume with the same --base"
            )
        if tuple(info.config.exits) != tuple(self.config.exits):
            raise CheckpointError(
                f"--resume: {self.out} trains exits {','.join(map(str, info.config.exits))}, not "
                f"{','.join(map(str, self.config.exits))}; resume with --exits {','.join(map(str, info.config.exits))}"
            )
        state = torch.load(path, weights_only=False)
        saved = state["config"]
        for name, value in asdict(self.config).items():
            if name in RESUMABLE_FIELDS or name == "exits":
                continue
            if saved.get(name) != value:
                raise CheckpointError(
                    f"--resume: {self.out} was trained with {name}={saved.get(name)!r}, not {value!r}; "
                    "resume with the same settings"
                )
        return state

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.tokens_seen, self.wall_before = state["step"], state["tokens_seen"], state["wall_seconds"]
        self.kl_history = state["kl_history"]
        _set_rng_state(state["rng"][self.dist.rank] if isinstance(state["rng"], list) else state["rng"])

    def _micro_batches(self, step: int):
        """This rank's micro-batches of the step's global batch: [micro, seq_len] each."""
        c = self.config
        per_rank = c.batch_size // self.dist.world
        first = step * c.batch_size + self.dist.rank * per_rank
        indices = [self.order[g] for g in range(first, first + per_rank)]
        for start in range(0, per_rank, c.micro_batch_size):
            yield self.blocks[indices[start : start + c.micro_batch_size]].to(self.dist.device)

    def train_step(self, step: int) -> dict[int, float]:
        """One optimizer step; returns this rank's mean KL per exit (nats/token)."""
        module = self.ddp or self.model
        kl = {k: 0.0 for k in self.model.exits}
        autocast = torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        for i, batch in enumerate(self._micro_batches(step)):
            last = i == self.accum - 1
            sync = nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                with autocast:
                    hiddens = module(batch)
                    step_kl = distill_backward(
                        self.model.head, hiddens.final, hiddens.exits, 1.0 / self.accum, self.config.kl_chunk
                    )
            for k, value in step_kl.items():
                kl[k] += value / self.accum
        torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return kl

    def _state(self) -> dict:
        rng = _rng_state()
        if self.dist.world > 1:
            gathered = [None] * self.dist.world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        return {
            "config": asdict(self.config),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.balcony_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "wall_seconds": self.wall_before + (time.monotonic() - self.started),
            "kl_history": self.kl_history,
            "rng": rng,
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
            "precision": "bf16" if self.bf16 else "fp32",
            "ranks": self.dist.world,
            "final_kl": self.kl_history[-1]["kl"] if self.kl_history else None,
        }

    def save(self) -> None:
        state = self._state()  # every rank takes part in gathering RNG states
        if self.dist.main:
            save_checkpoint(
                self.model, self.config.base, self.out, self.summary(), state=state, dtype=SAVE_DTYPES[self.config.save_dtype]
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
        with progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.step, rate="-", kl="")
            while self.step < self.total_steps:
                if deadline and time.monotonic() >= deadline:
                    if self.dist.main:
                        say(f"--max-minutes {c.max_minutes} reached at step {self.step}; resume with --resume")
                    break
                tick = time.monotonic()
                kl = self.train_step(self.step)
                self.step += 1
                self.tokens_seen += tokens_per_step
                rate = tokens_per_step / (time.monotonic() - tick)
                self.kl_history.append({"step": self.step, "kl": {str(k): round(v, 5) for k, v in kl.items()}})
                shown = " ".join(f"KL@{k} {v:.3f}" for k, v in kl.items())
                progress.update(task, completed=self.step, rate=f"{rate:,.0f}", kl=shown)
                if self.step % c.save_every == 0 and self.step < self.total_steps:
                    self.save()
                    if self.dist.main and not console.is_terminal:  # a log file gets a line per checkpoint
                        say(f"step {self.step}/{self.total_steps} {shown} {rate:,.0f} tok/s; checkpoint saved")
        self.save()
        return self.summary()


def train(config: TrainConfig, resume: bool = False, base: BaseModel | None = None) -> dict:
    """Run `balcony-edge train`: returns the training summary written into the checkpoint."""
    trainer = Trainer(config, base=base, resume=resume)
    try:
        return trainer.run()
    finally:
        if trainer.dist.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
