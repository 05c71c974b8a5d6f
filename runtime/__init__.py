"""The torch-free runtime: onnxruntime sessions per exit, exact exit switching, a controller on device signals."""
