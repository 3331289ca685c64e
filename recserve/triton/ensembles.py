"""The checked-in Triton ensembles and their python models, generated as ModelConfig messages.

``recommend``: raw candidate features -> ``recommend_preprocess`` (vocabularies from training) ->
``ranker`` -> ``recommend_topk``. One request is one query: its candidates are the rows, so the
ensemble and its python steps do not batch across requests (``max_batch_size: 0``); the ranker
inside still batches on its own. ``retrieve``: raw user features -> ``retrieve_preprocess`` ->
``user_tower`` -> ``item_index`` (nearest neighbours over the item tower's embeddings, with the
ranker features of every item) -> ``ranker`` -> ``recommend_topk``.

``recserve build-ensembles`` writes them into a repository; the copies under
``model_repository/`` are that command's output (a test keeps them in sync).
"""

from __future__ import annotations

from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from recserve.converters.triton_config import to_pbtxt

MODELS = Path(__file__).resolve().parent / "models"
STRING, FP32, INT64, INT32 = mc.TYPE_STRING, mc.TYPE_FP32, mc.TYPE_INT64, mc.TYPE_INT32


def python_model_shim(name: str, code: str | None = None) -> str:
    """The ``model.py`` Triton loads: it imports the model's code (``code``, default ``name``) from the installed
    recserve package."""
    code = code or name
    return (f'"""Triton python model `{name}`: its code is recserve/triton/models/{code}.py."""\n\n'
            f"from recserve.triton.models.{code} import TritonPythonModel  # noqa: F401\n")


def _python_model(name: str, inputs: list[tuple], outputs: list[tuple], parameters: dict[str, str] | None = None,
                  instances: int = 1) -> mc.ModelConfig:
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    for n, t, d in inputs:
        cfg.input.add(name=n, data_type=t, dims=d)
    for n, t, d in outputs:
        cfg.output.add(name=n, data_type=t, dims=d)
    cfg.instance_group.add(count=instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    for k, v in (parameters or {}).items():
        cfg.parameters[k].string_value = v
    return cfg


def _onnxruntime_model(name: str, inputs: list[tuple], outputs: list[tuple]) -> mc.ModelConfig:
    """One request at a time, one instance, one thread (the search path's graphs: see ``search_configs``)."""
    cfg = mc.ModelConfig(name=name, backend="onnxruntime", max_batch_size=0)
    for n, t, d in inputs:
        cfg.input.add(name=n, data_type=t, dims=d)
    for n, t, d in outputs:
        cfg.output.add(name=n, data_type=t, dims=d)
    cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    cfg.parameters["intra_op_thread_count"].string_value = "1"
    return cfg


def _step(ens: mc.ModelConfig, model: str, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    step = ens.ensemble_scheduling.step.add(model_name=model, model_version=-1)
    step.input_map.update(inputs)
    step.output_map.update(outputs)


def recommend_configs(ranker: str = "ranker") -> list[mc.ModelConfig]:
    pre = _python_model("recommend_preprocess", [("sparse_raw", STRING, [-1, -1]), ("dense_raw", FP32, [-1, -1])],
                        [("sparse", INT64, [-1, -1]), ("dense", FP32, [-1, -1])], {"ranker_model": ranker}, instances=2)
    topk = _python_model("recommend_topk", [("score", FP32, [-1, 1]), ("item_ids", STRING, [-1]), ("top_k", INT32, [1])],
                         [("items", STRING, [-1]), ("scores", FP32, [-1])])
    ens = mc.ModelConfig(name="recommend", platform="ensemble", max_batch_size=0)
    for n, t, d in [("sparse_raw", STRING, [-1, -1]), ("dense_raw", FP32, [-1, -1]), ("item_ids", STRING, [-1]),
                    ("top_k", INT32, [1])]:
        ens.input.add(name=n, data_type=t, dims=d)
    for n, t, d in [("items", STRING, [-1]), ("scores", FP32, [-1])]:
        ens.output.add(name=n, data_type=t, dims=d)
    _step(ens, "recommend_preprocess", {"sparse_raw": "sparse_raw", "dense_raw": "dense_raw"},
          {"sparse": "_sparse", "dense": "_dense"})
    _step(ens, ranker, {"sparse": "_sparse", "dense": "_dense"}, {"score": "_score"})
    _step(ens, "recommend_topk", {"score": "_score", "item_ids": "item_ids", "top_k": "top_k"},
          {"items": "items", "scores": "scores"})
    return [pre, topk, ens]


def retrieve_configs(ranker: str = "ranker", user_tower: str = "user_tower",
                     index: str = "item_index") -> list[mc.ModelConfig]:
    pre = _python_model(
        "retrieve_preprocess",
        [("user_raw", STRING, [-1, -1]), ("context_raw", STRING, [-1, -1]), ("context_dense_raw", FP32, [-1, -1])],
        [("user_sparse", INT64, [-1, -1]), ("context_sparse", INT64, [-1, -1]), ("context_dense", FP32, [-1, -1])],
        {"ranker_model": ranker, "user_tower_model": user_tower, "index_model": index})
    ens = mc.ModelConfig(name="retrieve", platform="ensemble", max_batch_size=0)
    for n, t, d in [("user_raw", STRING, [1, -1]), ("context_raw", STRING, [1, -1]),
                    ("context_dense_raw", FP32, [1, -1]), ("top_k", INT32, [1])]:
        ens.input.add(name=n, data_type=t, dims=d)
    for n, t, d in [("items", STRING, [-1]), ("scores", FP32, [-1])]:
        ens.output.add(name=n, data_type=t, dims=d)
    _step(ens, "retrieve_preprocess", {"user_raw": "user_raw", "context_raw": "context_raw",
                                       "context_dense_raw": "context_dense_raw"},
          {"user_sparse": "_user_sparse", "context_sparse": "_context_sparse", "context_dense": "_context_dense"})
    _step(ens, user_tower, {"user_sparse": "_user_sparse"}, {"user_embedding": "_user_embedding"})
    _step(ens, index, {"user_embedding": "_user_embedding", "context_sparse": "_context_sparse",
                       "context_dense": "_context_dense"},
          {"sparse": "_sparse", "dense": "_dense", "item_ids": "_item_ids"})
    _step(ens, ranker, {"sparse": "_sparse", "dense": "_dense"}, {"score": "_score"})
    _step(ens, "recommend_topk", {"score": "_score", "item_ids": "_item_ids", "top_k": "top_k"},
          {"items": "items", "scores": "scores"})
    return [pre, ens]


def item_index_config(name: str = "item_index", candidates: int = 100) -> mc.ModelConfig:
    return _python_model(name, [("user_embedding", FP32, [-1, -1]), ("context_sparse", INT64, [-1, -1]),
                                ("context_dense", FP32, [-1, -1])],
                         [("sparse", INT64, [-1, -1]), ("dense", FP32, [-1, -1]), ("item_ids", STRING, [-1]),
                          ("retrieval_scores", FP32, [-1])], {"candidates": str(candidates)})


def search_configs(dim: int, encoder: str = "query_encoder", depth: int = 0) -> list[mc.ModelConfig]:
    """``query_tokenize``, the encoder, ``product_index``, ``search_ranker``, ``search_topk`` and the ``search``
    ensemble (recserve.triton.search). With ``depth`` the ensemble reorders the ``depth`` nearest products
    with the ranker; with 0 it ends at ``product_index`` (its ``scores`` are the cosines).

    One request is one typed query, so nothing batches across requests (``max_batch_size: 0``): a query's
    token count is its own, and the stand-in onnxruntime backend runs each request as it comes."""
    from recserve.triton.search_features import FEATURES

    tokenize = _python_model("query_tokenize", [("query", STRING, [1])],
                             [("input_ids", INT64, [1, -1]), ("attention_mask", INT64, [1, -1])],
                             {"encoder_model": encoder}, instances=1)
    enc = _onnxruntime_model(encoder, [("input_ids", INT64, [-1, -1]), ("attention_mask", INT64, [-1, -1])],
                             [("embedding", FP32, [-1, dim])])
    index = _python_model("product_index", [("embedding", FP32, [1, dim]), ("top_k", INT32, [1]), ("query", STRING, [1])],
                          [("items", STRING, [-1]), ("scores", FP32, [-1]), ("features", FP32, [-1, len(FEATURES)])],
                          {"rerank_depth": str(depth)})
    ranker = _onnxruntime_model("search_ranker", [("features", FP32, [-1, len(FEATURES)])], [("score", FP32, [-1, 1])])
    topk = _python_model("search_topk", [("score", FP32, [-1, 1]), ("item_ids", STRING, [-1]), ("top_k", INT32, [1])],
                         [("items", STRING, [-1]), ("scores", FP32, [-1])])
    ens = mc.ModelConfig(name="search", platform="ensemble", max_batch_size=0)
    ens.input.add(name="query", data_type=STRING, dims=[1])
    ens.input.add(name="top_k", data_type=INT32, dims=[1])
    for n, t in (("items", STRING), ("scores", FP32)):
        ens.output.add(name=n, data_type=t, dims=[-1])
    _step(ens, "query_tokenize", {"query": "query"}, {"input_ids": "_input_ids", "attention_mask": "_attention_mask"})
    _step(ens, encoder, {"input_ids": "_input_ids", "attention_mask": "_attention_mask"}, {"embedding": "_embedding"})
    nearest = {"embedding": "_embedding", "top_k": "top_k", "query": "query"}
    if depth:
        _step(ens, "product_index", nearest, {"items": "_candidates", "features": "_features"})
        _step(ens, "search_ranker", {"features": "_features"}, {"score": "_score"})
        _step(ens, "search_topk", {"score": "_score", "item_ids": "_candidates", "top_k": "top_k"},
              {"items": "items", "scores": "scores"})
    else:
        _step(ens, "product_index", nearest, {"items": "items", "scores": "scores"})
    return [tokenize, enc, index, ranker, topk, ens]


def write_ensembles(repository: Path, ranker: str = "ranker") -> list[Path]:
    """Write the ensembles' configs and python models into ``repository``; returns the model directories."""
    written = []
    for cfg in recommend_configs(ranker) + retrieve_configs(ranker):
        d = Path(repository) / cfg.name
        (d / "1").mkdir(parents=True, exist_ok=True)
        (d / "config.pbtxt").write_text(to_pbtxt(cfg))
        if (MODELS / f"{cfg.name}.py").exists():
            (d / "1" / "model.py").write_text(python_model_shim(cfg.name))
        else:
            (d / "1" / ".keep").touch()
        written.append(d)
    return written
