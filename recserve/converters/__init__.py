"""Compression stages, evaluation with its quality gate, and (later) compilation for Triton."""
