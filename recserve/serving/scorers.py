"""The two places a ranker runs: the edge (compressed ONNX in this process) and the cloud (Triton over gRPC)."""

from __future__ import annotations

import asyncio
import contextlib
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


@dataclass(frozen=True)
class SearchAnswer:
    """Products for a typed query, best first, with their cosines, and the version that answered."""

    items: list[str]
    scores: np.ndarray
    version: str


class EdgeSearch:
    """A text search in process: the encoder's tokenizer and graph, the products nearest the query
    (``recserve.triton.search.ProductIndex``, the same code the Triton ``product_index`` model runs) and, with a
    ``ranker`` (a ``search_ranker`` version directory), those reordered by it as the ``search`` ensemble does."""

    def __init__(self, encoder: Path, index: Path, threads: int = 1, ranker: Path | None = None):
        from recserve.encoder.artifact import INPUTS, MODEL_FILE, load_info
        from recserve.encoder.text import TextTokenizer
        from recserve.triton.search import RANKER_FILE, ProductIndex

        info = load_info(encoder)
        self.inputs = INPUTS
        self.tokenizer = TextTokenizer.of(encoder, info)
        self.session = session((Path(encoder) / MODEL_FILE).read_bytes(), threads)
        self.index = ProductIndex(index, threads)
        if self.index.embeddings.shape[1] != info.dim:
            raise ValueError(f"{index} holds {self.index.embeddings.shape[1]}-wide embeddings; {encoder} makes "
                             f"{info.dim}-wide ones: build the index with this encoder (`recserve search-index`)")
        self.ranker, self.depth = None, 0
        if ranker is not None:
            if self.index.terms is None:
                raise ValueError(f"{index} has no title terms (terms.npz) for the ranker: rebuild it with "
                                 "`recserve search-index`")
            import json

            self.depth = int(json.loads((Path(ranker) / RANKER_FILE).read_text())["depth"])
            self.ranker = session((Path(ranker) / "model.onnx").read_bytes(), threads)
        self.search("warm up", 1)  # onnxruntime's first run of each graph allocates: not on a request's clock

    def search(self, query: str, k: int) -> SearchAnswer:
        (embedding,) = self.session.run(None, dict(zip(self.inputs, self.tokenizer.encode([query]))))
        if self.ranker is None:
            items, scores = self.index.search(embedding, k)
        else:
            from recserve.triton.features import top_k

            items, _, features = self.index.candidates(query, embedding, max(k, self.depth))
            scores = self.ranker.run(None, {"features": features})[0].ravel()
            best = top_k(scores, k)
            items, scores = items[best], scores[best].astype(np.float32)
        return SearchAnswer([str(i) for i in items], scores, "edge")


class CloudScorer:
    """KServe v2 ModelInfer calls to Triton over gRPC, with request messages built directly (no per-call
    wrappers), on the event loop's own thread (``grpc_channel.GrpcChannel``): the router's own cost per
    request stays small. The connection opens on the first call, in the serving loop."""

    INFER, CONFIG = "/inference.GRPCInferenceService/ModelInfer", "/inference.GRPCInferenceService/ModelConfig"

    def __init__(self, url: str):
        from recserve.serving.grpc_channel import GrpcChannel

        self.url = url
        self.channel = GrpcChannel(url)
        self._batch_limits: dict[str, int] = {}
        self._asking: dict[str, asyncio.Future] = {}

    def batch_limit(self, model: str) -> int:
        """The model's ``max_batch_size`` in Triton (how many rows one call may carry), once known; 0 until then
        (the first call asks Triton for the model's config)."""
        self._ask(model)
        return self._batch_limits.get(model, 0)

    def _ask(self, model: str) -> asyncio.Future:
        """One ModelConfig call per model at a time, shared by whoever needs the answer; asked again after a failure."""
        task = self._asking.get(model)
        if task is None or (task.done() and model not in self._batch_limits):
            task = self._asking[model] = asyncio.ensure_future(self._ask_batch_limit(model))
        return task

    async def _ask_batch_limit(self, model: str) -> None:
        from tritonclient.grpc.service_pb2 import ModelConfigRequest, ModelConfigResponse

        from recserve.serving.grpc_channel import CallError

        try:
            raw = await self.channel.unary(self.CONFIG, ModelConfigRequest(name=model).SerializeToString(), 5.0)
            self._batch_limits[model] = int(ModelConfigResponse.FromString(raw).config.max_batch_size)
        except CallError:
            pass  # asked again on a later call

    async def score(self, model: str, version: str, sparse: np.ndarray, dense: np.ndarray,
                    timeout_s: float) -> CloudAnswer:
        """The scores and the version that answered (Triton's own choice when ``version`` is empty). More rows than
        the model's ``max_batch_size`` go out as several calls at once: Triton would refuse them in one."""
        if model not in self._batch_limits:  # the first call of a model waits for its config (one round trip)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._ask(model)), timeout_s / 2)
            timeout_s = max(deadline - loop.time(), 1e-3)
        limit = self._batch_limits.get(model, 0)
        if not limit or len(sparse) <= limit:
            return await self._infer(model, version, sparse, dense, timeout_s)
        parts = await asyncio.gather(*(self._infer(model, version, sparse[i:i + limit], dense[i:i + limit], timeout_s)
                                       for i in range(0, len(sparse), limit)), return_exceptions=True)
        failed = next((p for p in parts if isinstance(p, BaseException)), None)
        if failed is not None:
            raise failed
        return CloudAnswer(np.concatenate([p.scores for p in parts]), parts[0].version)

    async def _infer(self, model: str, version: str, sparse: np.ndarray, dense: np.ndarray,
                     timeout_s: float) -> CloudAnswer:
        from tritonclient.grpc.service_pb2 import ModelInferRequest

        req = ModelInferRequest(model_name=model, model_version=version)
        req.inputs.add(name="sparse", datatype="INT64", shape=sparse.shape)
        req.inputs.add(name="dense", datatype="FP32", shape=dense.shape)
        req.raw_input_contents.extend([np.ascontiguousarray(sparse, np.int64).tobytes(),
                                       np.ascontiguousarray(dense, np.float32).tobytes()])
        resp = await self._call(model, version, req, timeout_s)
        for out, raw in zip(resp.outputs, resp.raw_output_contents):
            if out.name == "score":
                return CloudAnswer(np.frombuffer(raw, dtype=np.float32).copy(), resp.model_version or version)
        raise CloudError("error", f"{model}: the response has no 'score' output")

    async def search(self, model: str, query: str, k: int, timeout_s: float) -> SearchAnswer:
        """The Triton search ensemble's products for ``query`` (its outputs ``items`` and ``scores``)."""
        from tritonclient.grpc.service_pb2 import ModelInferRequest

        from recserve.serving.grpc_wire import bytes_tensor, read_bytes_tensor

        req = ModelInferRequest(model_name=model)
        req.inputs.add(name="query", datatype="BYTES", shape=[1])
        req.inputs.add(name="top_k", datatype="INT32", shape=[1])
        req.raw_input_contents.extend([bytes_tensor([query.encode()]), np.array([k], np.int32).tobytes()])
        resp = await self._call(model, "", req, timeout_s)
        raw = dict(zip((o.name for o in resp.outputs), resp.raw_output_contents))
        if "items" not in raw or "scores" not in raw:
            raise CloudError("bad_output", f"{model}: the response has no 'items' and 'scores' outputs")
        try:
            items = [i.decode("utf-8", "replace") for i in read_bytes_tensor(raw["items"])]
        except ValueError as e:
            raise CloudError("bad_output", f"{model}: {e}") from e
        scores = np.frombuffer(raw["scores"], dtype=np.float32).copy()
        if len(items) != len(scores) or len(items) > k or not np.isfinite(scores).all():
            raise CloudError("bad_output", f"{model}: {len(items)} items and {len(scores)} scores for top_k {k}")
        return SearchAnswer(items, scores, resp.model_version)

    async def _call(self, model: str, version: str, req, timeout_s: float):
        """One ModelInfer call; its failure as a CloudError of the right kind."""
        from tritonclient.grpc.service_pb2 import ModelInferResponse

        from recserve.serving.grpc_channel import CallError
        from recserve.serving.grpc_wire import STATUS

        try:
            return ModelInferResponse.FromString(await self.channel.unary(self.INFER, req.SerializeToString(), timeout_s))
        except CallError as e:
            kind = ("timeout" if e.code == STATUS["DEADLINE_EXCEEDED"]
                    else "unavailable" if e.code == STATUS["UNAVAILABLE"] else "error")
            raise CloudError(kind, f"{model} v{version or '-'}: {e}") from e

    async def close(self) -> None:
        await self.channel.close()
