"""An export records the checkpoint it came from; the default export is made again when the shipped balconies or their
recorded answers change."""

import json

import pytest

from balcony_edge import cli
from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.paths import (
    CHECKPOINT_CONFIG_FILE,
    CHECKPOINT_WEIGHTS_FILE,
    SHIPPED_CHECKPOINT,
    default_export_dir,
)
from balcony_edge.export import exporter
from balcony_edge.export.provenance import older_than_shipped

SHIPPED_SHA = file_sha256(SHIPPED_CHECKPOINT / CHECKPOINT_WEIGHTS_FILE)
SHIPPED_CONFIG_SHA = file_sha256(SHIPPED_CHECKPOINT / CHECKPOINT_CONFIG_FILE)
SHIPPED = {"path": "x", "shipped": True, "balconies_sha256": SHIPPED_SHA, "config_sha256": SHIPPED_CONFIG_SHA}


def test_the_report_names_the_checkpoint_it_came_from(tiny_export, tiny_checkpoint):
    source = json.loads((tiny_export / "report.json").read_text())["checkpoint"]
    assert source == {
        "path": str(tiny_checkpoint),
        "shipped": False,
        "balconies_sha256": file_sha256(tiny_checkpoint / CHECKPOINT_WEIGHTS_FILE),
        "config_sha256": file_sha256(tiny_checkpoint / CHECKPOINT_CONFIG_FILE),
    }


def _export_folder(folder, report):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    if report is not None:
        (folder / "report.json").write_text(json.dumps(report))
    return folder


@pytest.mark.parametrize(
    ("report", "older"),
    [
        (None, True),  # no report at all
        ({"precision": "fp32"}, True),  # written before exports recorded their checkpoint
        ({"checkpoint": SHIPPED}, False),
        ({"checkpoint": SHIPPED | {"balconies_sha256": "0" * 64}}, True),  # other balconies
        ({"checkpoint": SHIPPED | {"config_sha256": "0" * 64}}, True),  # other recorded answers
        ({"checkpoint": {"path": "x", "shipped": True, "balconies_sha256": SHIPPED_SHA}}, True),  # before answers
        (
            {"checkpoint": {"path": "runs/mine", "shipped": False, "balconies_sha256": "0" * 64}},
            False,
        ),  # the user's own
    ],
)
def test_an_export_is_older_than_the_shipped_checkpoint_only_when_its_report_says_so_or_says_nothing(
    tmp_path, report, older
):
    assert older_than_shipped(_export_folder(tmp_path / "export", report)) is older


@pytest.mark.parametrize("sha, remade", [("0" * 64, True), (SHIPPED_SHA, False)])
def test_the_default_export_is_made_again_when_the_shipped_balconies_changed(tmp_path, monkeypatch, sha, remade):
    monkeypatch.setenv("BALCONY_EDGE_CACHE", str(tmp_path))
    folder = _export_folder(default_export_dir(), {"checkpoint": SHIPPED | {"balconies_sha256": sha}})
    calls = []
    monkeypatch.setattr(exporter, "export_checkpoint", lambda config: calls.append(config) or config.out)
    assert cli._default_export() == folder
    assert [(c.checkpoint, c.out, c.force) for c in calls] == ([(None, folder, True)] if remade else [])
