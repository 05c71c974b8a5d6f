"""Files and folders written whole or not at all: staged beside the target, flushed to disk, then renamed.

Torch-free: the runtime uses it too (calibration cache, reading an export folder whose rewrite was killed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Sibling folders of a target while it is written: `.NAME.partial-*` (being filled) and `.NAME.old-*/NAME`
# (the previous folder, moved aside for the swap); both are removed by the next successful write.
PARTIAL, RETIRED = ".partial-", ".old-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write to: renamed onto `path` if the block succeeds, else
    removed."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(descriptor)
    os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; the result gets the usual permissions
    try:
        yield Path(temporary)
        _sync_file(Path(temporary))
        os.replace(temporary, path)
        _sync_folder(path.parent)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Write text to path so that readers see the old file or the new one, never a part (the folder must exist)."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def exclusive_target(target: Path, what: str, wait: bool = False) -> Iterator[None]:
    """Hold a lock on writing `target` (an flock on `.NAME.lock` beside it, removed when done), or refuse at once
    (wait=False) or wait for the holder (wait=True): a second writer of the same target would otherwise clear the
    first one's staging folder. A killed holder's lock goes with its process; its lock file stays until the next
    writer is done."""
    import fcntl

    from balcony_edge.common.console import say
    from balcony_edge.common.errors import BalconyError

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    while True:
        with open(lock, "a") as handle:
            try:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        raise
                    say(f"waiting for another process writing {what} {target}")
                    fcntl.flock(handle, fcntl.LOCK_EX)
                held = (
                    os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
                )  # else the holder removed it as we opened it
            except (BlockingIOError, FileNotFoundError):
                held = False
            if not held and not wait:
                raise BalconyError(
                    f"another process is writing {what} {target}; wait for it to finish or choose another path"
                )
            if not held:
                continue  # the holder is done and took its lock file away: take a fresh one
            try:
                yield
            finally:
                lock.unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)
            return


def write_folder_atomically(target: Path, fill: Callable[[Path], object]) -> None:
    """Call fill(staging_folder), then move the staging folder onto target; a crash leaves a readable folder."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}", dir=target.parent))
    try:
        fill(staging)
        _make_readable(staging)
        for path in staging.rglob("*"):
            _sync_file(path)
        _sync_folder(staging)
        if target.exists():
            # No rename replaces a non-empty folder, so the old one is moved aside first. A kill between the two
            # renames leaves no target but a complete retired copy: readable_folder() reads that one until the next
            # write puts a new target in place (simpler than a pointer file, and the target stays a plain folder).
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}{RETIRED}", dir=target.parent))
            os.replace(target, retired / target.name)
        os.replace(staging, target)
        _sync_folder(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for leftover in _staging_siblings(target, PARTIAL) + _staging_siblings(target, RETIRED):
        shutil.rmtree(leftover, ignore_errors=True)


def _staging_siblings(target: Path, kind: str) -> list[Path]:
    """Folders beside target that a write of target (this one or a killed one) staged or retired, by name."""
    prefix = f".{target.name}{kind}"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())


def readable_folder(folder: Path) -> Path:
    """The folder itself or, when a write was killed between its two renames, the old copy it moved aside."""
    folder = Path(folder)
    if folder.exists() or not folder.parent.is_dir():
        return folder
    # Retired copies pile up only while a target exists (each write removes them once its target is in place),
    # so without a target there is at most one, and it was complete when it was moved aside.
    retired = [p / folder.name for p in _staging_siblings(folder, RETIRED) if (p / folder.name).is_dir()]
    return retired[0] if retired else folder


def _make_readable(folder: Path) -> None:
    """Give the staging folder and its files the usual permissions (mkdtemp makes them private)."""
    umask = _umask()
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sync_file(path: Path) -> None:
    """Flush a written file to the disk, so that a power cut after the rename cannot leave it empty."""
    if path.is_file():
        with open(path, "rb") as file:
            os.fsync(file.fileno())


def _sync_folder(folder: Path) -> None:
    """Flush a folder's entries (the renames) to the disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
