"""Triton: the embedded server launcher, the CPU onnxruntime backend, and a small client."""
