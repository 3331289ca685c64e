"""Triton python model `retrieve_preprocess`: its code is recserve/triton/models/retrieve_preprocess.py."""

from recserve.triton.models.retrieve_preprocess import TritonPythonModel  # noqa: F401
