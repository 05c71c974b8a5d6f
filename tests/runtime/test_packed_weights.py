"""Packed weights: every graph saved by onnxruntime with its weights packed, in one shared file, each blob once; step
graphs that give the chain's logits exactly; the folder made once per export, CPU and onnxruntime, and an engine
that runs the chain when it cannot be made."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from balcony_edge.runtime import Engine
from balcony_edge.runtime.core import packed_weights
from balcony_edge.runtime.core.onnx_subset import model_class, tensors


class Quiet:
    """A CPU that no other process keeps busy, whatever the machine running the tests is doing."""

    def contended(self) -> bool:
        return False


def _pair(export) -> dict[str, Engine]:
    steps = Engine.load(export, providers=["cpu"], threads=1)
    steps.contention = Quiet()
    return {"steps": steps, "chain": _chain(export)}


@pytest.fixture(scope="module")
def engines(tiny_export):
    return _pair(tiny_export)


@pytest.fixture(scope="module")
def tiny_export_int4(tiny_checkpoint, tmp_path_factory):
    from balcony_edge.export.exporter import ExportConfig, export_checkpoint

    out = tmp_path_factory.mktemp("exports") / "tiny-int4"
    return export_checkpoint(ExportConfig(checkpoint=tiny_checkpoint, out=out, quantize="int4"))


def _packed_folder(engine: Engine):
    assert engine.packed is not None
    return engine.packed.folder


def _switching_logits(engine: Engine, tokens: list[int], schedule: list[int]) -> np.ndarray:
    """Logits along `schedule` (an exit per step after a 4-token prompt); on a step-graph engine, every exit must
    have stepped on its step graph."""
    sequence = engine.sequence(tokens[:4])
    rows = []
    for position, exit in enumerate(schedule):
        rows.append(sequence.logits(exit))
        sequence.append(tokens[4 + position])
    if engine.step_graphs:
        assert {(exit, True) for exit in engine.exits} <= set(sequence._plans)
    return np.stack(rows)


def _check_exact(engines: dict[str, Engine], steps_per_exit: int, length: int, seed: int) -> None:
    steps, chain = engines["steps"], engines["chain"]
    assert sorted(steps.step_graphs) == steps.exits and chain.step_graphs == {}
    tokens = np.random.default_rng(seed).integers(0, steps.manifest.vocab_size, size=length + 10).tolist()
    # stretches at each exit (steps on the step graphs), deepenings and shallowings (catch-ups on the pieces)
    schedule = [steps.exits[(position // steps_per_exit) % len(steps.exits)] for position in range(length)]
    expected = _switching_logits(chain, tokens, schedule)
    np.testing.assert_array_equal(_switching_logits(steps, tokens, schedule), expected)


def test_step_graphs_give_the_chains_logits_exactly_across_switches(engines):
    _check_exact(engines, steps_per_exit=37, length=290, seed=5)  # across the cache's growth past 256 too


def test_int4_step_graphs_give_the_chains_logits_exactly(tiny_export_int4):
    _check_exact(_pair(tiny_export_int4), steps_per_exit=9, length=70, seed=8)


def test_an_int8_cache_export_steps_on_its_step_graphs_exactly(tiny_export_kv8):
    _check_exact(_pair(tiny_export_kv8), steps_per_exit=9, length=70, seed=6)


def test_every_blob_is_stored_once_and_the_packed_forms_are_kept(engines):
    folder = _packed_folder(engines["steps"])
    data = (folder / packed_weights.DATA_FILE).read_bytes()
    places: dict[bytes, set[int]] = {}  # content -> offsets it is stored at
    packed_forms = 0
    for name in json.loads((folder / packed_weights.STAMP_FILE).read_text())["graphs"]:
        for tensor in tensors(model_class().FromString((folder / name).read_bytes())):
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if not entries:
                continue
            assert entries[b"location"] == packed_weights.DATA_FILE.encode()
            spans = [(int(entries[b"offset"]), int(entries[b"length"]))]
            for key, value in entries.items():
                if key.startswith(packed_weights.PREPACKED):
                    offset, length, _ = value.split(b"|")[1].split(b";")
                    spans.append((int(offset), int(length)))
                    packed_forms += 1
            for offset, length in spans:
                assert offset % packed_weights.BLOB_ALIGNMENT == 0 and offset + length <= len(data)
                places.setdefault(hashlib.sha256(data[offset : offset + length]).digest(), set()).add(offset)
    assert packed_forms > 0  # onnxruntime saved the MatMuls' packed weights
    assert all(len(offsets) == 1 for offsets in places.values())


def test_the_packed_folder_is_made_once_and_reused(engines, monkeypatch):
    folder = _packed_folder(engines["steps"])
    made = []
    monkeypatch.setattr(packed_weights, "_fill", lambda *args: made.append(args))
    engine = Engine.load(engines["steps"].folder, providers=["cpu"], threads=1)
    assert made == [] and sorted(engine.step_graphs) == engine.exits
    assert _packed_folder(engine) == folder


def test_a_changed_export_gets_a_new_packed_folder_and_its_old_one_goes(tiny_export, tmp_path):
    import shutil

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    first = _packed_folder(Engine.load(export, providers=["cpu"], threads=1))
    graph = export / Engine.load(export, providers=["cpu"], threads=1).manifest.pieces[0].graph
    os.utime(graph, ns=(graph.stat().st_atime_ns, graph.stat().st_mtime_ns + 10**9))  # rewritten in place
    second = _packed_folder(Engine.load(export, providers=["cpu"], threads=1))
    assert second != first and (second / packed_weights.STAMP_FILE).is_file()
    assert not first.exists()


def test_without_a_writable_cache_the_engine_runs_the_chain_and_says_why_once(tiny_export, tmp_path, monkeypatch):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(blocked / "cache"))
    said = []
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1, warn=said.append)
    assert engine.step_graphs == {}
    assert len(said) == 1 and said[0].startswith("packed weights unavailable (") and "BALCONY_EDGE_CACHE" in said[0]
    tokens = list(range(3, 20))
    np.testing.assert_array_equal(engine.sequence(tokens).logits(1), _chain(tiny_export).sequence(tokens).logits(1))


def test_a_damaged_packed_folder_is_said_removed_and_made_again(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path / "cache"))
    folder = _packed_folder(Engine.load(tiny_export, providers=["cpu"], threads=1))
    (folder / packed_weights.DATA_FILE).write_bytes(b"")  # damaged on disk
    said = []
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1, warn=said.append)
    assert engine.step_graphs == {} and engine.packed is None and not folder.exists()
    assert len(said) == 1 and said[0].startswith(f"the packed weights in {folder} could not be opened (")
    tokens = list(range(3, 20))
    np.testing.assert_array_equal(engine.sequence(tokens).logits(1), _chain(tiny_export).sequence(tokens).logits(1))
    again = Engine.load(tiny_export, providers=["cpu"], threads=1)
    assert _packed_folder(again) == folder and sorted(again.step_graphs) == again.exits


def test_graphs_saved_without_packed_forms_are_refused_and_nothing_is_left(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path / "cache"))
    saving = packed_weights.SAVING | {"session.save_external_prepacked_constant_initializers": "0"}
    monkeypatch.setattr(packed_weights, "SAVING", saving)  # as an onnxruntime that saves no packed forms would
    said = []
    engine = Engine.load(tiny_export, providers=["cpu"], threads=1, warn=said.append)
    assert engine.step_graphs == {} and engine.packed is None
    assert len(said) == 1 and "onnxruntime did not save them (onnxruntime saved no packed weights for " in said[0]
    assert not [path for path in (tmp_path / "cache" / "packed").iterdir() if not path.name.endswith(".lock")]


def test_another_onnxruntimes_folders_stay_older_formats_and_orphans_go(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "cache" / "packed" / "made-by-another-onnxruntime"
    other.mkdir(parents=True)
    stamp = {"format": packed_weights.FORMAT, "export": str(tiny_export.resolve()), "onnxruntime": "0.0", "cpu": "x"}
    (other / packed_weights.STAMP_FILE).write_text(json.dumps(stamp))
    older = tmp_path / "cache" / "packed" / "made-in-an-older-format"
    older.mkdir()
    (older / packed_weights.STAMP_FILE).write_text(json.dumps(stamp | {"format": packed_weights.FORMAT - 1}))
    here = {"onnxruntime": ort.__version__, "cpu": packed_weights._cpu_hash(), "format": packed_weights.FORMAT}
    orphan = tmp_path / "cache" / "packed" / "made-here-for-an-export-since-deleted"
    orphan.mkdir()
    (orphan / packed_weights.STAMP_FILE).write_text(json.dumps(stamp | here | {"export": str(tmp_path / "gone")}))
    elsewhere = tmp_path / "cache" / "packed" / "made-elsewhere-for-a-path-not-here"
    elsewhere.mkdir()
    (elsewhere / packed_weights.STAMP_FILE).write_text(json.dumps(stamp | {"export": str(tmp_path / "gone")}))
    Engine.load(tiny_export, providers=["cpu"], threads=1)
    assert other.exists() and elsewhere.exists() and not older.exists() and not orphan.exists()


def _chain(export) -> Engine:
    return Engine.load(export, providers=["cpu"], threads=1, packed_weights=False)


def _saved_graph(staging, name: str, entries: list[tuple[bytes, bytes]], data: bytes) -> None:
    """A graph as onnxruntime saves one: one tensor whose external-data entries are `entries`, its own data file."""
    model = model_class()()
    tensor = model.graph.initializer.add(name=b"w", data_location=1)
    for key, value in entries:
        tensor.external_data.add(key=key, value=value)
    (staging / name).write_bytes(model.SerializeToString())
    (staging / packed_weights._own_data(name)).write_bytes(data)


def test_a_saved_graphs_blobs_move_into_the_shared_file_whatever_entries_onnxruntime_wrote(tmp_path):
    own = packed_weights._own_data("g.onnx").encode()
    data = b"W" * 10 + b"A" * 6 + b"B" * 4 + b"C" * 3
    entries = [  # no offset (0), a checksum kept, one kernel with two buffers, a second kernel with one
        (b"location", own),
        (b"length", b"10"),
        (b"checksum", b"7"),
        (b"prepacked_0", b"Kernel+1|10;6;0|16;4;0"),
        (b"prepacked_1", b"Other+2|20;3;5"),
    ]
    _saved_graph(tmp_path, "g.onnx", entries, data)
    with open(tmp_path / packed_weights.DATA_FILE, "wb") as shared:
        packed_weights._Merged(shared).take(tmp_path, "g.onnx")
    merged = (tmp_path / packed_weights.DATA_FILE).read_bytes()
    tensor = next(tensors(model_class().FromString((tmp_path / "g.onnx").read_bytes())))
    written = [(entry.key, entry.value) for entry in tensor.external_data]
    assert [key for key, _ in written] == [
        b"location",
        b"offset",
        b"length",
        b"checksum",
        b"prepacked_0",
        b"prepacked_1",
    ]
    place = dict(written)
    assert place[b"location"] == packed_weights.DATA_FILE.encode() and place[b"checksum"] == b"7"
    assert merged[int(place[b"offset"]) :][:10] == b"W" * 10
    kernel, *buffers = place[b"prepacked_0"].split(b"|")
    assert kernel == b"Kernel+1" and len(buffers) == 2
    for buffer, expected in zip(buffers + place[b"prepacked_1"].split(b"|")[1:], (b"A" * 6, b"B" * 4, b"C" * 3)):
        offset, length, checksum = buffer.split(b";")
        assert (
            merged[int(offset) : int(offset) + int(length)] == expected
            and int(offset) % packed_weights.BLOB_ALIGNMENT == 0
        )
    assert place[b"prepacked_1"].endswith(b";3;5") and not (tmp_path / packed_weights._own_data("g.onnx")).exists()


@pytest.mark.parametrize(
    ("entries", "refusal"),
    [
        ([(b"location", b"elsewhere.bin"), (b"length", b"1")], "not in its own data file"),
        ([(b"location", b"OWN"), (b"length", b"1"), (b"sliced", b"1")], "unknown external-data key"),
        ([(b"location", b"OWN"), (b"length", b"1")], "onnxruntime saved no packed weights for g.onnx"),
    ],
)
def test_a_saved_graph_that_is_not_as_expected_is_refused(tmp_path, entries, refusal):
    own = packed_weights._own_data("g.onnx").encode()
    _saved_graph(tmp_path, "g.onnx", [(key, own if value == b"OWN" else value) for key, value in entries], b"x")
    with open(tmp_path / packed_weights.DATA_FILE, "wb") as shared, pytest.raises(ValueError, match=refusal):
        packed_weights._Merged(shared).take(tmp_path, "g.onnx")
