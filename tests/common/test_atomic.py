"""Files and folders written whole or not at all."""

from __future__ import annotations

import threading
import time

import pytest

from balcony_edge.common.atomic import (
    atomic_path,
    exclusive_target,
    readable_folder,
    write_folder_atomically,
    write_text_atomically,
)
from balcony_edge.common.errors import BalconyError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    write_text_atomically(target, '{"old": true}\n')
    with pytest.raises(RuntimeError):
        with atomic_path(target) as partial:
            partial.write_text('{"new": ')
            raise RuntimeError("killed half way")
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_the_temporary_keeps_the_suffix_so_writers_pick_the_format(tmp_path):
    with atomic_path(tmp_path / "plot.png") as partial:
        assert partial.suffix == ".png" and partial.parent == tmp_path
        partial.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def test_a_folder_whose_rewrite_was_killed_between_the_renames_is_read_from_its_old_copy(tmp_path):
    target = tmp_path / "export"
    write_folder_atomically(target, lambda staging: (staging / "manifest.json").write_text("old"))
    retired = tmp_path / ".export.old-killed"
    retired.mkdir()
    target.rename(retired / "export")  # what a kill after the first of the two renames leaves
    assert readable_folder(target) == retired / "export"
    write_folder_atomically(target, lambda staging: (staging / "manifest.json").write_text("new"))
    assert readable_folder(target) == target and (target / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_waiting_writer_takes_the_lock_once_the_holder_is_done(tmp_path):
    target, events = tmp_path / "model", []

    def second() -> None:
        with exclusive_target(target, "the model", wait=True):
            events.append("second writes")

    with exclusive_target(target, "the model"):
        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive()  # blocked while the first holds the lock
        with pytest.raises(BalconyError, match="another process is writing the model"):
            with exclusive_target(target, "the model"):  # wait=False refuses at once
                pass
        events.append("first done")
    waiter.join(timeout=10)
    assert events == ["first done", "second writes"]
    assert [p.name for p in tmp_path.iterdir()] == []  # no lock file stays


def test_the_base_model_is_converted_once_when_two_processes_ask_at_once(tmp_path, monkeypatch):
    import balcony_edge.base_model as base_model

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path / "cache"))
    conversions = []

    def convert(path, target):  # slow, as a real dequantisation is
        conversions.append(path)
        time.sleep(0.3)
        write_folder_atomically(target, lambda staging: (staging / "config.json").write_text("{}"))
        return target

    monkeypatch.setattr(base_model, "_convert_gguf", convert)
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(base_model._converted_gguf(gguf))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(conversions) == 1 and len(folders) == 2 and folders[0] == folders[1]
    assert (folders[0] / "config.json").read_text() == "{}"
