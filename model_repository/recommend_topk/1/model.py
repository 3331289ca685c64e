"""Triton python model `recommend_topk`: its code is recserve/triton/models/recommend_topk.py."""

from recserve.triton.models.recommend_topk import TritonPythonModel  # noqa: F401
