"""Torch to ONNX: one graph per exit, weights stored once, a manifest for the runtime."""
