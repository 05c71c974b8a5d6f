"""Where balcony-edge keeps what it makes for the user (torch-free: the runtime uses it too)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from balcony_edge.common.errors import BalconyError

SHIPPED_EXPORT_NAME = "smollm2-balcony"
SHIPPED_CHECKPOINT = Path(__file__).parent.parent / "checkpoints" / "smollm2"
CHECKPOINT_WEIGHTS_FILE = "balconies.safetensors"  # a checkpoint's balcony weights
CHECKPOINT_CONFIG_FILE = "balcony_config.json"  # its configuration, training record and measured answers


def cache_dir() -> Path:
    """The user's balcony-edge cache folder (BALCONY_EDGE_CACHE, else $XDG_CACHE_HOME or ~/.cache, /balcony-edge)."""
    explicit = os.environ.get("BALCONY_EDGE_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "balcony-edge"


def default_export_dir(name: str = SHIPPED_EXPORT_NAME, precision: str = "fp32") -> Path:
    """<cache dir>/exports/<name>-<precision>: where `export` writes by default and `chat` looks first."""
    return cache_dir() / "exports" / f"{name}-{precision}"


def check_replace_target(
    out: Path,
    replace: bool,
    ours: Callable[[Path], bool],
    what: str,
    fix_replace: str,
    option: str = "--out",
    error: type[BalconyError] = BalconyError,
) -> None:
    """Refuse, before any work, to write `what` over anything but an empty folder or, when `replace`, one this tool
    wrote (`ours(folder)`): never over the user's own files, a file, or a symbolic link (replacing the link would
    leave its target as it was)."""
    if out.is_symlink():
        raise error(
            f"{option} {out} is a symbolic link (to {os.readlink(out)}); give the folder itself, not a link to it"
        )
    if not out.exists():
        return
    if out.is_file() or not out.is_dir():
        raise error(f"{option} {out} is a file, not a folder; choose a new or empty folder for {what}")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not ours(out):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise error(
            f"{option} {out} holds files that are not {what} ({shown}); "
            "nothing was changed: choose a new or empty folder"
        )
    if not replace:
        raise error(f"{option} {out} already holds {what}; {fix_replace}")


def check_output_folder(path: Path | None, option: str, error: type[BalconyError] = BalconyError) -> None:
    """Refuse an output path whose folder is missing before the work, not after it."""
    if path is not None and not path.parent.is_dir():
        raise error(f"{option} {path}: folder {path.parent} does not exist; create it or choose another path")


def check_writable_folder(folder: Path, what: str) -> None:
    """Refuse, before the work, a folder whose files cannot be replaced (a new file is written beside, then renamed)."""
    if not os.access(folder, os.W_OK):
        raise BalconyError(f"{what}: cannot write into {folder} (permission denied); fix its permissions or copy it")
