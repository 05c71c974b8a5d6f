"""Files and folders written whole or not at all."""

from __future__ import annotations

import pytest

from balcony_edge.common.atomic import atomic_path, readable_folder, write_folder_atomically, write_text_atomically


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
