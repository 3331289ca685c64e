"""The two places a ranker runs: the edge (compressed ONNX in this process) and the cloud (Triton over gRPC)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from recserve.converters.evaluate import session


class CloudError(Exception):
    """A cloud call failed; ``kind`` is ``timeout``, ``unavailable`` or ``error``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class EdgeScorer:
    """onnxruntime sessions of the compressed rankers, keyed by path."""

    def __init__(self, threads: int = 1):
        self.threads = threads
        self._sessions: dict[Path, object] = {}

    def load(self, path: Path) -> None:
        if path not in self._sessions:
            self._sessions[path] = session(Path(path).read_bytes(), self.threads)

    def score(self, path: Path, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        self.load(path)
        return self._sessions[path].run(None, {"sparse": sparse, "dense": dense})[0].ravel()


class CloudScorer:
    """Async Triton client (KServe v2 gRPC); created lazily inside the serving event loop."""

    def __init__(self, url: str):
        self.url = url
        self._client = None

    def _get(self):
        if self._client is None:
            import tritonclient.grpc.aio as aioclient

            self._client = aioclient.InferenceServerClient(self.url)
        return self._client

    async def score(self, model: str, version: str, sparse: np.ndarray, dense: np.ndarray, timeout_s: float) -> np.ndarray:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        a = grpcclient.InferInput("sparse", list(sparse.shape), "INT64")
        a.set_data_from_numpy(sparse)
        b = grpcclient.InferInput("dense", list(dense.shape), "FP32")
        b.set_data_from_numpy(dense)
        try:
            result = await asyncio.wait_for(
                self._get().infer(model, [a, b], model_version=version, client_timeout=timeout_s), timeout_s)
        except asyncio.TimeoutError as e:
            raise CloudError("timeout", f"{model} v{version or '-'}: no answer in {timeout_s * 1e3:.1f} ms") from e
        except InferenceServerException as e:
            status = str(e.status() or "")
            kind = "timeout" if "DEADLINE" in status else "unavailable" if "UNAVAILABLE" in status else "error"
            raise CloudError(kind, f"{model} v{version or '-'}: {e.message()}") from e
        return result.as_numpy("score").ravel()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
