"""Untrusted export folders: every file the manifest names stays inside the folder and exists, every graph keeps its
external data in the weights file, every weight lies inside it, every file matches its checksum; else one line."""

from __future__ import annotations

import builtins
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data
from rich.console import Console

from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.errors import IntegrityError, ManifestError
from balcony_edge.export.inspect import exits_table, files_table, inspect_export
from balcony_edge.runtime.core import onnx_subset
from balcony_edge.runtime.core.integrity import check_export_files, export_problems
from balcony_edge.runtime.core.manifest import Manifest

FIX = "export again (`balcony-edge export --force`)"
MODIFIED_FIX = "sha256 differs from manifest.json; export again, or pass --trust-modified to load it anyway"


@pytest.fixture
def export(tiny_export, tmp_path) -> Path:
    """A copy of the tiny export that a test may damage, at tmp_path/export."""
    return Path(shutil.copytree(tiny_export, tmp_path / "export"))


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file beside the export folder, outside it: no check may open it."""
    path = tmp_path / "secret.txt"
    path.write_text("not yours")
    return path


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Every path opened through open() or Path.open/read_bytes while the test runs, resolved."""
    paths: list[Path] = []
    real_open = io.open

    def spy(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            paths.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    monkeypatch.setattr(io, "open", spy)
    return paths


def _refusal(folder: Path, manifest: Manifest, trust_modified: bool = False) -> str:
    """The one-line IntegrityError check_export_files refuses the folder with."""
    with pytest.raises(IntegrityError) as error:
        check_export_files(
            folder, manifest, trust_modified=trust_modified, warn=lambda line: pytest.fail(f"warned: {line}")
        )
    assert "\n" not in str(error.value)
    return str(error.value)


def _flip_byte(path: Path, at: int = 100) -> None:
    with open(path, "r+b") as handle:
        handle.seek(at)
        byte = handle.read(1)
        handle.seek(at)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_a_clean_export_passes_and_every_file_it_names_is_hashed(tiny_export, opened):
    manifest = Manifest.load(tiny_export)
    check_export_files(tiny_export, manifest, warn=lambda line: pytest.fail(f"warned: {line}"))
    assert export_problems(tiny_export, manifest) == {}
    assert {tiny_export.resolve() / name for name in manifest.files} <= set(opened)  # the spy sees every read


# --- 1. paths stay inside the folder, checked before any file is opened -------------------------------------


def _absolute_tokenizer(export: Path, manifest: Manifest, secret: Path) -> str:
    manifest.tokenizer_files = [str(secret)]
    return f"{str(secret)!r} is an absolute path, not a file of the export folder"


def _climbing_chat_template(export: Path, manifest: Manifest, secret: Path) -> str:
    manifest.chat_template = "../secret.txt"
    return "'../secret.txt' is a path through '..', out of the export folder"


def _absolute_graph(export: Path, manifest: Manifest, secret: Path) -> str:
    manifest.exits[0] = dataclasses.replace(manifest.exits[0], graph=str(secret))
    return f"{str(secret)!r} is an absolute path"


def _climbing_weights_file(export: Path, manifest: Manifest, secret: Path) -> str:
    manifest.weights_file = "../export/../secret.txt"
    return "'../export/../secret.txt' is a path through '..'"


def _symlinked_tokenizer(export: Path, manifest: Manifest, secret: Path) -> str:
    (export / "tokenizer.json").unlink()
    (export / "tokenizer.json").symlink_to(secret)
    return f"'tokenizer.json' is a symlink out of the export folder; {FIX}"


def _symlinked_parent(export: Path, manifest: Manifest, secret: Path) -> str:
    (export / "shared").symlink_to(secret.parent, target_is_directory=True)
    manifest.files["shared/secret.txt"] = file_sha256(secret)
    return "'shared/secret.txt' is a symlink out of the export folder"


def _symlink_loop(export: Path, manifest: Manifest, secret: Path) -> str:
    (export / "loop").symlink_to("loop")
    manifest.files["loop"] = "00" * 32
    return f"'loop' is a symlink loop; {FIX}"


@pytest.mark.parametrize(
    "damage",
    [
        _absolute_tokenizer,
        _climbing_chat_template,
        _absolute_graph,
        _climbing_weights_file,
        _symlinked_tokenizer,
        _symlinked_parent,
        _symlink_loop,
    ],
)
@pytest.mark.parametrize("trust_modified", [False, True])
def test_a_file_name_leading_out_of_the_folder_is_refused_without_opening_anything(
    export, secret, opened, damage, trust_modified
):
    manifest = Manifest.load(export)
    expected = damage(export, manifest, secret)
    opened.clear()
    message = _refusal(export, manifest, trust_modified)
    assert message.startswith(f"{export}: ") and expected in message and message.endswith(FIX)
    assert opened == []  # refused on names and links alone: not a graph parsed, not a file hashed


def test_a_symlink_that_stays_inside_the_folder_is_accepted(export):
    (export / "tokenizer.json").rename(export / "tokenizer.real.json")
    (export / "tokenizer.json").symlink_to("tokenizer.real.json")
    check_export_files(export, Manifest.load(export))


# --- 3. missing files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["exit_1.onnx", "full.onnx", "weights.bin", "tokenizer.json", "chat_template.jinja", "report.json"]
)
def test_a_missing_file_is_named_with_the_fix(export, name):
    (export / name).unlink()
    assert _refusal(export, Manifest.load(export), trust_modified=True) == f"{export}: {name!r} is missing; {FIX}"


def test_a_folder_in_place_of_a_file_is_refused_before_it_is_read(export):
    (export / "tokenizer.json").unlink()
    (export / "tokenizer.json").mkdir()
    assert _refusal(export, Manifest.load(export)) == f"{export}: 'tokenizer.json' is not a regular file; {FIX}"


# --- 2. external data of every graph points into the weights file only --------------------------------------


def _external_tensor(location: str | None, name: str = "w") -> TensorProto:
    """A one-float tensor whose data lies at location (None: external, with no location at all)."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [1], b"\0\0\0\0", raw=True)
    set_external_data(tensor, location or "", offset=0, length=4)
    if location is None:
        del tensor.external_data[:]
    tensor.ClearField("raw_data")
    return tensor


def _graph(nodes=(), initializer=(), sparse_initializer=()) -> onnx.GraphProto:
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_graph(
        list(nodes), "g", [], [output], initializer=list(initializer), sparse_initializer=list(sparse_initializer)
    )


def _sparse(tensor: TensorProto) -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(tensor, helper.make_tensor("i", TensorProto.INT64, [1], [0]), [1])


# Every place of onnx.proto a tensor can sit in, as a model holding the given tensor there.
PLACES = {
    "initializer": lambda t: helper.make_model(_graph(initializer=[t])),
    "Constant value": lambda t: helper.make_model(_graph([helper.make_node("Constant", [], ["y"], value=t)])),
    "tensor list attribute": lambda t: helper.make_model(
        _graph([helper.make_node("Custom", [], ["y"], domain="x", tensors=[t])])
    ),
    "If branch initializer": lambda t: helper.make_model(
        _graph([helper.make_node("If", ["c"], ["y"], then_branch=_graph(initializer=[t]), else_branch=_graph())])
    ),
    "graph list attribute": lambda t: helper.make_model(
        _graph([helper.make_node("Custom", [], ["y"], domain="x", graphs=[_graph(initializer=[t])])])
    ),
    "sparse initializer values": lambda t: helper.make_model(_graph(sparse_initializer=[_sparse(t)])),
    "sparse Constant value": lambda t: helper.make_model(
        _graph([helper.make_node("Constant", [], ["y"], sparse_value=_sparse(t))])
    ),
    "function body": lambda t: helper.make_model(
        _graph(),
        functions=[helper.make_function("x", "f", [], ["y"], [helper.make_node("Constant", [], ["y"], value=t)], [])],
    ),
    "training initialization": lambda t: _with_training_info(helper.make_model(_graph()), _graph(initializer=[t])),
}


def _with_training_info(model: onnx.ModelProto, initialization: onnx.GraphProto) -> onnx.ModelProto:
    model.training_info.add().initialization.CopyFrom(initialization)
    return model


def _replace_graph(export: Path, manifest: Manifest, model: onnx.ModelProto, name: str = "exit_1.onnx") -> None:
    """Write model as graph `name`, with its checksum updated: only the location check can refuse it."""
    (export / name).write_bytes(model.SerializeToString())  # not onnx.save: it would write external data
    manifest.files[name] = file_sha256(export / name)


@pytest.mark.parametrize("place", PLACES)
def test_external_data_outside_the_weights_file_is_refused_wherever_the_tensor_sits(export, place):
    manifest = Manifest.load(export)
    _replace_graph(export, manifest, PLACES[place](_external_tensor("/etc/passwd")))
    expected = (
        f"{export}: 'exit_1.onnx' is a graph whose tensor 'w' keeps "
        f"its data in '/etc/passwd', not in weights.bin; {FIX}"
    )
    assert _refusal(export, manifest, trust_modified=True) == expected


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        ("../weights.bin", "'../weights.bin'"),
        ("./weights.bin", "'./weights.bin'"),
        ("report.json", "'report.json'"),
        (None, "no location"),
    ],
)
def test_any_location_but_the_weights_file_itself_is_refused(export, location, shown):
    manifest = Manifest.load(export)
    _replace_graph(export, manifest, PLACES["initializer"](_external_tensor(location)), "full.onnx")
    assert f"'full.onnx' is a graph whose tensor 'w' keeps its data in {shown}, not in weights.bin" in _refusal(
        export, manifest
    )


def test_an_exported_graph_edited_to_read_outside_is_refused(export):
    manifest = Manifest.load(export)
    model = onnx.load(export / "exit_2.onnx", load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    next(entry for entry in tensor.external_data if entry.key == "location").value = "../../weights.bin"
    _replace_graph(export, manifest, model, "exit_2.onnx")
    assert f"{tensor.name!r} keeps its data in '../../weights.bin', not in weights.bin" in _refusal(export, manifest)


def test_a_graph_that_is_no_protobuf_is_refused(export):
    manifest = Manifest.load(export)
    (export / "exit_1.onnx").write_bytes(b"\xff" * 64)
    assert (
        _refusal(export, manifest, trust_modified=True)
        == f"{export}: 'exit_1.onnx' is not an ONNX model (its protobuf does not parse); {FIX}"
    )


# The subset's flat names of onnx.proto's nested messages.
NESTED = {"TypeProtoTensor": onnx.TypeProto.Tensor, "Dimension": onnx.TensorShapeProto.Dimension}


def test_the_onnx_subset_has_the_field_numbers_of_onnx_proto():
    for message_name, fields in onnx_subset.ONNX_SUBSET.items():
        descriptor = (NESTED.get(message_name) or getattr(onnx, message_name)).DESCRIPTOR
        for field_name, (number, kind, repeated) in fields.items():
            field = descriptor.fields_by_name[field_name]
            assert (field.number, field.is_repeated) == (number, repeated), f"{message_name}.{field_name}"
            expected = NESTED[kind].DESCRIPTOR.name if kind in NESTED else kind
            assert field.message_type is None or field.message_type.name == expected, f"{message_name}.{field_name}"


def test_a_piece_graph_edited_to_read_outside_is_refused(export):
    manifest = Manifest.load(export)
    piece = manifest.pieces[0].graph
    model = onnx.load(export / piece, load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    next(entry for entry in tensor.external_data if entry.key == "location").value = "/etc/passwd"
    _replace_graph(export, manifest, model, piece)
    assert f"{piece!r} is a graph whose tensor {tensor.name!r} keeps its data in '/etc/passwd'" in _refusal(
        export, manifest
    )


def test_a_manifest_whose_cache_heads_differ_from_the_graphs_is_refused(export):
    manifest = Manifest.load(export)
    manifest.kv = dataclasses.replace(manifest.kv, num_kv_heads=manifest.kv.num_kv_heads + 1)
    refusal = _refusal(export, manifest)
    assert "a graph whose input 'past_key_values.layer.0.key' is of type 1 and shape" in refusal
    assert f"where the manifest says type 1 and shape [None, {manifest.kv.num_kv_heads}, None" in refusal


def test_a_piece_graph_swapped_for_another_is_refused(export):
    manifest = Manifest.load(export)
    first, second = manifest.pieces[0].graph, manifest.pieces[1].graph
    swapped = (export / first).read_bytes()
    (export / first).write_bytes((export / second).read_bytes())
    (export / second).write_bytes(swapped)
    manifest.files[first], manifest.files[second] = file_sha256(export / first), file_sha256(export / second)
    assert f"{first!r} is a graph whose inputs are not those of piece" in _refusal(export, manifest)


# --- 5. weights inside the weights file ----------------------------------------------------------------------


def test_a_weights_file_too_short_for_its_weights_is_refused_even_when_trusted(export):
    manifest = Manifest.load(export)
    name, entry = max(manifest.weights.items(), key=lambda item: item[1].offset)
    size = entry.offset  # cut where the last weight starts
    os.truncate(export / "weights.bin", size)
    expected = (
        f"'weights.bin' is too short ({size} bytes) for weight {name!r}, "
        f"which ends at byte {entry.offset + entry.length}; {FIX}"
    )
    assert expected in _refusal(export, manifest, trust_modified=True)


# --- 4. checksums -----------------------------------------------------------------------------------------


def test_a_modified_file_is_refused_with_both_fixes(export):
    _flip_byte(export / "weights.bin")
    assert _refusal(export, Manifest.load(export)) == f"{export}: 'weights.bin': {MODIFIED_FIX}"


def test_trusting_modified_files_warns_once_naming_them_and_loads(export):
    _flip_byte(export / "weights.bin")
    _flip_byte(export / "tokenizer.json", at=10)
    warnings: list[str] = []
    check_export_files(export, Manifest.load(export), trust_modified=True, warn=warnings.append)
    assert warnings == [
        f"{export}: 'tokenizer.json', 'weights.bin': sha256 differs "
        "from manifest.json; loading anyway (--trust-modified)"
    ]


def test_a_file_the_manifest_does_not_list_is_no_problem(export):
    (export / "notes.txt").write_text("mine")
    check_export_files(export, Manifest.load(export))


# --- all checks at once, for inspect ----------------------------------------------------------------------


def test_export_problems_lists_every_failing_file_without_opening_the_ones_outside(export, secret, opened):
    (export / "exit_1.onnx").unlink()
    (export / "tokenizer.json").unlink()
    (export / "tokenizer.json").symlink_to(secret)
    _flip_byte(export / "weights.bin")
    manifest = Manifest.load(export)
    _replace_graph(export, manifest, PLACES["initializer"](_external_tensor("/etc/passwd")), "full.onnx")
    opened.clear()
    assert export_problems(export, manifest) == {
        "tokenizer.json": "a symlink out of the export folder",
        "exit_1.onnx": "missing",
        "full.onnx": "a graph whose tensor 'w' keeps its data in '/etc/passwd', not in weights.bin",
        "weights.bin": "sha256 differs",
    }
    assert secret.resolve() not in opened and export.resolve() / "report.json" in opened


def _rendered(table) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return console.file.getvalue()


def test_inspect_reports_the_problems_instead_of_raising(export, secret):
    (export / "tokenizer.json").unlink()
    (export / "tokenizer.json").symlink_to(secret)
    (export / "[red]odd.txt").write_text("a file name rich would read as markup")
    inspection = inspect_export(export)
    assert inspection.problems == {"tokenizer.json": "a symlink out of the export folder"}
    table = _rendered(files_table(inspection))
    assert "[red]odd.txt" in table and "a symlink out of the export folder" in table


def test_inspect_shows_the_figures_of_a_malformed_report_as_dashes(export):
    report = json.loads((export / "report.json").read_text())
    report["verification"]["exits"][0]["max_abs_diff"] = "big"
    report["verification"]["exits"].append(7)
    (export / "report.json").write_text(json.dumps(report))
    manifest = Manifest.load(export)
    manifest.files["report.json"] = file_sha256(export / "report.json")
    (export / "manifest.json").write_text(manifest.to_json())

    inspection = inspect_export(export)
    assert inspection.problems == {} and inspection.report == report
    rows = [line for line in _rendered(exits_table(export, manifest, inspection.report)).splitlines() if "│" in line]
    assert [row.split("│")[1].strip() for row in rows] == ["1", "2", "full"]
    assert rows[0].split("│")[5].strip() == "-" and rows[1].split("│")[7].strip() == "32/32"


def test_integrity_error_is_a_manifest_error():
    assert issubclass(IntegrityError, ManifestError)


def test_check_export_files_runs_with_torch_and_onnx_blocked(tiny_export):
    script = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnx'):
            raise ImportError(name + ' is blocked: the runtime must not need it')
sys.meta_path.insert(0, Blocker())
from balcony_edge.runtime.core.integrity import check_export_files
from balcony_edge.runtime.core.manifest import Manifest
check_export_files({str(tiny_export)!r}, Manifest.load({str(tiny_export)!r}))
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
