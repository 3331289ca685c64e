"""The two places a ranker runs: the edge (compressed ONNX in this process) and the cloud (Triton over gRPC)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.onnxrt import session


@dataclass(frozen=True)
class CloudAnswer:
    """Triton's scores for the candidates and the version of the model that produced them."""

    scores: np.ndarray
    version: str


class CloudError(Exception):
    """A cloud call failed; ``kind`` is ``timeout``, ``unavailable``, ``error`` or ``bad_output`` (an answer
    without one finite score per candidate)."""

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
    """Async KServe v2 gRPC calls to Triton with request messages built directly (no per-call wrappers):
    the router's own cost per request stays small. The channel is created lazily in the serving loop."""

    def __init__(self, url: str):
        self.url = url
        self._channel = None
        self._stub = None

    def _get(self):
        if self._stub is None:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            self._channel = grpc.aio.insecure_channel(self.url)
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        return self._stub

    async def score(self, model: str, version: str, sparse: np.ndarray, dense: np.ndarray,
                    timeout_s: float) -> CloudAnswer:
        """The scores and the version that answered (Triton's own choice when ``version`` is empty)."""
        import grpc
        from tritonclient.grpc import service_pb2

        req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        req.inputs.add(name="sparse", datatype="INT64", shape=sparse.shape)
        req.inputs.add(name="dense", datatype="FP32", shape=dense.shape)
        req.raw_input_contents.extend([np.ascontiguousarray(sparse, np.int64).tobytes(),
                                       np.ascontiguousarray(dense, np.float32).tobytes()])
        try:
            resp = await self._get().ModelInfer(req, timeout=timeout_s)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            kind = ("timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED
                    else "unavailable" if code == grpc.StatusCode.UNAVAILABLE else "error")
            raise CloudError(kind, f"{model} v{version or '-'}: {e.details()}") from e
        except TimeoutError as e:
            raise CloudError("timeout", f"{model} v{version or '-'}: no answer in {timeout_s * 1e3:.1f} ms") from e
        for out, raw in zip(resp.outputs, resp.raw_output_contents):
            if out.name == "score":
                return CloudAnswer(np.frombuffer(raw, dtype=np.float32).copy(), resp.model_version or version)
        raise CloudError("error", f"{model}: the response has no 'score' output")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
