"""`balcony-edge inspect`: what an export folder holds (exits, files, sizes), which onnxruntime providers
work here, and whether every file passes the runtime's checks (inside the folder, present, checksum)."""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnx import TensorProto, helper
from rich.console import JustifyMethod
from rich.markup import escape
from rich.table import Table

from balcony_edge.common.atomic import readable_folder
from balcony_edge.runtime.core.integrity import export_problems, path_problem
from balcony_edge.runtime.core.manifest import MANIFEST_FILE, QUANTIZED_KV_DTYPE, REPORT_FILE, Manifest
from balcony_edge.runtime.core.sessions import load_cuda_libraries

_PROBE_OPSET = 18
_PROBE_IR_VERSION = 10  # onnxruntime reads IR versions up to its own; 10 is old enough for all recent ones


@dataclass
class Inspection:
    """An export folder as found on disk."""

    folder: Path
    manifest: Manifest
    file_bytes: dict[str, int]  # every file in the folder -> size (bytes)
    providers: list[str]  # onnxruntime providers that attach to a session on this machine
    problems: dict[str, str]  # file -> why it fails a check of `runtime.integrity` (checksum and others)
    report: dict | None

    def to_json(self) -> dict:
        """What `inspect --json` prints: the manifest as written, file sizes, providers, problems and the report."""
        return {
            "folder": str(self.folder),
            "manifest": json.loads(self.manifest.to_json()),
            "file_bytes": self.file_bytes,
            "providers": self.providers,
            "problems": self.problems,
            "checks_ok": not self.problems,
            "report": self.report,
        }


def usable_providers() -> list[str]:
    """Providers built into onnxruntime that a session actually gets here (a GPU build may lack its GPU)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", _PROBE_OPSET)], ir_version=_PROBE_IR_VERSION
    )
    load_cuda_libraries()
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
    """Read an export folder's manifest and report, list its files and run the runtime's checks on them."""
    folder = readable_folder(Path(folder))
    manifest = Manifest.load(folder)
    problems = export_problems(folder, manifest)
    return Inspection(
        folder=folder,
        manifest=manifest,
        file_bytes={path.name: path.stat().st_size for path in sorted(folder.iterdir()) if path.is_file()},
        providers=usable_providers(),
        problems=problems,
        report=read_report(folder, problems),
    )


def read_report(folder: Path, problems: dict[str, str]) -> dict | None:
    """report.json as a dict; None if absent, failing a check, outside the folder, or not a JSON object."""
    path = folder / REPORT_FILE
    if REPORT_FILE in problems or path_problem(folder, REPORT_FILE) is not None or not path.is_file():
        return None
    try:
        report = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return report if isinstance(report, dict) else None


def verification_figures(report: dict | None) -> dict[int, tuple[str, str, str]]:
    """Exit -> max |diff|, top-1 agreement and greedy match from a report; exits with malformed figures left out."""
    figures: dict[int, tuple[str, str, str]] = {}
    if report is None:  # no report
        return figures
    try:
        checks = report["verification"]["exits"]
    except (KeyError, TypeError):  # not verified
        return figures
    for check in checks if isinstance(checks, list) else ():
        with contextlib.suppress(KeyError, TypeError, ValueError):  # a report.json the exporter did not write
            figures[check["exit"]] = (
                f"{check['max_abs_diff']:.1e}",
                f"{check['top1_agreement']:.3f}",
                f"{check['greedy_matched']}/{check['greedy_tokens']}",
            )
    return figures


def exits_table(folder: Path, manifest: Manifest, report: dict | None) -> Table:
    """One row per exit: layers, weights read per token, cache slots and the verification figures."""
    figures = verification_figures(report)
    precision = manifest.dtype + (f" + {manifest.quantization['method']}" if manifest.quantization else "")
    precision += ", int8 KV cache" if manifest.kv.dtype == QUANTIZED_KV_DTYPE else ""
    table = Table(title=escape(f"{manifest.base['name']}, {precision}: {folder}"))  # the name comes from the manifest
    for column in ("exit", "layers", "MB/token", "cache slots", "max |diff|", "top-1", "greedy"):
        table.add_column(column, justify="right", no_wrap=True)
    for entry in manifest.exits:
        backbone = f"0-{entry.exit - 1}" if entry.exit > 1 else "0"
        slots = backbone if entry.is_full else f"{backbone}, balcony.{entry.exit}"
        table.add_row(
            "full" if entry.is_full else str(entry.exit),
            str(entry.num_layers),
            f"{entry.weight_bytes_per_token / 1e6:.1f}",
            slots,
            *figures.get(entry.exit, ("-", "-", "-")),
        )
    return table


def files_table(inspection: Inspection) -> Table:
    """One row per file: size and check state (every file the manifest names or the folder holds)."""
    table = Table(title="files")
    columns: tuple[tuple[str, JustifyMethod], ...] = (("file", "left"), ("MB", "right"), ("check", "left"))
    for column, justify in columns:
        table.add_column(column, justify=justify)
    names = sorted(
        set(inspection.file_bytes) | set(inspection.manifest.files) | set(inspection.problems) | {MANIFEST_FILE}
    )
    for name in names:
        size = inspection.file_bytes.get(name)
        state = (
            "manifest"
            if name == MANIFEST_FILE
            else inspection.problems.get(name, "ok" if name in inspection.manifest.files else "not listed")
        )
        colour = "green" if state in ("ok", "manifest") else "red"
        table.add_row(
            escape(name), f"{size / 1e6:.2f}" if size is not None else "-", f"[{colour}]{escape(state)}[/{colour}]"
        )
    return table
