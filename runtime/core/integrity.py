"""Whether an export folder can be opened: every file its manifest names lies inside it and exists, every graph keeps
its external data in the weights file only, every piece's graph has the inputs and outputs the manifest describes,
every weight lies inside that file, and every file matches its checksum.

Torch- and onnx-free: graphs are read with protobuf through `onnx_subset`. Checks run in that order, and a file
that fails one is not touched by the next: a name that leads out of the folder is never opened.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from google.protobuf import message

from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.console import log_warning
from balcony_edge.common.errors import IntegrityError
from balcony_edge.runtime.core.manifest import (
    EXIT_HIDDEN,
    FIX,
    INPUT_IDS,
    KV_DTYPES,
    LENGTHS_VERSION,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    Piece,
    hidden_name,
)
from balcony_edge.runtime.core.onnx_subset import ELEM_TYPES, EXTERNAL, model_class, tensors

MODIFIED = "sha256 differs"  # why a file that changed since the export is named


def check_export_files(
    folder: Path | str, manifest: Manifest, trust_modified: bool = False, warn: Callable[[str], None] | None = None
) -> None:
    """Refuse an export folder that fails a check, in one line; changed files pass with trust_modified (warn names them;
    default: a Python RuntimeWarning)."""
    problems = _problems(Path(folder), manifest, stop_early=True)
    modified = [repr(name) for name, why in problems.items() if why == MODIFIED]  # repr: one line, whatever the name
    for name, why in problems.items():
        if why != MODIFIED:
            raise IntegrityError(f"{folder}: {name!r} is {why}; {FIX}")
    if modified and not trust_modified:
        raise IntegrityError(
            f"{folder}: {', '.join(modified)}: sha256 differs from manifest.json; "
            "export again, or pass --trust-modified to load it anyway"
        )
    if modified:
        (warn or log_warning)(
            f"{folder}: {', '.join(modified)}: sha256 differs from manifest.json; loading anyway (--trust-modified)"
        )


def export_problems(folder: Path | str, manifest: Manifest) -> dict[str, str]:
    """Every file of an export folder that fails a check -> why (`check_export_files`'s checks, all run); empty when all
    pass."""
    return _problems(Path(folder), manifest, stop_early=False)


def _problems(folder: Path, manifest: Manifest, stop_early: bool) -> dict[str, str]:
    """File -> why, check by check; stop_early: stop after the first check that finds any (checksums come last)."""
    problems: dict[str, str] = {}
    checks = (_unsafe_paths, _missing_files, _foreign_external_data, _io_mismatches, _weights_past_end, _modified_files)
    for check in checks:
        if problems and stop_early:
            break
        for name, why in check(folder, manifest, set(problems)).items():
            problems.setdefault(name, why)
    return problems


def _unsafe_paths(folder: Path, manifest: Manifest, skip: set[str]) -> dict[str, str]:
    return {name: why for name in manifest.named_files() if (why := path_problem(folder, name)) is not None}


def path_problem(folder: Path, name: str) -> str | None:
    """Why a file name from an untrusted source does not lead to a file inside folder, or None; opens nothing."""
    root = folder.resolve()
    if not name or "\0" in name:
        return "not a file name"
    if Path(name).is_absolute():
        return "an absolute path, not a file of the export folder"
    if ".." in Path(name).parts:
        return "a path through '..', out of the export folder"
    try:
        inside = (root / name).resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11 reports a symlink loop so
        return "a symlink loop"
    return None if inside else "a symlink out of the export folder"


def _missing_files(folder: Path, manifest: Manifest, skip: set[str]) -> dict[str, str]:
    problems = {}
    for name in manifest.named_files():
        if name in skip:
            continue
        path = folder / name
        if not path.exists():
            problems[name] = "missing"
        elif not path.is_file():  # a folder, a FIFO or a device would block or fail the reads that follow
            problems[name] = "not a regular file"
        elif not os.access(path, os.R_OK):
            problems[name] = "unreadable (check its permissions)"
    return problems


def _graphs(manifest: Manifest) -> list[str]:
    """Every graph file: the pieces the engine runs and the standard exit graphs other clients run."""
    return list(dict.fromkeys([piece.graph for piece in manifest.pieces] + [entry.graph for entry in manifest.exits]))


def _foreign_external_data(folder: Path, manifest: Manifest, skip: set[str]) -> dict[str, str]:
    graphs = [name for name in _graphs(manifest) if name not in skip]
    return {
        name: why
        for name in graphs
        if (why := _external_data_problem(folder / name, manifest.weights_file)) is not None
    }


def _external_data_problem(path: Path, weights_file: str) -> str | None:
    """Why a graph's tensors may read data from anywhere but weights_file (onnxruntime would read it), or None."""
    try:
        model = model_class().FromString(path.read_bytes())
    except message.DecodeError:
        return "not an ONNX model (its protobuf does not parse)"
    for tensor in tensors(model):
        locations = [entry.value for entry in tensor.external_data if entry.key == b"location"]
        if (locations or tensor.data_location == EXTERNAL) and locations != [weights_file.encode()]:
            shown = (
                ", ".join(repr(location.decode(errors="backslashreplace")) for location in locations) or "no location"
            )
            return (
                f"a graph whose tensor {tensor.name.decode(errors='backslashreplace')!r} "
                f"keeps its data in {shown}, not in {weights_file}"
            )
    return None


def _io_mismatches(folder: Path, manifest: Manifest, skip: set[str]) -> dict[str, str]:
    problems = {}
    for piece in manifest.pieces:
        if piece.graph not in skip and (why := _io_problem(folder / piece.graph, piece, manifest)) is not None:
            problems[piece.graph] = why
    return problems


def _expected_io(piece: Piece, manifest: Manifest) -> tuple[dict, dict]:
    """A piece's inputs and outputs as the manifest describes them: name -> (onnx element type, shape with None for
    any size)."""
    kv, names = manifest.kv, manifest.io_names
    activation = ELEM_TYPES[KV_DTYPES[manifest.dtype]]
    cache = (ELEM_TYPES[kv.dtype], (None, kv.num_kv_heads, None, kv.head_dim))
    hidden = (activation, (None, None, kv.hidden_size))
    inputs: dict[str, tuple] = {}
    outputs: dict[str, tuple]
    if piece.kind == "head":
        inputs[EXIT_HIDDEN] = hidden
        outputs = {names["logits"]: (activation, (None, None, manifest.vocab_size))}
    else:
        first = INPUT_IDS if piece.kind == "segment" and piece.first_layer == 0 else hidden_name(piece.first_layer)
        inputs[first] = (ELEM_TYPES["int64"], (None, None)) if first == INPUT_IDS else hidden
        if manifest.schema_version >= LENGTHS_VERSION:
            inputs |= {SEQLENS_K: (ELEM_TYPES["int32"], (None,)), TOTAL_SEQUENCE_LENGTH: (ELEM_TYPES["int32"], ())}
        else:
            inputs[names["attention_mask"]] = (ELEM_TYPES["int64"], (None, None))
        last = piece.kind == "balcony" or piece.end_layer == manifest.num_layers
        outputs = {EXIT_HIDDEN if last else hidden_name(piece.end_layer): hidden}
    for slot in piece.cache_slots:
        inputs |= {names["past_key"].format(slot=slot): cache, names["past_value"].format(slot=slot): cache}
        outputs |= {names["present_key"].format(slot=slot): cache, names["present_value"].format(slot=slot): cache}
    return inputs, outputs


def _io_problem(path: Path, piece: Piece, manifest: Manifest) -> str | None:
    """Why a piece's graph does not take and give what the manifest says it does (another piece's graph, other KV
    heads), or None; onnxruntime would otherwise fail later, with an error about dimensions."""
    try:
        graph = model_class().FromString(path.read_bytes()).graph
    except message.DecodeError:
        return "not an ONNX model (its protobuf does not parse)"
    for kind, declared, expected in zip(
        ("input", "output"), (graph.input, graph.output), _expected_io(piece, manifest)
    ):
        found = {value.name.decode(errors="backslashreplace"): value for value in declared}
        if set(found) != set(expected):
            missing, other = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            shown = f"lacks {missing[0]!r}" if missing else f"has {other[0]!r}"
            return f"a graph whose {kind}s are not those of piece {piece.name!r} in the manifest (it {shown})"
        for name, (elem_type, shape) in expected.items():
            tensor = found[name].type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
            fits = len(dims) == len(shape) and all(want is None or have == want for have, want in zip(dims, shape))
            if tensor.elem_type != elem_type or not fits:
                return (
                    f"a graph whose {kind} {name!r} is of type {tensor.elem_type} and shape {dims}, "
                    f"where the manifest says type {elem_type} and shape {list(shape)}"
                )
    return None


def _weights_past_end(folder: Path, manifest: Manifest, skip: set[str]) -> dict[str, str]:
    if manifest.weights_file in skip:
        return {}
    size = (folder / manifest.weights_file).stat().st_size
    for name, entry in manifest.weights.items():
        if entry.offset + entry.length > size:
            end = entry.offset + entry.length
            return {manifest.weights_file: f"too short ({size} bytes) for weight {name!r}, which ends at byte {end}"}
    return {}


def _modified_files(folder: Path, manifest: Manifest, skip: set[str]) -> dict[str, str]:
    return {
        name: MODIFIED
        for name, expected in sorted(manifest.files.items())
        if name not in skip and file_sha256(folder / name) != expected
    }
