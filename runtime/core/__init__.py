"""Inference: an export folder's manifest and files checked, its pieces as onnxruntime sessions, sequences with a KV
cache
computed at any exit exactly, sampling and text."""
