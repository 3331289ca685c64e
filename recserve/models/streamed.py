"""``recserve train --data criteo:DIR --workers N``: a ranker trained on shards that no process holds whole.

1. One pass over the shards (:func:`recserve.data.shards.fit`) fits the vocabularies and transforms on the
   training rows and keeps a bounded sample of validation rows.
2. Ray Data actors (:class:`ShardReader`) read the shards block by block, keep the training rows, encode them
   and stream them to the Ray Train workers (:func:`recserve.models.distributed.fit_ranker_ray`); every epoch
   reads the shards again.
3. The best epoch is exported to ONNX and scored on every test row, streamed the same way: the driver keeps
   one score and one label per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recserve.converters.metrics import distinct_ratio, ranking_metrics
from recserve.data import criteo, shards
from recserve.data.schema import Dataset
from recserve.data.spec import parse_spec
from recserve.data.splits import FIT, TEST
from recserve.errors import DataError
from recserve.models.distributed import RaySettings, checkpoint_storage, fit_ranker_ray, ray_running
from recserve.models.train import TrainSettings

DISTINCT_SAMPLE = 100_000
"""Test rows whose inputs are kept to measure ``distinct_score_ratio``."""


class ShardReader:
    """A Ray Data actor: shard numbers in, encoded rows of one split out, block by block."""

    def __init__(self, paths: list[str], encoder: list):
        import ray

        self.paths = [Path(p) for p in paths]
        self.encoder: shards.Encoder = ray.get(encoder[0])  # a reference in a list: Ray passes it unresolved

    def __call__(self, batch: dict[str, np.ndarray]):
        for shard in batch["shard"].tolist():
            for block in criteo.read_blocks([self.paths[shard]], shards=[shard]):
                rows = self.encoder.select(block)
                if len(rows):
                    yield self.encoder.arrays(rows)


def stream(paths: list[Path], fitted: shards.Fitted, split: shards.SplitSettings, keep: int, readers: int):
    """A Ray Data dataset of the rows of split ``keep`` (``sparse``, ``dense``, ``label``), read as it is iterated."""
    import ray
    import ray.data

    encoder = ray.put(shards.Encoder(fitted.vocabularies, fitted.transforms, split, keep))
    items = ray.data.from_items([{"shard": i} for i in range(len(paths))], override_num_blocks=len(paths))
    return items.map_batches(ShardReader, fn_constructor_kwargs={"paths": [str(p) for p in paths], "encoder": [encoder]},
                             batch_size=1, num_cpus=1,
                             compute=ray.data.ActorPoolStrategy(size=max(1, min(readers, len(paths)))))


def is_streamed(spec: str) -> bool:
    """A spec that ``--workers`` trains on streamed: Criteo data (a file, a directory of shards or a glob)."""
    try:
        return parse_spec(spec).kind == "criteo"
    except DataError:
        return False


def train_streamed(data_spec: str, out: Path, *, embedding_dim: int, ray: RaySettings, train: TrainSettings,
                   validation_fraction: float = 0.1, test_fraction: float = 0.2,
                   max_validation_rows: int = 500_000) -> dict[str, Any]:
    """Train on Criteo shards (see the module's docstring); returns what ``train_model`` returns."""
    from recserve.converters.evaluate import count_parameters, predict, session
    from recserve.models.artifact import TrainedModel, build_module
    from recserve.models.export import RANKER_OUTPUTS, export_onnx
    from recserve.models.ranker import RankerConfig

    spec = parse_spec(data_spec)
    paths = criteo.shard_paths(spec.path)
    split = shards.SplitSettings(train.seed, test_fraction, validation_fraction)
    fitted = shards.fit(paths, split, min_freq=int(spec.options.get("min_freq", 1)),
                        max_validation_rows=max_validation_rows)
    if fitted.validation is None:
        raise DataError(f"{data_spec}: no validation rows to choose the best epoch on; train on more rows")
    validation = fitted.validation
    config = RankerConfig([f.cardinality for f in validation.sparse_features], len(validation.dense_names),
                          embedding_dim=embedding_dim)
    with ray_running(ray, readers=ray.readers):
        state, history = fit_ranker_ray(config, stream(paths, fitted, split, FIT, ray.readers), validation, train,
                                        ray, checkpoint_storage(out), rows_per_epoch=fitted.rows["fit"])
        module = build_module("ranker", config)
        module.load_state_dict(state)
        module.eval()
        graph = export_onnx(module, "ranker", {"sparse": validation.sparse[:64], "dense": validation.dense[:64]})
        sess = session(graph, 2)
        scores, labels, sample = [], [], {"sparse": [], "dense": []}
        kept = 0
        for batch in stream(paths, fitted, split, TEST, ray.readers).iter_batches(batch_size=65536,
                                                                                  batch_format="numpy"):
            (s,) = predict(sess, {"sparse": batch["sparse"], "dense": batch["dense"]}, [RANKER_OUTPUTS[0]])
            scores.append(np.asarray(s, np.float64).ravel())
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
    history["rows"] = fitted.rows | {"validation_scored": len(validation)}
    trained = TrainedModel("ranker", config, module, data_spec, train.seed)
    trained.metrics = {"held_out": quality, "history": history, "corrupt_rows": fitted.corrupt}
    # what the artifact needs of a dataset: the fitted preprocessing (and its column names, from the
    # validation rows' features)
    data = Dataset("criteo", data_spec, fitted.vocabularies, fitted.transforms, ranking_train=validation,
                   corrupt_rows=fitted.corrupt)
    trained.save(Path(out), data, graph)
    return {"quality": quality, "parameters": count_parameters(graph),
            "size_bytes": graph.ByteSize(), "corrupt_rows": fitted.corrupt}
