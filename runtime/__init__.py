"""The torch-free runtime: onnxruntime sessions per exit, exact exit switching, a controller on device signals."""

from .engine import Engine, GeneratedToken
from .sampling import SamplingConfig

__all__ = ["Engine", "GeneratedToken", "SamplingConfig"]
