"""The torch-free runtime: onnxruntime sessions per exit, exact exit switching, a controller on device signals."""

from balcony_edge.runtime.engine import Engine, GeneratedToken
from balcony_edge.runtime.sampling import SamplingConfig

__all__ = ["Engine", "GeneratedToken", "SamplingConfig"]
