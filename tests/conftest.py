"""Shared fixtures. Hardware markers skip cleanly where the hardware is absent."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    has_gpu = shutil.which("nvidia-smi") is not None and _tensorrt_importable()
    has_cluster = bool(os.environ.get("KUBECONFIG"))
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT"))
        # the local kube-apiserver of tests/e2e/apiserver_fixtures.py needs no KUBECONFIG (it skips itself
        # when `make k8s-tools` has not been run); a module that uses it where KUBECONFIG names no cluster says so
        local = "apiserver" in item.fixturenames or getattr(item.module, "LOCAL_APISERVER_WITHOUT_KUBECONFIG", False)
        if "k8s" in item.keywords and not has_cluster and not local:
            item.add_marker(pytest.mark.skip(reason="needs a cluster: set KUBECONFIG"))


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True
