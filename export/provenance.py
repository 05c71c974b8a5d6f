"""Which checkpoint an export was made from, recorded in its report.json, so that a default export older than the
shipped checkpoint (a package upgrade brings new balconies) is noticed and made again. Torch-free: the CLI asks
before anything heavy is imported."""

from __future__ import annotations

import json
from pathlib import Path

from balcony_edge.common.checksums import file_sha256
from balcony_edge.common.paths import CHECKPOINT_CONFIG_FILE, CHECKPOINT_WEIGHTS_FILE, SHIPPED_CHECKPOINT
from balcony_edge.runtime.core.manifest import REPORT_FILE


def checkpoint_identity(checkpoint: Path) -> dict:
    """What report.json records of the checkpoint: its path, whether it is the shipped one, the sha256 of its weights
    and of its config (which holds the measured answers the export carries)."""
    return {
        "path": str(checkpoint),
        "shipped": Path(checkpoint).resolve() == SHIPPED_CHECKPOINT.resolve(),
        "balconies_sha256": file_sha256(Path(checkpoint) / CHECKPOINT_WEIGHTS_FILE),
        "config_sha256": file_sha256(Path(checkpoint) / CHECKPOINT_CONFIG_FILE),
    }


def older_than_shipped(folder: Path) -> bool:
    """Whether the export in `folder` should be made again from the shipped checkpoint: its report says it came from
    the shipped checkpoint with other balconies, or does not say where it came from (an older version wrote it).
    An export that says it came from another checkpoint is the user's and is left as it is."""
    try:
        made_from = json.loads((Path(folder) / REPORT_FILE).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return True
    if not isinstance(made_from, dict) or "balconies_sha256" not in made_from:
        return True
    if not made_from.get("shipped"):
        return False
    return made_from["balconies_sha256"] != file_sha256(SHIPPED_CHECKPOINT / CHECKPOINT_WEIGHTS_FILE) or made_from.get(
        "config_sha256"
    ) != file_sha256(SHIPPED_CHECKPOINT / CHECKPOINT_CONFIG_FILE)
