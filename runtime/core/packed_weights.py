"""Every graph the CPU engine runs, saved by onnxruntime for this CPU with its weights already packed for the kernels,
all of them in one data file that every session maps: the weights stored once on disk and in memory, however many
sessions use them.

Prepacking (MatMulNBits' and MatMul's layouts for this CPU) otherwise copies each weight onto the heap of the one
session that uses it, so a weight can live in one session only: the engine's chain of pieces. With the packed
weights in a shared file, an exit's whole chain can also be one session, its *step graph* (the export's exit graph
with the hidden states at each boundary as outputs), and a one-token step runs one session instead of a chain
(docs/runtime.md, "Packed weights"; docs/benchmarks.md has the measurements).

onnxruntime writes each graph, optimised, with its initializers and their prepacked forms in a data file
(`session.save_external_prepacked_constant_initializers`); those files are merged here into one, each distinct blob
once, and the graphs pointed at it. The folder is <cache>/packed/<key>: the key covers the export folder and its files
(manifest checksum, sizes and modification times), onnxruntime's version and the CPU, since packed layouts depend on
both.
Made whole or not at all (staged, then renamed), one process at a time; a new folder for an export replaces the
older ones this module made for the same export folder.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnxruntime as ort

from balcony_edge.common.atomic import exclusive_target, write_folder_atomically
from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.paths import cache_dir
from balcony_edge.runtime.core.manifest import MANIFEST_FILE, Manifest, Piece, hidden_name
from balcony_edge.runtime.core.onnx_subset import model_class, tensors

FORMAT = 1  # of the folder: raise when what is written changes
DATA_FILE = "packed.bin"
STAMP_FILE = "packed.json"  # written last: a folder without it is not used
BLOB_ALIGNMENT = 4096  # each blob starts on a page of the data file
PREPACKED = b"prepacked_"  # external-data keys of a tensor's prepacked forms: "<kernel key>|offset;length;alignment"


@dataclass(frozen=True)
class PackedGraphs:
    """A folder of packed graphs: one per piece (under the piece's graph name) and one step graph per exit."""

    folder: Path

    def piece(self, graph: str) -> Path:
        return self.folder / graph

    def step(self, exit: int) -> Path:
        return self.folder / step_graph_name(exit)


def step_graph_name(exit: int) -> str:
    return f"step_{exit}.onnx"


def packed_graphs(folder: Path, make_options: Callable[[], ort.SessionOptions]) -> PackedGraphs:
    """The packed graphs of an export folder, made first if this CPU and onnxruntime have none yet (OSError when the
    cache cannot be written; onnxruntime's error when a graph cannot be saved). `make_options`: the engine's session
    options, so that the graphs are optimised as its sessions would optimise them."""
    folder = Path(folder)
    manifest = Manifest.load(folder)  # the folder's own: every graph, whichever exits this engine opens
    target = cache_dir() / "packed" / _key(folder, manifest)
    if not (target / STAMP_FILE).is_file():
        with exclusive_target(target, "packed weights", wait=True):
            if not (target / STAMP_FILE).is_file():  # another process may have made it meanwhile
                write_folder_atomically(target, lambda staging: _fill(staging, folder, manifest, make_options))
                _remove_older(target, folder)
    return PackedGraphs(target)


def _key(folder: Path, manifest: Manifest) -> str:
    """What the packed graphs depend on: the export's files, onnxruntime and the CPU."""
    names = sorted({manifest.weights_file, *(p.graph for p in manifest.pieces), *(e.graph for e in manifest.exits)})
    files = {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in names}
    identity = {
        "format": FORMAT,
        "export": str(folder.resolve()),  # one packed folder per export folder (see _remove_older)
        "manifest": file_sha256(folder / MANIFEST_FILE),
        "files": files,
        "onnxruntime": ort.__version__,
        "cpu": _cpu_identity(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _cpu_identity() -> str:
    """The CPU's model and instruction sets (Linux), else what the platform module says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU part")  # x86 and Arm names
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _fill(staging: Path, folder: Path, manifest: Manifest, make_options: Callable[[], ort.SessionOptions]) -> None:
    """Save every piece and step graph into staging, merging their data into DATA_FILE as each one is saved (so that
    only one graph's own data file exists at a time)."""
    pieces = {piece.name: piece for piece in manifest.pieces}
    graphs = {piece.graph: (folder / piece.graph).read_bytes() for piece in manifest.pieces}
    for entry in manifest.exits:
        graphs[step_graph_name(entry.exit)] = _step_graph(folder, entry.graph, [pieces[n] for n in entry.chain])
    with open(staging / DATA_FILE, "wb") as data:
        merged = _Merged(data)
        for name, graph in graphs.items():
            _save_optimised(graph, folder, staging, name, make_options())
            merged.take(staging, name)
    (staging / STAMP_FILE).write_text(
        json.dumps({"format": FORMAT, "export": str(folder.resolve()), "graphs": sorted(graphs)}, indent=1)
    )


def _step_graph(folder: Path, exit_graph: str, chain: list[Piece]) -> bytes:
    """The exit graph with the hidden states that its chain's segments pass on as outputs too (a boundary keeps them
    for a deeper exit's catch-up): type and shape as the segment's graph declares them."""
    model = model_class().FromString((folder / exit_graph).read_bytes())
    present = {value.name for value in model.graph.output}
    for piece in chain:
        if piece.kind != "segment":
            continue
        declared = model_class().FromString((folder / piece.graph).read_bytes()).graph.output
        for value in declared:
            if value.name == hidden_name(piece.end_layer).encode() and value.name not in present:
                model.graph.output.add().CopyFrom(value)
    return model.SerializeToString()


def _save_optimised(graph: bytes, folder: Path, staging: Path, name: str, options: ort.SessionOptions) -> None:
    """onnxruntime's optimised graph `name` in staging, its initializers and their prepacked forms in its own data
    file beside it."""
    options.optimized_model_filepath = str(staging / name)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", _own_data(name))
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])


def _own_data(name: str) -> str:
    return f"{Path(name).stem}.own.bin"


class _Merged:
    """The shared data file being written: each distinct blob once, page-aligned."""

    def __init__(self, data: BinaryIO) -> None:
        self.data = data
        self.offsets: dict[bytes, int] = {}

    def put(self, blob: bytes | memoryview) -> int:
        digest = hashlib.sha256(blob).digest() + len(blob).to_bytes(8, "little")
        if digest not in self.offsets:
            self.data.write(b"\0" * (-self.data.tell() % BLOB_ALIGNMENT))
            self.offsets[digest] = self.data.tell()
            self.data.write(blob)
        return self.offsets[digest]

    def take(self, staging: Path, name: str) -> None:
        """Move graph `name`'s own data into the shared file and point its tensors there; its own file goes."""
        own = staging / _own_data(name)
        model = model_class().FromString((staging / name).read_bytes())
        with open(own, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as source:
            for tensor in tensors(model):
                entries = {entry.key: entry.value for entry in tensor.external_data}
                if not entries:
                    continue
                start, length = int(entries[b"offset"]), int(entries[b"length"])
                rewritten = {
                    b"location": DATA_FILE.encode(),
                    b"offset": str(self.put(source[start : start + length])).encode(),
                    b"length": str(length).encode(),
                }
                for key, value in entries.items():
                    if key.startswith(PREPACKED):
                        kernel_key, place = value.split(b"|")
                        offset, size, alignment = place.split(b";")
                        blob = source[int(offset) : int(offset) + int(size)]
                        rewritten[key] = b"%s|%d;%s;%s" % (kernel_key, self.put(blob), size, alignment)
                del tensor.external_data[:]
                for key, value in rewritten.items():
                    tensor.external_data.add(key=key, value=value)
        (staging / name).write_bytes(model.SerializeToString())
        own.unlink()


def _remove_older(target: Path, folder: Path) -> None:
    """Remove the other packed folders made for the same export folder (by an earlier export there, or another
    onnxruntime): only folders whose stamp this module wrote."""
    export = str(folder.resolve())
    for other in target.parent.iterdir():
        stamp = other / STAMP_FILE
        if other == target or not stamp.is_file():
            continue
        try:
            made_for = json.loads(stamp.read_text()).get("export")
        except (OSError, ValueError):
            continue
        if made_for == export:
            shutil.rmtree(other, ignore_errors=True)
