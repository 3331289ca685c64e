"""Triton python model `recommend_preprocess`: its code is recserve/triton/models/recommend_preprocess.py."""

from recserve.triton.models.recommend_preprocess import TritonPythonModel  # noqa: F401
