"""The runtime is what a Jetson app installs alone: it must import and generate with torch and transformers absent."""

import ast
import subprocess
import sys

from conftest import BLOCKER


def test_runtime_imports_and_generates_with_torch_blocked(tiny_export):
    script = (
        BLOCKER
        + f"""
from balcony_edge.runtime import Engine
engine = Engine.load({str(tiny_export)!r}, providers=['cpu'])
tokens = list(engine.generate('The harbour', max_new_tokens=5, budget='auto'))
assert tokens and all(t.exit in engine.exits for t in tokens)
print('ok', len(tokens), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))
"""
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok") and result.stdout.strip().endswith("[]")


def test_chat_command_runs_with_torch_blocked(tiny_export):
    script = (
        BLOCKER
        + f"""
sys.argv = ['balcony-edge', 'chat', {str(tiny_export)!r}, '--prompt', 'Hello', '--max-new-tokens', '4', '--signals',
'temperature_degc=40']
from balcony_edge.cli import main
main()
"""
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr


def test_the_runtime_imports_only_itself_and_balcony_edge_common(tiny_export):
    script = f"""
import sys
from balcony_edge.runtime import Engine
from balcony_edge.runtime.serving.app import create_app
engine = Engine.load({str(tiny_export)!r}, providers=['cpu'])
list(engine.generate('The harbour', max_new_tokens=2))
print(sorted(m for m in sys.modules if m.startswith('balcony_edge')))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    loaded = ast.literal_eval(result.stdout)  # a printed list of module names
    outside = [
        m for m in loaded if m != "balcony_edge" and not m.startswith(("balcony_edge.runtime", "balcony_edge.common"))
    ]
    assert not outside, f"the runtime reaches into the torch side: {outside}"
