"""The checkpoint folder: balcony_config.json (schema, base identity, exits, init, training summary) and
balconies.safetensors (balcony weights only); a run folder may also hold training_state.pt for --resume."""

from __future__ import annotations

import errno
import io
import json
import reprlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from balcony_edge.base_model import SUPPORTED_MODEL_TYPES, BaseModel, load_base_model
from balcony_edge.common.atomic import readable_folder, write_folder_atomically, write_text_atomically
from balcony_edge.common.errors import CheckpointError, ExitsError
from balcony_edge.common.paths import CHECKPOINT_CONFIG_FILE, SHIPPED_CHECKPOINT
from balcony_edge.common.paths import CHECKPOINT_WEIGHTS_FILE as WEIGHTS_FILE
from balcony_edge.common.validation import is_finite_number, is_whole_number
from balcony_edge.exits import parse_exits
from balcony_edge.model import BalconyConfig, BalconyModel

SCHEMA_VERSION = 1
CONFIG_FILE = CHECKPOINT_CONFIG_FILE
STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class CheckpointInfo:
    """What balcony_config.json says."""

    base: dict
    config: BalconyConfig
    training: dict
    # The held-out answers measured on these balconies (`eval --chat --record`): prompts, settings, and per depth
    # ("8", ..., the full model's depth) judge_nll, loop_share, facts_right, mean_length. None: not measured.
    answers: dict | None = None

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "base_model": self.base,
            "exits": list(self.config.exits),
            "balcony_init": self.config.balcony_init,
            "norm_init": self.config.norm_init,
            # Written only where an exit's balcony is deeper than one layer: a default checkpoint reads as before.
            **({"balcony_layers": {str(k): n for k, n in self.config.deeper}} if self.config.deeper else {}),
            "training": self.training,
            **({"answers": self.answers} if self.answers is not None else {}),
        }


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether a folder holds a checkpoint and nothing else (what `train --force` or `--resume` may write over)."""
    names = {p.name for p in Path(folder).iterdir()}
    return CONFIG_FILE in names and names <= {CONFIG_FILE, WEIGHTS_FILE, STATE_FILE}


def resume_hint(out: Path) -> str:
    """How to continue a training run from its run folder."""
    return f"continue with `balcony-edge train --resume --out {out}` and the run's other options"


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

    # Serialised in memory and written by Python, so that a failed write (disk full) is an OSError with its errno;
    # safetensors and torch.save writing to a path report it as SafetensorError / RuntimeError.
    def fill(staging: Path) -> None:
        (staging / WEIGHTS_FILE).write_bytes(save(tensors, metadata={"format": "pt"}))
        (staging / CONFIG_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n")
        if state is not None:
            buffer = io.BytesIO()
            torch.save(state, buffer)
            (staging / STATE_FILE).write_bytes(buffer.getbuffer())

    try:
        write_folder_atomically(Path(folder), fill)
    except OSError as err:
        then = resume_hint(folder) if state is not None else "save again"
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"disk full while writing checkpoint {folder}; any previous "
                f"checkpoint there is untouched: free disk space, then {then}"
            ) from None
        raise CheckpointError(
            f"cannot write checkpoint {folder} ({err.strerror or err}); any previous checkpoint there is untouched: "
            f"check permissions and free space, then {then}"
        ) from None


def model_identity(model: BalconyModel, base_spec: str) -> dict:
    """The base identity recorded in a checkpoint, with the spec that loads the base again."""
    identity = getattr(model, "base_identity", None)
    if identity is None:
        raise CheckpointError("the model has no base identity; build it with build_model() or load_checkpoint()")
    return {**identity.to_json(), "source": base_spec}


def read_info(folder: Path) -> CheckpointInfo:
    """Read and check balcony_config.json of a checkpoint folder."""
    folder = readable_folder(folder)
    if not folder.is_dir():
        raise CheckpointError(
            f"checkpoint folder {folder} does not exist; give a folder written by `balcony-edge train`"
        )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"checkpoint {folder} is incomplete: {name} is missing; train again or copy the whole folder"
            )
    path = folder / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise CheckpointError(f"{path} cannot be read as JSON ({err}); train again or restore the file") from None
    return _parse_info(raw, path)


def _parse_info(raw: object, path: Path) -> CheckpointInfo:
    """Check every field of a parsed balcony_config.json, so that nothing malformed reaches the model."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds {type(raw).__name__}, not a JSON object; train again or restore the file")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema version {reprlib.repr(raw.get('schema_version'))}, this balcony-edge reads "
            f"{SCHEMA_VERSION}; use the matching balcony-edge version"
        )
    base = raw.get("base_model")
    if not (
        isinstance(base, dict)
        and all(isinstance(base.get(key), str) for key in ("name", "sha256"))
        and isinstance(base.get("source", ""), str)
        and is_whole_number(base.get("num_layers"))
    ):
        raise CheckpointError(
            f"{path}: base_model must record the base's name, model_type, num_layers "
            f"and sha256, not {reprlib.repr(base)}; train again or restore the file"
        )
    if base.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path} is for a {reprlib.repr(base.get('model_type'))} base model; balcony-edge supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}: use a checkpoint trained on one of those"
        )
    exits = raw.get("exits")
    if not (isinstance(exits, list) and all(is_whole_number(k) for k in exits)):
        raise CheckpointError(
            f"{path}: exits must be a list of integers such as [8, 16, 24], "
            f"not {reprlib.repr(exits)}; train again or restore the file"
        )
    training = raw.get("training", {})
    if not isinstance(training, dict):
        raise CheckpointError(
            f"{path}: training must be a JSON object, not {reprlib.repr(training)}; train again or restore the file"
        )
    try:
        checked = parse_exits(exits, base["num_layers"])
        balcony_init, norm_init = raw.get("balcony_init"), raw.get("norm_init")
        if not (isinstance(balcony_init, str) and isinstance(norm_init, str)):  # BalconyConfig checks a name's value
            raise ExitsError(
                f"balcony init {reprlib.repr(balcony_init)} and norm init {reprlib.repr(norm_init)} must be names"
            )
        config = BalconyConfig(checked, balcony_init, norm_init, _parse_balcony_layers(raw.get("balcony_layers", {})))
    except ExitsError as err:
        raise CheckpointError(
            f"{path} does not describe balconies its base can hold ({err}); train again or restore the file"
        ) from None
    return CheckpointInfo(base=base, config=config, training=training, answers=_parse_answers(raw.get("answers"), path))


def _parse_balcony_layers(layers: object) -> tuple[tuple[int, int], ...]:
    """balcony_config.json's {"exit": layers} as BalconyConfig.deeper (BalconyConfig checks the values)."""
    if not (
        isinstance(layers, dict) and all(k.isascii() and k.isdigit() and is_whole_number(n) for k, n in layers.items())
    ):
        raise ExitsError(
            f'balcony_layers must map exits to layer counts, such as {{"8": 2}}, not {reprlib.repr(layers)}'
        )
    return tuple(sorted((int(k), int(n)) for k, n in layers.items()))


ANSWER_FIGURES = ("judge_nll", "loop_share", "facts_right", "mean_length")


def _parse_answers(answers: object, path: Path) -> dict | None:
    """The recorded answer figures, checked: a whole number of prompts and each depth's finite figures."""
    if answers is None:
        return None
    depths = answers.get("depths") if isinstance(answers, dict) else None
    if not (
        isinstance(answers, dict)
        and isinstance(depths, dict)
        and is_whole_number(answers.get("prompts"))
        and all(
            isinstance(d, str)
            and d.isdigit()
            and isinstance(f, dict)
            and all(is_finite_number(f.get(n)) for n in ANSWER_FIGURES)
            for d, f in depths.items()
        )
    ):
        raise CheckpointError(
            f"{path}: answers must hold prompts and per depth {', '.join(ANSWER_FIGURES)}, "
            f"not {reprlib.repr(answers)}; measure again (`balcony-edge eval --chat --record`) or restore the file"
        )
    return answers


def record_answers(folder: Path, answers: dict) -> None:
    """Write measured answer figures into a checkpoint's balcony_config.json (atomically; the weights untouched)."""
    folder = readable_folder(folder)
    info = replace(read_info(folder), answers=answers)
    try:
        write_text_atomically(folder / CONFIG_FILE, json.dumps(info.to_json(), indent=2) + "\n")
    except OSError as err:
        raise CheckpointError(
            f"cannot write {folder / CONFIG_FILE} ({err.strerror or err}); check the folder's permissions"
        ) from None


def check_base(info: CheckpointInfo, base: BaseModel, folder: Path) -> None:
    """Refuse a base model whose content hash differs from the one the balconies were trained on."""
    if base.identity.sha256 != info.base["sha256"]:
        raise CheckpointError(
            f"checkpoint {folder} was trained on base model "
            f"{info.base.get('name')!r} (sha256 {info.base['sha256'][:12]}…), "
            f"but {base.identity.name!r} has sha256 {base.identity.sha256[:12]}…; pass the original base with --base"
        )


def build_model(base: BaseModel, config: BalconyConfig, seed: int = 0) -> BalconyModel:
    """A fresh Balcony model on a loaded base, carrying the base identity for checkpoints."""
    model = BalconyModel(base.model, config, seed=seed)
    # torch types Module.__setattr__ for tensors and modules only; any other value is kept as a plain attribute
    model.base_identity = base.identity  # type: ignore[assignment]
    return model


def copy_balcony_weights(
    model: BalconyModel, tensors: dict, source: Path, start_from: BalconyConfig | None = None
) -> None:
    """Copy saved balcony tensors into the model, refusing missing, extra or misshapen ones. To start a run from
    them (--init-from), `start_from` is the source's config: it may hold more exits (left out) and shallower
    balconies (the model's layers past the source's keep their identity start)."""
    expected = model.balcony_state_dict()
    fresh: set[str] = set()
    if start_from is not None:
        tensors = {name: t for name, t in tensors.items() if name in expected}
        fresh = {
            name
            for k in model.exits
            for i in range(start_from.layers_at(k) - 1, model.config.layers_at(k) - 1)
            for name in expected
            if name.startswith(f"extra_layers.{k}.{i}.")
        }
    if set(tensors) != set(expected) - fresh:
        raise CheckpointError(
            f"{source} does not hold the balconies of exits {list(model.exits)}; "
            "the folder is inconsistent: train again or restore it"
        )
    for name, target in expected.items():
        if name in fresh:
            continue
        if not isinstance(tensors[name], torch.Tensor) or tensors[name].shape != target.shape:
            raise CheckpointError(
                f"{source}: {name} is not a tensor of shape {list(target.shape)}; "
                "the folder is inconsistent: train again or restore it"
            )
    for name, target in expected.items():
        if name not in fresh:
            target.copy_(tensors[name].to(target.dtype))


def read_weights(folder: Path) -> dict:
    """The balcony tensors of a checkpoint folder, or a CheckpointError naming the damaged file."""
    try:
        return load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{folder / WEIGHTS_FILE} cannot be read ({err}); train again or restore the file"
        ) from None


def load_checkpoint(
    folder: Path | None = None, base: BaseModel | str | None = None
) -> tuple[BalconyModel, CheckpointInfo, BaseModel]:
    """Load a checkpoint (default: the shipped one) onto its base model (or the given one, if its hash matches)."""
    folder = readable_folder(Path(folder) if folder is not None else SHIPPED_CHECKPOINT)
    info = read_info(folder)
    tensors = read_weights(folder)  # before the base model: a damaged file is refused without the slow load
    if not isinstance(base, BaseModel):
        base = load_base_model(base or info.base.get("source") or info.base["name"])
    check_base(info, base, folder)
    model = build_model(base, info.config)
    copy_balcony_weights(model, tensors, folder / WEIGHTS_FILE)
    return model.eval(), info, base
