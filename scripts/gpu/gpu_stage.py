"""Slice files for a GPU machine that takes at most 64 MiB a call, working tree included (the `device` tool).

    python scripts/gpu/gpu_stage.py extras.tar.xz gguf.xz ort.tar.xz --out .stage

Writes .stage/c1, .stage/c2, ...: each call carries one folder (`carry: [".stage/cN"]`) and copies it into the
machine's stage folder; `cat NAME.part* > NAME` joins a file there. The output folder must be ignored by git
(this repository's .gitignore has /.stage/), or it would travel with every call. Files are sliced in the order given, so
the
first ones are whole after the fewest calls. The room a call has is 64 MiB less the working tree that travels
with it (tracked and untracked, not ignored, files) and a small margin for edits between calls.
"""

import argparse
import shutil
import subprocess
from pathlib import Path

CALL_LIMIT = 64 * 2**20
MARGIN = 512 * 2**10


def working_tree_bytes() -> int:
    """Bytes of the files that travel with every call: tracked, or untracked and not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture_output=True, check=True
    )
    return sum(
        Path(name).stat().st_size for name in listed.stdout.decode().split("\0") if name and Path(name).is_file()
    )


def slice_files(files: list[Path], out: Path, room: int) -> list[Path]:
    """Slice `files`, in order, into folders out/c1, out/c2, ... of at most `room` bytes each; returns the folders."""
    if room <= 0:
        raise SystemExit(
            "no room left in a call: the working tree alone takes "
            f"{CALL_LIMIT - room - MARGIN:,} bytes of {CALL_LIMIT:,}"
        )
    missing = [str(path) for path in files if not path.is_file()]
    if missing or len({path.name for path in files}) < len(files):
        raise SystemExit(f"give existing files of distinct names ({', '.join(missing) or 'two share a name'})")
    shutil.rmtree(out, ignore_errors=True)
    call, used, parts = 1, 0, {}
    for path in files:
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            if used == room:
                call, used = call + 1, 0
            size = min(room - used, len(data) - offset)
            folder = out / f"c{call}"
            folder.mkdir(parents=True, exist_ok=True)
            parts[path.name] = parts.get(path.name, 0) + 1
            (folder / f"{path.name}.part{parts[path.name]:03d}").write_bytes(data[offset : offset + size])
            offset, used = offset + size, used + size
    return [out / f"c{i}" for i in range(1, call + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(".stage"))
    args = parser.parse_args()
    if (
        subprocess.run(["git", "check-ignore", "-q", str(args.out / "c1")]).returncode != 0
    ):  # a path inside: /DIR/ patterns
        raise SystemExit(
            f"{args.out} is not ignored by git, so its slices would "
            "travel with every call; ignore it or choose another --out"
        )
    room = CALL_LIMIT - working_tree_bytes() - MARGIN
    folders = slice_files(args.files, args.out, room)
    for folder in folders:
        print(
            folder,
            sum(f.stat().st_size for f in folder.iterdir()) / 1e6,
            "MB:",
            " ".join(sorted(f.name for f in folder.iterdir())),
        )
    print(f"{len(folders)} calls of at most {room / 1e6:.1f} MB each")


if __name__ == "__main__":
    main()
