"""A small Triton gRPC (KServe v2) client for the CLI, the router and the operator."""

from __future__ import annotations

from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from recserve.errors import InferenceError, ServerError


class TritonClient:
    """Thin wrapper over ``tritonclient.grpc`` turning its exceptions into recserve errors."""

    def __init__(self, url: str = "127.0.0.1:8001", timeout: float = 10.0):
        self.url = url
        self.timeout = timeout
        self._client = grpcclient.InferenceServerClient(url)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InferenceServerException as e:
            status = e.status() or ""
            if "UNAVAILABLE" in status and not self._live():
                raise ServerError(f"Triton at {self.url} is unreachable ({e.message()}); is `recserve serve` running?") from e
            raise InferenceError(f"{what}: {e.message()}") from e

    def _live(self) -> bool:
        try:
            return bool(self._client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            return False

    def infer(self, model: str, inputs: dict[str, np.ndarray], *, version: str = "",
              outputs: list[str] | None = None, timeout: float | None = None) -> dict[str, np.ndarray]:
        """Run one request; returns every output (or the named ones) as numpy arrays."""
        tensors = []
        for name, value in inputs.items():
            arr = np.ascontiguousarray(value)
            t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            t.set_data_from_numpy(arr)
            tensors.append(t)
        requested = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
        result = self._call(f"inference on {model}", self._client.infer, model, tensors, model_version=version,
                            outputs=requested, client_timeout=timeout or self.timeout)
        names = outputs or [o.name for o in result.get_response().outputs]
        return {n: result.as_numpy(n) for n in names}

    def server_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready(client_timeout=self.timeout))
        except InferenceServerException:
            return False

    def server_live(self) -> bool:
        return self._live()

    def model_ready(self, model: str, version: str = "") -> bool:
        try:
            return bool(self._client.is_model_ready(model, version, client_timeout=self.timeout))
        except InferenceServerException:
            return False

    def load(self, model: str, config: str | None = None) -> None:
        """Load (or reload) a model; ``config`` is a JSON config override (e.g. the versions to serve)."""
        self._call(f"loading {model}", self._client.load_model, model, config=config, client_timeout=max(self.timeout, 60))

    def unload(self, model: str) -> None:
        self._call(f"unloading {model}", self._client.unload_model, model, client_timeout=max(self.timeout, 60))

    def statistics(self, model: str = "", version: str = "") -> dict[str, Any]:
        return self._call("statistics", self._client.get_inference_statistics, model, version, as_json=True)

    def repository_index(self) -> list[dict[str, Any]]:
        return self._call("repository index", self._client.get_model_repository_index, as_json=True).get("models", [])

    def config(self, model: str, version: str = "") -> dict[str, Any]:
        return self._call(f"config of {model}", self._client.get_model_config, model, version, as_json=True)["config"]
