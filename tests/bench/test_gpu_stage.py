"""Slices for a GPU machine that takes a limited number of bytes a call (scripts/gpu/gpu_stage.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "scripts" / "gpu" / "gpu_stage.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_stage", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slices_fill_each_call_in_order_and_join_back_into_the_files(tmp_path):
    stage = load_script()
    files = {
        "small.tar.xz": bytes(range(256)) * 3,
        "model.xz": bytes(reversed(range(256))) * 10,
        "ort.tar.xz": b"o" * 1000,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    folders = stage.slice_files([tmp_path / name for name in files], tmp_path / "stage", room=1000)
    total = sum(map(len, files.values()))
    assert [f.name for f in folders] == [f"c{i}" for i in range(1, -(-total // 1000) + 1)]
    assert all(sum(p.stat().st_size for p in folder.iterdir()) <= 1000 for folder in folders)
    assert sum(p.stat().st_size for p in folders[0].iterdir()) == 1000  # the first calls go full
    assert {p.name for p in folders[0].iterdir()} == {
        "small.tar.xz.part001",
        "model.xz.part001",
    }  # the first file first
    for name, data in files.items():
        parts = sorted((p for folder in folders for p in folder.glob(f"{name}.part*")), key=lambda p: p.name)
        assert b"".join(p.read_bytes() for p in parts) == data  # `cat NAME.part* > NAME` on the machine


def test_no_room_or_a_missing_file_is_a_one_line_refusal(tmp_path):
    stage = load_script()
    (tmp_path / "a.xz").write_bytes(b"a")
    with pytest.raises(SystemExit, match="no room left in a call"):
        stage.slice_files([tmp_path / "a.xz"], tmp_path / "stage", room=0)
    with pytest.raises(SystemExit, match="give existing files"):
        stage.slice_files([tmp_path / "b.xz"], tmp_path / "stage", room=10)
