"""The torch-free runtime (onnxruntime, numpy, tokenizers): what a Jetson app installs alone.

- `core/`: inference. An export folder checked and opened as one onnxruntime session per piece of the exits'
  chains, sequences whose KV cache any exit extends exactly, sampling and text.
- `device/`: adaptation. Device signals and their sources, the controller that picks each token's exit, telemetry.
- `serving/`: `balcony-edge serve`, an OpenAI-compatible HTTP server over the engine.
- `chat.py`: the interactive chat of `balcony-edge chat`.
"""

from balcony_edge.runtime.core.engine import Engine, GeneratedToken
from balcony_edge.runtime.core.sampling import SamplingConfig
from balcony_edge.runtime.device.controller import Budget, ControllerConfig
from balcony_edge.runtime.device.hub import SignalHub, default_sources
from balcony_edge.runtime.device.sources import Signals
from balcony_edge.runtime.device.telemetry import TelemetryWriter

__all__ = [
    "Budget",
    "ControllerConfig",
    "Engine",
    "GeneratedToken",
    "SamplingConfig",
    "SignalHub",
    "Signals",
    "TelemetryWriter",
    "default_sources",
]
