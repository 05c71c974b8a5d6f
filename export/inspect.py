"""`balcony-edge inspect`: what an export folder holds (exits, files, sizes), which onnxruntime providers
work here, and whether every file still matches its manifest checksum."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnx import TensorProto, helper
from rich.table import Table

from ..runtime.manifest import MANIFEST_FILE, REPORT_FILE, Manifest, checksum_failures

_PROBE_OPSET = 18
_PROBE_IR_VERSION = 10  # onnxruntime reads IR versions up to its own; 10 is old enough for all recent ones


@dataclass
class Inspection:
    """An export folder as found on disk."""

    folder: Path
    manifest: Manifest
    file_bytes: dict[str, int]  # every file in the folder -> size (bytes)
    providers: list[str]  # onnxruntime providers that attach to a session on this machine
    checksum_failures: dict[str, str]  # file -> why it fails
    report: dict | None


def usable_providers() -> list[str]:
    """Providers built into onnxruntime that a session actually gets here (a GPU build may lack its GPU)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _PROBE_OPSET)], ir_version=_PROBE_IR_VERSION)
    ort.set_default_logger_severity(4)  # a provider that cannot start logs an error; here that is the answer
    options = ort.SessionOptions()
    options.log_severity_level = 4
    usable = []
    for provider in ort.get_available_providers():
        # onnxruntime prints "EP Error ... Falling back" on stdout when a provider cannot start.
        with contextlib.redirect_stdout(io.StringIO()):
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=[provider])
        if provider in session.get_providers():
            usable.append(provider)
    return usable


def inspect_export(folder: Path | str) -> Inspection:
    """Read an export folder's manifest and report, list its files and check their checksums."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    report_path = folder / REPORT_FILE
    return Inspection(
        folder=folder,
        manifest=manifest,
        file_bytes={path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()},
        providers=usable_providers(),
        checksum_failures=checksum_failures(folder, manifest),
        report=json.loads(report_path.read_text()) if report_path.is_file() else None,
    )


def exits_table(folder: Path, manifest: Manifest, report: dict | None) -> Table:
    """One row per exit: layers, weights read per token, cache slots and the verification figures."""
    checks = {c["exit"]: c for c in ((report or {}).get("verification") or {}).get("exits", [])}
    precision = manifest.dtype + (f" + {manifest.quantization['method']}" if manifest.quantization else "")
    table = Table(title=f"{manifest.base['name']}, {precision}: {folder}")
    for column in ("exit", "layers", "MB/token", "cache slots", "max |diff|", "top-1", "greedy"):
        table.add_column(column, justify="right", no_wrap=True)
    for entry in manifest.exits:
        check = checks.get(entry.exit)
        figures = (
            (f"{check['max_abs_diff']:.1e}", f"{check['top1_agreement']:.3f}", f"{check['greedy_matched']}/{check['greedy_tokens']}")
            if check
            else ("-", "-", "-")
        )
        backbone = f"0-{entry.exit - 1}" if entry.exit > 1 else "0"
        slots = backbone if entry.is_full else f"{backbone}, {entry.cache_slots[-1]}"
        table.add_row(
            "full" if entry.is_full else str(entry.exit),
            str(entry.num_layers),
            f"{entry.weight_bytes_per_token / 1e6:.1f}",
            slots,
            *figures,
        )
    return table


def files_table(inspection: Inspection) -> Table:
    """One row per file: size and checksum state."""
    table = Table(title="files")
    for column, justify in (("file", "left"), ("MB", "right"), ("sha256", "left")):
        table.add_column(column, justify=justify)
    names = sorted(set(inspection.file_bytes) | set(inspection.manifest.files) | {MANIFEST_FILE})
    for name in names:
        size = inspection.file_bytes.get(name)
        state = "manifest" if name == MANIFEST_FILE else inspection.checksum_failures.get(name, "ok" if name in inspection.manifest.files else "not listed")
        colour = "green" if state in ("ok", "manifest") else "red"
        table.add_row(name, f"{size / 1e6:.2f}" if size is not None else "-", f"[{colour}]{state}[/{colour}]")
    return table
