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
Made whole or not at all (staged, then renamed), one process at a time; a new folder for an export, made by the same
onnxruntime on the same CPU, replaces the older ones this module made for the same export folder (its files changed),
and that environment's folders for export folders that are gone are removed.
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
from google.protobuf import message

from balcony_edge.common.atomic import exclusive_target, write_folder_atomically
from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.paths import cache_dir
from balcony_edge.runtime.core.manifest import LENGTHS_VERSION, MANIFEST_FILE, Manifest, Piece, hidden_name
from balcony_edge.runtime.core.onnx_subset import model_class, tensors

FORMAT = 2  # of the folder: raise when what is written changes (2: the stamp names onnxruntime and the CPU)
DATA_FILE = "packed.bin"
STAMP_FILE = "packed.json"  # written last: a folder without it is not used
BLOB_ALIGNMENT = max(mmap.ALLOCATIONGRANULARITY, 4096)  # each blob starts where a mapping can (a page)
# External-data keys onnxruntime writes: where a tensor's data lies, and its prepacked forms, each entry
# "<kernel key>|offset;length;checksum" with one "|offset;length;checksum" more per further buffer of that kernel.
PLACE_KEYS = (b"location", b"offset", b"length", b"checksum")
SAVING = {  # onnxruntime's options for saving a graph: initializers of 1 KiB and more in the data file, packed too
    "session.optimized_model_external_initializers_min_size_in_bytes": "1024",
    "session.save_external_prepacked_constant_initializers": "1",
}
PREPACKED = b"prepacked_"


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
    stamp = {"format": FORMAT, "export": str(folder.resolve()), "onnxruntime": ort.__version__, "cpu": _cpu_hash()}
    target = cache_dir() / "packed" / _key(folder, manifest, stamp)
    if not (target / STAMP_FILE).is_file():
        with exclusive_target(target, "packed weights", wait=True):
            if not (target / STAMP_FILE).is_file():  # another process may have made it meanwhile
                write_folder_atomically(target, lambda staging: _fill(staging, folder, manifest, make_options, stamp))
                _remove_older(target, stamp)
    return PackedGraphs(target)


def discard(packed: PackedGraphs) -> None:
    """Remove a packed folder that could not be opened (made again on the next load)."""
    shutil.rmtree(packed.folder, ignore_errors=True)


def _key(folder: Path, manifest: Manifest, stamp: dict) -> str:
    """What the packed graphs depend on: the export folder (one packed folder each, see _remove_older) and its files,
    onnxruntime and the CPU."""
    names = sorted({manifest.weights_file, *(p.graph for p in manifest.pieces), *(e.graph for e in manifest.exits)})
    files = {name: [(folder / name).stat().st_size, (folder / name).stat().st_mtime_ns] for name in names}
    identity = {**stamp, "manifest": file_sha256(folder / MANIFEST_FILE), "files": files}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _cpu_hash() -> str:
    """The CPU's model and instruction sets (Linux; else what the platform module says), hashed."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = ("model name", "flags", "Features", "CPU part")  # x86 and Arm names
        identity = "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))
    except OSError:
        identity = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _fill(
    staging: Path, folder: Path, manifest: Manifest, make_options: Callable[[], ort.SessionOptions], stamp: dict
) -> None:
    """Save every piece and step graph into staging, merging their data into DATA_FILE as each one is saved (so that
    only one graph's own data file exists at a time). Exports whose pieces take a mask (schema 3) get no step graphs:
    their steps do not run on plans."""
    pieces = {piece.name: piece for piece in manifest.pieces}
    graphs = {piece.graph: (folder / piece.graph).read_bytes() for piece in manifest.pieces}
    for entry in manifest.exits if manifest.schema_version >= LENGTHS_VERSION else []:
        graphs[step_graph_name(entry.exit)] = _step_graph(folder, entry.graph, [pieces[n] for n in entry.chain])
    with open(staging / DATA_FILE, "wb") as data:
        merged = _Merged(data)
        for name, graph in graphs.items():
            _save_optimised(graph, folder, staging, name, make_options())
            merged.take(staging, name)
    (staging / STAMP_FILE).write_text(json.dumps({**stamp, "graphs": sorted(graphs)}, indent=1))


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
    for key, value in SAVING.items():
        options.add_session_config_entry(key, value)
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
        """Move graph `name`'s own data into the shared file and point its tensors there; its own file goes. A graph
        without a single packed form is refused: its session would pack its weights on the heap after all."""
        own = staging / _own_data(name)
        model = model_class().FromString((staging / name).read_bytes())
        with open(own, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as source:
            packed_forms = sum(self._moved(tensor, source, name) for tensor in tensors(model) if tensor.external_data)
        if packed_forms == 0:
            raise ValueError(f"onnxruntime saved no packed weights for {name}")
        (staging / name).write_bytes(model.SerializeToString())
        own.unlink()

    def _moved(self, tensor: message.Message, source: mmap.mmap, name: str) -> int:
        """Put one tensor's data and packed forms into the shared file and point its entries there; how many packed
        forms it has."""
        place = {entry.key: entry.value for entry in tensor.external_data if entry.key in PLACE_KEYS}
        if place.get(b"location") != _own_data(name).encode():
            raise ValueError(f"{name}: a tensor's data in {place.get(b'location')!r}, not in its own data file")
        start = int(place.get(b"offset", b"0"))
        length = int(place[b"length"]) if b"length" in place else len(source) - start
        entries = [(b"location", DATA_FILE.encode()), (b"offset", b"%d" % self.put(source[start : start + length]))]
        entries.append((b"length", b"%d" % length))
        if b"checksum" in place:
            entries.append((b"checksum", place[b"checksum"]))
        packed_forms = 0
        for entry in tensor.external_data:  # the packed forms: one entry per kernel, in order
            if entry.key.startswith(PREPACKED):
                kernel_key, *buffers = entry.value.split(b"|")
                moved = []
                for buffer in buffers:
                    offset, size, checksum = buffer.split(b";")
                    blob = source[int(offset) : int(offset) + int(size)]
                    moved.append(b"%d;%s;%s" % (self.put(blob), size, checksum))
                entries.append((entry.key, b"|".join([kernel_key, *moved])))
                packed_forms += 1
            elif entry.key not in PLACE_KEYS:
                raise ValueError(f"{name}: unknown external-data key {entry.key!r} (a newer onnxruntime?)")
        del tensor.external_data[:]
        for key, value in entries:
            tensor.external_data.add(key=key, value=value)
        return packed_forms


def _remove_older(target: Path, stamp: dict) -> None:
    """Remove packed folders this module made that nothing will use again: for the same export folder those of an
    older format or of the same onnxruntime on the same CPU (so the export's files changed since), and those of this
    onnxruntime and CPU made for an export folder that no longer exists. Folders of another onnxruntime or CPU sharing
    this cache are another environment's (whose export paths may differ), and stay; so do staging folders."""
    for other in target.parent.iterdir():
        if other == target or other.name.startswith(".") or not (other / STAMP_FILE).is_file():
            continue
        try:
            written = json.loads((other / STAMP_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(written, dict) or not isinstance(written.get("export"), str):
            continue
        same_export = written["export"] == stamp["export"]
        older = isinstance(written.get("format"), int) and written["format"] < FORMAT
        same_environment = all(written.get(key) == stamp[key] for key in ("format", "onnxruntime", "cpu"))
        gone = not Path(written["export"]).is_dir()  # seen from here: only this environment's folders can tell
        if (same_export and older) or (same_environment and (same_export or gone)):
            shutil.rmtree(other, ignore_errors=True)
