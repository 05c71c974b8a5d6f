"""Nothing in the project loads pickles: torch.load only with weights_only=True, safetensors and JSON elsewhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCE_FOLDERS = ("balcony_edge", "export", "runtime", "scripts", "examples", "tests")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_LOADERS = {"load", "loads", "Unpickler", "open"}
PICKLE_CALLS = {"read_pickle", "from_pickle"}
TORCH_LOADS = ("torch.load", "torch.serialization.load")


def pickle_loads(source: str) -> list[str]:
    """What in this Python source could unpickle data: pickle-family loads (importing such a module for its
    exception types is fine), torch.load without weights_only=True, numpy loads that allow pickles, read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name in PICKLE_LOADERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            # `from torch import load` would hide the calls from the check below
            found += [f"from {node.module} import load" for a in node.names if a.name == "load"]
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            parts = name.split(".")
            keywords = {k.arg: k.value for k in node.keywords}
            weights_only = keywords.get("weights_only")
            if name.endswith(TORCH_LOADS) and not (
                isinstance(weights_only, ast.Constant) and weights_only.value is True
            ):
                found.append(f"{name}(...) without weights_only=True (line {node.lineno})")
            elif parts[0] in PICKLE_MODULES and parts[-1] in PICKLE_LOADERS:
                found.append(f"{name}(...) (line {node.lineno})")
            allow = keywords.get("allow_pickle")
            if parts[-1] == "load" and isinstance(allow, ast.Constant) and allow.value is True:
                found.append(f"{name}(..., allow_pickle=True) (line {node.lineno})")
            if parts[-1] in PICKLE_CALLS:
                found.append(f"{name}(...) (line {node.lineno})")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "import pickle\npickle.loads(b'')",
        "import dill\ndill.load(open('x', 'rb'))",
        "from joblib import load",
        "import shelve\nshelve.open('x')",
        "import torch\ntorch.load('x.pt')",
        "import torch\ntorch.load('x.pt', weights_only=False)",
        "import torch\ntorch.load('x.pt', **options)",
        "import torch\ntorch.serialization.load('x.pt')",
        "from torch import load\nload('x.pt', weights_only=True)",
        "from torch.serialization import load",
        "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
        "import pandas as pd\npd.read_pickle('x')",
    ],
)
def test_the_scan_finds_each_way_of_loading_a_pickle(source):
    assert pickle_loads(source)


def test_the_scan_accepts_safe_loads():
    safe = (
        "import pickle, torch\ntorch.load('x.pt', weights_only=True)\nimport "
        "numpy as np\nnp.load('x.npy')\npickle.UnpicklingError"
    )
    assert pickle_loads(safe) == []


def test_no_project_source_loads_a_pickle():
    offenders = {}
    for folder in SOURCE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found = pickle_loads(path.read_text())
            if found:
                offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}
