"""``recserve train``: data -> model -> training -> ONNX export checked against PyTorch -> artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recserve.converters.evaluate import Scoring, evaluate, held_out
from recserve.converters.metrics import ranking_metrics
from recserve.data import load_dataset
from recserve.data.schema import RankingData
from recserve.errors import ConfigError, DataError
from recserve.models.artifact import TrainedModel, build_module
from recserve.models.distributed import RaySettings
from recserve.models.ranker import RankerConfig
from recserve.models.teacher import TeacherScores, load_teacher
from recserve.models.train import Distillation, TrainSettings, fit_ranker, fit_two_tower
from recserve.models.two_tower import TwoTowerConfig
from recserve.outdir import check_out

ARTIFACT_FILES = ("model.onnx", "model.pt", "model.json", "preprocessing.json")


def check_train_out(out: Path, force: bool) -> None:
    """``--out`` must be new or empty; ``force`` replaces an earlier ``recserve train`` output, nothing else."""
    check_out(out, force, ARTIFACT_FILES, "recserve train")


def train_model(data_spec: str, kind: str, out: Path, *, embedding_dim: int = 32, force: bool = False,
                ray: RaySettings | None = None, teacher: Path | None = None, **settings: Any) -> dict[str, Any]:
    """Train, export and save; with ``ray``, the ranker trains on Ray Train (recserve.models.distributed); with
    ``teacher`` (a ``recserve train`` ranker directory), on its soft targets too (recserve.models.teacher)."""
    out = Path(out)
    if teacher is not None and kind != "ranker":
        raise ConfigError("--teacher distils a ranker; the two-tower retriever trains on its labels")
    the_teacher = load_teacher(teacher) if teacher is not None else None
    check_train_out(out, force)
    if ray is not None and kind != "ranker":
        raise ConfigError("--workers trains the ranker on Ray Train; the two-tower retriever trains in one process")
    if ray is not None:
        from recserve.models.streamed import is_streamed, train_streamed

        if is_streamed(data_spec):
            return train_streamed(data_spec, out, embedding_dim=embedding_dim, ray=ray, train=TrainSettings(**settings),
                                  teacher=the_teacher)
    data = load_dataset(data_spec, seed=settings.get("seed", 0),
                        preprocessing=the_teacher.preprocessing if the_teacher is not None else None)
    train = TrainSettings(**settings)
    if kind == "ranker":
        if data.ranking_train is None or not len(data.ranking_train):
            raise DataError(f"{data_spec} has no labelled rows to train a ranker on")
        if not isinstance(data.ranking_train, RankingData):
            raise DataError(f"{data_spec}: tensors data is for compressing a model of your own (recserve compress "
                            "--data tensors:PATH); recserve train reads raw data (movielens:, interactions:, ...)")
        t = data.ranking_train
        config = RankerConfig([f.cardinality for f in t.sparse_features], len(t.dense_names), embedding_dim=embedding_dim)
        module = build_module(kind, config, seed=train.seed)
        fit = data.ranking_fit()
        distill = None
        if the_teacher is not None:
            distill = Distillation(TeacherScores(the_teacher.graph, train.threads).logits(fit.sparse, fit.dense))
        if ray is None:
            history = fit_ranker(module, fit, train, validation=data.ranking_validation(), distill=distill)
        else:
            from recserve.models.distributed import checkpoint_storage, fit_ranker_ray

            state, history = fit_ranker_ray(config, fit, data.ranking_validation(), train, ray,
                                            checkpoint_storage(out), distill=distill)
            module.load_state_dict(state)
            module.eval()
    else:
        r = data.retrieval
        if r is None or not len(r.train_pairs):
            raise DataError(f"{data_spec} has no user-item pairs to train a two-tower retriever on "
                            "(criteo data has no user or item ids: train a ranker on it)")
        config = TwoTowerConfig([f.cardinality for f in r.user_features], [f.cardinality for f in r.item_features],
                                embedding_dim=embedding_dim)
        module = build_module(kind, config, seed=train.seed)
        history = fit_two_tower(module, r, train)
    trained = TrainedModel(kind, config, module, data_spec, train.seed)
    graph = trained.export(data)
    ev = evaluate(graph, Scoring(kind), held_out(data, kind, "test"), speed=False)
    trained.metrics = {"held_out": ev.quality, "history": history, "corrupt_rows": data.corrupt_rows}
    result = {}
    if the_teacher is not None:
        test = data.ranking_test
        trained.metrics["teacher"] = result["teacher"] = {
            "directory": str(the_teacher.directory),
            "held_out": ranking_metrics(test.label, TeacherScores(the_teacher.graph, train.threads).logits(
                test.sparse, test.dense), logits=True)}
    trained.save(out, data, graph)
    return result | {"quality": ev.quality, "parameters": ev.parameters, "size_bytes": ev.size_bytes,
                     "corrupt_rows": data.corrupt_rows}
