"""`balcony-edge export --format hf|gguf`: every chosen exit as a standalone checkpoint (a Hugging Face folder or a
GGUF file each) in one output folder, written beside the target and renamed into place whole."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from balcony_edge import __version__
from balcony_edge.base_model import gguf_source
from balcony_edge.checkpoint import SHIPPED_CHECKPOINT, load_checkpoint, read_info
from balcony_edge.common.atomic import exclusive_target, write_folder_atomically
from balcony_edge.common.console import phase_progress
from balcony_edge.common.errors import ExportError
from balcony_edge.common.paths import default_export_dir
from balcony_edge.export.exit_card import exit_card
from balcony_edge.export.exporter import check_target, export_name, select_exits
from balcony_edge.export.gguf_exits import GGUF_DTYPES, gguf_file_name, read_source, write_exit_gguf
from balcony_edge.export.hf_exits import HF_DTYPES, hf_folder_name, write_exit_folder
from balcony_edge.export.quality import against_full
from balcony_edge.runtime.core.manifest import EXIT_CHECKPOINTS_LISTING

FORMATS = ("onnx", "hf", "gguf")
DEFAULT_DTYPES = {"hf": "fp32", "gguf": "f16"}
DTYPE_CHOICES = {"hf": tuple(HF_DTYPES), "gguf": GGUF_DTYPES}
LISTING_FILE = EXIT_CHECKPOINTS_LISTING  # what the export wrote: --force replaces only a folder that has one


@dataclass(frozen=True)
class ExitCheckpointConfig:
    """Which exits of which checkpoint, as what (hf or gguf) in which dtype, where."""

    format: str
    checkpoint: Path | None = None
    out: Path | None = None
    exits: str | tuple[int, ...] | None = None
    dtype: str | None = None  # default: fp32 for hf, f16 for gguf
    base: str | None = None
    force: bool = False
    name: str | None = None  # of the GGUF files (NAME-exit_K.gguf); default: the checkpoint's export name

    def __post_init__(self) -> None:
        if self.format not in DTYPE_CHOICES:
            raise ExportError(f"--format {self.format!r} is unknown; choose one of {', '.join(FORMATS)}")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES[self.format]:
            raise ExportError(
                f"--dtype {self.dtype!r} does not apply to --format {self.format}; "
                f"choose one of {', '.join(DTYPE_CHOICES[self.format])}"
            )

    @property
    def file_dtype(self) -> str:
        return self.dtype or DEFAULT_DTYPES[self.format]


def export_exit_checkpoints(config: ExitCheckpointConfig) -> tuple[Path, list[str]]:
    """Write the exits; returns the output folder and the names written in it."""
    checkpoint = Path(config.checkpoint) if config.checkpoint is not None else SHIPPED_CHECKPOINT
    name = config.name or export_name(checkpoint)
    out = (
        Path(config.out) if config.out is not None else default_export_dir(name, f"{config.format}-{config.file_dtype}")
    )
    info = read_info(checkpoint)
    exits = select_exits(config.exits, info, checkpoint)
    source = None
    if config.format == "gguf":
        path = gguf_source(config.base or info.base.get("source") or info.base["name"])
        if path is None:
            raise ExportError(
                "--format gguf needs a base that came from a GGUF file; for a Hugging Face base, export --format hf "
                "and run llama.cpp's convert_hf_to_gguf.py on each exit folder"
            )
        source = read_source(path)
    check_target(out, config.force, is_exit_checkpoints_folder, LISTING_FILE)
    with exclusive_target(out, "the export"):
        model, info, base = load_checkpoint(checkpoint, config.base)
        license_field = source.fields.get("general.license") if source is not None else None
        base_license = license_field.contents() if license_field is not None else None
        written: list[str] = []

        def fill(staging: Path) -> None:
            with phase_progress() as progress:
                task = progress.add_task(f"export ({config.format}, {config.file_dtype})", total=len(exits))
                quality = against_full(model, base.tokenizer) if config.format == "hf" else None
                for k in exits:
                    if quality is not None:  # --format hf
                        card = exit_card(k, model, info, quality, base_license)
                        (staging / hf_folder_name(k)).mkdir()
                        write_exit_folder(
                            staging / hf_folder_name(k), k, model, base.tokenizer, config.file_dtype, card
                        )
                        written.append(hf_folder_name(k))
                    elif source is not None:  # --format gguf: its source GGUF was read above
                        write_exit_gguf(staging / gguf_file_name(name, k), k, model, source, config.file_dtype)
                        written.append(gguf_file_name(name, k))
                    progress.advance(task)
            listing = {
                "format": config.format,
                "dtype": config.file_dtype,
                "exits": list(exits),
                "files": written,
                "balcony_edge": __version__,
            }
            (staging / LISTING_FILE).write_text(json.dumps(listing, indent=2) + "\n")

        try:
            write_folder_atomically(out, fill)
        except OSError as err:
            raise ExportError(
                f"cannot write {out} ({err.strerror or err}); free disk space or choose another --out"
            ) from None
    return out, written


def is_exit_checkpoints_folder(folder: Path) -> bool:
    """Whether folder holds a listing this command wrote (--force replaces only such a folder)."""
    try:
        raw = json.loads((folder / LISTING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("format") in DTYPE_CHOICES and isinstance(raw.get("files"), list)
