"""The checkpoint folder: balcony_config.json (schema, base identity, exits, init, training summary) and
balconies.safetensors (balcony weights only); a run folder may also hold training_state.pt for --resume."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base_model import BaseModel, load_base_model
from .errors import CheckpointError
from .model import BalconyConfig, BalconyModel

SCHEMA_VERSION = 1
CONFIG_FILE = "balcony_config.json"
WEIGHTS_FILE = "balconies.safetensors"
STATE_FILE = "training_state.pt"
SHIPPED_CHECKPOINT = Path(__file__).parent / "checkpoints" / "smollm2"


@dataclass(frozen=True)
class CheckpointInfo:
    """What balcony_config.json says."""

    base: dict
    config: BalconyConfig
    training: dict

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "base_model": self.base,
            "exits": list(self.config.exits),
            "balcony_init": self.config.balcony_init,
            "norm_init": self.config.norm_init,
            "training": self.training,
        }


def write_folder_atomically(target: Path, fill) -> None:
    """Call fill(staging_folder), then move the staging folder onto target; a crash leaves target untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        fill(staging)
        _make_readable(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _make_readable(folder: Path) -> None:
    """Give the staging folder and its files the usual permissions (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def save_checkpoint(
    model: BalconyModel,
    base_spec: str,
    folder: Path,
    training: dict,
    state: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write a checkpoint folder atomically (weights in `dtype`; `state` for --resume when given)."""
    base = model_identity(model, base_spec)
    info = CheckpointInfo(base=base, config=model.config, training=training)
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.balcony_state_dict().items()}

    def fill(staging: Path) -> None:
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
        if state is not None:
            torch.save(state, staging / STATE_FILE)

    try:
        write_folder_atomically(Path(folder), fill)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {folder} ({err}); check free disk space and permissions") from None


def model_identity(model: BalconyModel, base_spec: str) -> dict:
    """The base identity recorded in a checkpoint, with the spec that loads the base again."""
    identity = getattr(model, "base_identity", None)
    if identity is None:
        raise CheckpointError("the model has no base identity; build it with build_model() or load_checkpoint()")
    return {**identity.to_json(), "source": base_spec}


def read_info(folder: Path) -> CheckpointInfo:
    """Read and check balcony_config.json of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; give a folder written by `balcony-edge train`")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing; train again or copy the whole folder")
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise CheckpointError(
                f"{folder / CONFIG_FILE} has schema version {raw.get('schema_version')!r}, this balcony-edge reads "
                f"{SCHEMA_VERSION}; use the matching balcony-edge version"
            )
        config = BalconyConfig(tuple(raw["exits"]), raw["balcony_init"], raw["norm_init"])
        return CheckpointInfo(base=raw["base_model"], config=config, training=raw.get("training", {}))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{folder / CONFIG_FILE} is malformed ({err!r}); train again or restore the file") from None


def check_base(info: CheckpointInfo, base: BaseModel, folder: Path) -> None:
    """Refuse a base model whose content hash differs from the one the balconies were trained on."""
    if base.identity.sha256 != info.base["sha256"]:
        raise CheckpointError(
            f"checkpoint {folder} was trained on base model {info.base.get('name')!r} (sha256 {info.base['sha256'][:12]}…), "
            f"but {base.identity.name!r} has sha256 {base.identity.sha256[:12]}…; pass the original base with --base"
        )


def build_model(base: BaseModel, config: BalconyConfig, seed: int = 0) -> BalconyModel:
    """A fresh Balcony model on a loaded base, carrying the base identity for checkpoints."""
    model = BalconyModel(base.model, config, seed=seed)
    model.base_identity = base.identity
    return model


def load_checkpoint(folder: Path | None = None, base: BaseModel | str | None = None) -> tuple[BalconyModel, CheckpointInfo, BaseModel]:
    """Load a checkpoint (default: the shipped one) onto its base model (or the given one, if its hash matches)."""
    folder = Path(folder) if folder is not None else SHIPPED_CHECKPOINT
    info = read_info(folder)
    if not isinstance(base, BaseModel):
        base = load_base_model(base or info.base.get("source") or info.base["name"])
    check_base(info, base, folder)
    model = build_model(base, info.config)
    try:
        tensors = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{folder / WEIGHTS_FILE} cannot be read ({err}); train again or restore the file") from None
    expected = model.balcony_state_dict()
    if set(tensors) != set(expected):
        raise CheckpointError(f"{folder / WEIGHTS_FILE} does not hold the balconies of exits {list(info.config.exits)}; the folder is inconsistent")
    for name, target in expected.items():
        target.copy_(tensors[name].to(target.dtype))
    return model.eval(), info, base
