"""One onnxruntime-genai folder per exit: `genai/<graph>/` with its genai_config.json, and links to the exit's
standard graph, the weights file and the tokenizer files in the export folder (onnxruntime-genai reads a model
from a folder holding genai_config.json and refuses paths that leave it; the links keep every byte stored once).

    import onnxruntime_genai as og
    model = og.Model("exports/smollm2-balcony/genai/exit_16")      # exit 16 alone, as any genai model
"""

from __future__ import annotations

import json
from pathlib import Path

from balcony_edge.runtime.core.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, ExitGraph, Manifest

GENAI_FOLDER = "genai"
GENAI_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def genai_config(manifest: Manifest, entry: ExitGraph) -> dict:
    """genai_config.json for one exit's standard graph: greedy search, CPU (add provider_options for CUDA)."""
    generation, kv = manifest.generation, manifest.kv
    return {
        "model": {
            "type": manifest.base.get("model_type", "llama"),
            "bos_token_id": generation.bos_token_id,
            "eos_token_id": generation.eos_token_ids,
            "pad_token_id": generation.pad_token_id
            if generation.pad_token_id is not None
            else generation.eos_token_ids[0],
            "context_length": generation.context_length,
            "vocab_size": manifest.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": entry.graph,
                "head_size": kv.head_dim,
                "hidden_size": kv.hidden_size,
                "num_attention_heads": kv.num_attention_heads,
                "num_key_value_heads": kv.num_kv_heads,
                "num_hidden_layers": entry.num_layers,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": generation.context_length,
            "past_present_share_buffer": True,  # GroupQueryAttention writes the cache in place
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
            "repetition_penalty": 1.0,
        },
    }


TOKENIZER_CONFIG = "tokenizer_config.json"


def write_tokenizer_config(staging: Path, chat_template: str, target: Path) -> None:
    """The export's tokenizer config with the chat template written into it: onnxruntime-genai's apply_chat_template
    reads it from there (transformers keeps it in a file of its own)."""
    config = json.loads((staging / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    config.setdefault("chat_template", (staging / chat_template).read_text(encoding="utf-8"))
    target.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def genai_folder(entry: ExitGraph) -> Path:
    """An exit's genai folder, relative to the export."""
    return Path(GENAI_FOLDER) / Path(entry.graph).stem


def write_genai_folders(staging: Path, manifest: Manifest) -> list[str]:
    """A genai folder per exit (relative links to the export's own files); returns the folders' paths."""
    folders = []
    for entry in manifest.exits:
        folder = genai_folder(entry)
        (staging / folder).mkdir(parents=True)
        (staging / folder / "genai_config.json").write_text(json.dumps(genai_config(manifest, entry), indent=2) + "\n")
        linked = [
            entry.graph,
            manifest.weights_file,
            *(n for n in GENAI_TOKENIZER_FILES if n in manifest.tokenizer_files),
        ]
        if manifest.chat_template is not None and TOKENIZER_CONFIG in linked:
            linked.remove(TOKENIZER_CONFIG)  # a copy of its own, with the chat template in it
            write_tokenizer_config(staging, manifest.chat_template, staging / folder / TOKENIZER_CONFIG)
        for name in linked:
            (staging / folder / name).symlink_to(Path("..") / ".." / name)
        folders.append(str(folder))
    return folders
