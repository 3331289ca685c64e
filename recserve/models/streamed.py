"""``recserve train --data criteo:DIR|interactions:DIR --workers N``: a ranker trained on shards that no process
holds whole.

1. One pass over the shards fits the preprocessing (:func:`recserve.data.shards.fit` for Criteo: vocabularies,
   transforms and a bounded sample of validation rows; :func:`recserve.data.logs.fit` for interaction logs, in
   two passes: vocabularies, each user's last two interactions and a Bloom filter of the pairs seen).
2. Ray Data actors (:class:`ShardReader`) read the shards block by block, keep the training rows, encode them
   and stream them to the Ray Train workers (:func:`recserve.models.distributed.fit_ranker_ray`); every epoch
   reads the shards again.
3. The best epoch is exported to ONNX and scored on every test row: streamed the same way for Criteo (the
   driver keeps one score and one label per row), one row group per user for a log.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recserve.converters.metrics import distinct_ratio, ranking_metrics
from recserve.data import criteo, interactions, logs, shards
from recserve.data.schema import Dataset, DenseTransform, RankingData, Vocabulary
from recserve.data.spec import parse_spec
from recserve.data.splits import FIT, TEST, VALIDATION
from recserve.errors import DataError
from recserve.models.distributed import RaySettings, checkpoint_storage, fit_ranker_ray, ray_running
from recserve.models.teacher import Teacher, TeacherScores, WithTeacher
from recserve.models.train import Distillation, TrainSettings

DISTINCT_SAMPLE = 100_000
"""Test rows whose inputs are kept to measure ``distinct_score_ratio``."""


class ShardReader:
    """A Ray Data actor: shard numbers in, encoded rows of one split out, block by block."""

    def __init__(self, paths: list[str], encoder: list):
        import ray

        self.paths = [Path(p) for p in paths]
        self.encoder = ray.get(encoder[0])  # a reference in a list: Ray passes it unresolved

    def __call__(self, batch: dict[str, np.ndarray]):
        for shard in batch["shard"].tolist():
            yield from self.encoder.encoded(self.paths[shard], shard)


@dataclass
class Source:
    """Shards and what the pass over them fitted, for one kind of data."""

    paths: list[Path]
    vocabularies: dict[str, Vocabulary]
    transforms: list[DenseTransform]
    rows: dict[str, int]
    """Rows per split (``fit``, ``validation``, ``test``)."""
    corrupt: int
    validation: RankingData
    fit_encoder: Any
    """Has ``encoded(path, shard)``: the training rows of a shard, block by block."""
    test_encoder: Any = None
    """The same for the test rows, streamed (Criteo); or None, and :attr:`test` holds them (logs)."""
    test: RankingData | None = None


def criteo_source(spec, seed: int, test_fraction: float, validation_fraction: float,
                  max_validation_rows: int, preprocessing: Path | None = None) -> Source:
    paths = criteo.shard_paths(spec.path)
    split = shards.SplitSettings(seed, test_fraction, validation_fraction)
    fitted = shards.fit(paths, split, min_freq=int(spec.options.get("min_freq", 1)),
                        max_validation_rows=max_validation_rows, preprocessing=preprocessing)
    if fitted.validation is None:
        raise DataError(f"criteo:{spec.path}: no validation rows to choose the best epoch on; train on more rows")
    return Source(paths, fitted.vocabularies, fitted.transforms, fitted.rows, fitted.corrupt, fitted.validation,
                  shards.Encoder(fitted.vocabularies, fitted.transforms, split, FIT),
                  shards.Encoder(fitted.vocabularies, fitted.transforms, split, TEST))


def log_source(spec, seed: int, preprocessing: Path | None = None) -> Source:
    paths = logs.log_paths(spec.path)
    meta = spec.options.get("meta")
    m = interactions.read_meta(Path(str(meta))) if meta else interactions.Meta([], {}, 0)
    fitted = logs.fit(lambda: logs.read_blocks(paths), spec.path, meta=m, neg_ratio=int(spec.options.get("neg_ratio", 4)),
                      seed=seed, preprocessing=preprocessing)
    validation = fitted.held_out(VALIDATION)
    if not len(validation):
        raise DataError(f"interactions:{spec.path}: no user has 3 interactions, so there are no validation rows to "
                        "choose the best epoch on; train on a longer log")
    return Source(paths, fitted.vocabularies, fitted.transforms, fitted.rows,
                  fitted.corrupt + m.corrupt, validation, logs.Encoder(fitted, FIT),
                  test=fitted.held_out(TEST))


def stream(source: Source, encoder, readers: int):
    """A Ray Data dataset of the rows ``encoder`` keeps (``sparse``, ``dense``, ``label``), read as it is iterated."""
    import ray
    import ray.data

    paths = source.paths
    encoder = ray.put(encoder)
    items = ray.data.from_items([{"shard": i} for i in range(len(paths))], override_num_blocks=len(paths))
    return items.map_batches(ShardReader, fn_constructor_kwargs={"paths": [str(p) for p in paths], "encoder": [encoder]},
                             batch_size=1, num_cpus=1,
                             compute=ray.data.ActorPoolStrategy(size=max(1, min(readers, len(paths)))))


def is_streamed(spec: str) -> bool:
    """A spec that ``--workers`` trains on streamed: Criteo data or an interaction log (a file, a directory of
    shards or a glob)."""
    try:
        return parse_spec(spec).kind in ("criteo", "interactions")
    except DataError:
        return False


def held_out_batches(source: Source, readers: int) -> Iterator[dict[str, np.ndarray]]:
    if source.test is not None:
        t = source.test
        for start in range(0, len(t), 65536):
            yield {"sparse": t.sparse[start:start + 65536], "dense": t.dense[start:start + 65536],
                   "label": t.label[start:start + 65536]}
        return
    yield from stream(source, source.test_encoder, readers).iter_batches(batch_size=65536, batch_format="numpy")


def train_streamed(data_spec: str, out: Path, *, embedding_dim: int, ray: RaySettings, train: TrainSettings,
                   validation_fraction: float = 0.1, test_fraction: float = 0.2,
                   max_validation_rows: int = 500_000, teacher: Teacher | None = None) -> dict[str, Any]:
    """Train on shards (see the module's docstring); returns what ``train_model`` returns. ``teacher``: distil
    from it (its preprocessing reused; its logits computed beside each block by the shard readers)."""
    from recserve.converters.evaluate import count_parameters, predict, session
    from recserve.models.artifact import TrainedModel, build_module
    from recserve.models.export import RANKER_OUTPUTS, export_onnx
    from recserve.models.ranker import RankerConfig

    spec = parse_spec(data_spec)
    prep = teacher.preprocessing if teacher is not None else None
    source = (criteo_source(spec, train.seed, test_fraction, validation_fraction, max_validation_rows, prep)
              if spec.kind == "criteo" else log_source(spec, train.seed, prep))
    validation = source.validation
    config = RankerConfig([f.cardinality for f in validation.sparse_features], len(validation.dense_names),
                          embedding_dim=embedding_dim)
    fit_encoder, distill, teacher_scores = source.fit_encoder, None, None
    if teacher is not None:
        fit_encoder, distill = WithTeacher(source.fit_encoder, teacher.graph), Distillation(np.zeros(0, np.float32))
        teacher_scores = TeacherScores(teacher.graph, threads=2)
    with ray_running(ray, readers=ray.readers):
        state, history = fit_ranker_ray(config, stream(source, fit_encoder, ray.readers), validation, train,
                                        ray, checkpoint_storage(out), rows_per_epoch=source.rows["fit"],
                                        distill=distill)
        module = build_module("ranker", config)
        module.load_state_dict(state)
        module.eval()
        graph = export_onnx(module, "ranker", {"sparse": validation.sparse[:64], "dense": validation.dense[:64]})
        sess = session(graph, 2)
        scores, labels, sample, teacher_logits = [], [], {"sparse": [], "dense": []}, []
        kept = 0
        for batch in held_out_batches(source, ray.readers):
            (s,) = predict(sess, {"sparse": batch["sparse"], "dense": batch["dense"]}, [RANKER_OUTPUTS[0]])
            scores.append(np.asarray(s, np.float64).ravel())
            if teacher_scores is not None:
                teacher_logits.append(teacher_scores.logits(batch["sparse"], batch["dense"]))
            labels.append(batch["label"])
            if kept < DISTINCT_SAMPLE:
                for k in sample:
                    sample[k].append(batch[k][:DISTINCT_SAMPLE - kept])
                kept += len(sample["sparse"][-1])
    if not scores:
        raise DataError(f"{data_spec}: no test rows to report on; train on more rows")
    scores_all, labels_all = np.concatenate(scores), np.concatenate(labels)
    quality = ranking_metrics(labels_all, scores_all)
    quality["distinct_score_ratio"] = distinct_ratio(scores_all[:kept], {k: np.concatenate(v)
                                                                         for k, v in sample.items()})
    history["rows"] = source.rows | {"validation_scored": len(validation)}
    trained = TrainedModel("ranker", config, module, data_spec, train.seed)
    trained.metrics = {"held_out": quality, "history": history, "corrupt_rows": source.corrupt}
    result = {}
    if teacher is not None:
        trained.metrics["teacher"] = result["teacher"] = {
            "directory": str(teacher.directory),
            "held_out": ranking_metrics(labels_all, np.concatenate(teacher_logits), logits=True)}
    # what the artifact needs of a dataset: the fitted preprocessing (and its column names, from the
    # validation rows' features)
    data = Dataset(spec.kind, data_spec, source.vocabularies, source.transforms, ranking_train=validation,
                   corrupt_rows=source.corrupt)
    trained.save(Path(out), data, graph)
    return result | {"quality": quality, "parameters": count_parameters(graph),
                     "size_bytes": graph.ByteSize(), "corrupt_rows": source.corrupt}
