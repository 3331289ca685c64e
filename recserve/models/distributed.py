"""``recserve train --workers N``: the ranker trained on Ray Train (issue 20), one code path for 1 and N workers.

- **Data parallel.** ``TorchTrainer`` starts N worker processes; ``prepare_model`` wraps the ranker in
  DistributedDataParallel (gloo on CPU, NCCL where each worker has a GPU), which averages the gradients of
  each step. Each worker steps on ``batch_size / N`` rows, so the global batch, the learning rate and the
  number of steps per epoch are those of one process: N workers learn what one would, N times as wide.
- **Data.** The training rows are a Ray Data dataset split across the workers as a stream
  (``get_dataset_shard``): a worker iterates its share in batches, shuffled through a local buffer, and
  never holds the data whole. (The rows are put into Ray's object store from the dataset recserve read;
  reading Criteo shards straight into Ray Data is not built yet.)
- **Checkpoints.** After every epoch rank 0 writes a Ray Train checkpoint: the model's and the optimizer's
  state, the epochs done with their validation AUC, and the best epoch's weights. A worker that dies makes
  Ray Train restart the group from the last checkpoint (``FailureConfig``: up to ``max_failures`` times),
  not from the start; a run interrupted as a whole continues from it with ``resume``.
- **Choice on validation.** Rank 0 scores the validation rows after each epoch; the epoch with the best
  validation AUC is the one exported, as in ``fit_ranker``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recserve.data.schema import RankingData
from recserve.errors import ConfigError, RecserveError
from recserve.models.ranker import RankerConfig
from recserve.models.train import TrainSettings

STATE_FILE = "state.pt"
SHUFFLE_BUFFER = 8192
"""Rows each worker shuffles its stream through (a local shuffle: the rows are already in random order)."""


@dataclass
class RaySettings:
    workers: int = 1
    """Ray Train worker processes (each one data-parallel replica of the model)."""
    address: str | None = None
    """An existing Ray cluster (``ray://head:10001``, or ``auto``); None starts a local Ray for the run."""
    resume: bool = False
    """Continue the run whose checkpoints are in ``storage`` instead of starting over."""
    max_failures: int = 3
    """Worker-group failures survived (each restarts from the last checkpoint)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0


class TrainRunError(RecserveError):
    """The distributed run failed beyond what its failure budget survives."""

    exit_code = 1


def checkpoint_storage(out: Path) -> Path:
    """Where a run for ``out`` keeps its checkpoints (beside ``out``, so that ``--force`` on ``out`` keeps them)."""
    return Path(out).resolve().parent / f".{Path(out).name}.ray-train"


def _loop(config: dict) -> None:
    """One Ray Train worker (see the module's docstring)."""
    import ray.train
    import ray.train.torch
    import torch
    from torch import nn

    from recserve.converters.metrics import auc_score
    from recserve.models.artifact import build_module

    quiet_train()
    s = TrainSettings(**config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(s.seed)
    torch.set_num_threads(max(1, config["threads"]))
    model = build_module("ranker", RankerConfig(**config["model"]))
    opt = torch.optim.Adam(model.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
    run = {"history": [], "best_auc": -1.0, "best_epoch": 0, "best_state": None, "rows": 0, "seconds": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        run = saved["run"]
    model = ray.train.torch.prepare_model(model)
    plain = model.module if hasattr(model, "module") else model
    shard = ray.train.get_dataset_shard("train")
    validation = ray.get(config["validation"]) if rank == 0 else None
    bce = nn.functional.binary_cross_entropy_with_logits
    per_worker = max(1, s.batch_size // world)
    for epoch in range(len(run["history"]), s.epochs):
        model.train()
        started, rows, loss = time.monotonic(), 0, torch.zeros(())
        for batch in shard.iter_torch_batches(batch_size=per_worker, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                              local_shuffle_seed=s.seed + epoch):
            logit = model(batch["sparse"], batch["dense"]).squeeze(1)
            loss = bce(logit, batch["label"].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows += len(batch["label"])
        seconds = time.monotonic() - started
        metrics = {"epoch": epoch + 1, "loss": float(loss.item()), "rows_per_s_worker": rows / max(seconds, 1e-9)}
        if rank != 0:
            ray.train.report(metrics)
            continue
        plain.eval()
        with torch.no_grad():
            scores = np.concatenate([plain(torch.from_numpy(validation["sparse"][i:i + 8192]),
                                           torch.from_numpy(validation["dense"][i:i + 8192])).squeeze(1).numpy()
                                     for i in range(0, len(validation["label"]), 8192)])
        auc = auc_score(validation["label"], scores)
        run["history"].append({"epoch": epoch + 1, "validation_auc": auc, "loss": metrics["loss"]})
        run["rows"] += rows * world
        run["seconds"] += seconds
        if auc > run["best_auc"] or run["best_state"] is None:
            run.update(best_auc=auc, best_epoch=epoch + 1,
                       best_state={k: v.detach().clone() for k, v in plain.state_dict().items()})
        print(f"epoch {epoch + 1}/{s.epochs}: {rows * world / max(seconds, 1e-9):,.0f} rows/s on {world} "
              f"worker{'s' if world > 1 else ''}, loss {metrics['loss']:.4f}, validation AUC {auc:.4f}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": plain.state_dict(), "optimizer": opt.state_dict(), "run": run}, Path(d) / STATE_FILE)
            ray.train.report(metrics | {"validation_auc": auc},
                             checkpoint=ray.train.Checkpoint.from_directory(d))


def quiet_train() -> None:
    """Ray Train logs every report at INFO under a logger named by its file's path, which its own log-level
    setting (``RunConfig.logging_config``, a filter on ``ray.train.*``) does not reach."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_data() -> None:
    """Ray Data's per-operator progress bars would interleave with the run's own epoch lines."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def _dataset(rows: RankingData):
    """The rows as a Ray Data dataset of tensor columns (sparse [S] int64, dense [D] float32, label float32)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    table = pa.table({"sparse": ArrowTensorArray.from_numpy(np.ascontiguousarray(rows.sparse, np.int64)),
                      "dense": ArrowTensorArray.from_numpy(np.ascontiguousarray(rows.dense, np.float32)),
                      "label": pa.array(np.asarray(rows.label, np.float32))})
    return ray.data.from_arrow(table)


def fit_ranker_ray(config: RankerConfig, fit: RankingData, validation: RankingData, settings: TrainSettings,
                   ray_settings: RaySettings, storage: Path) -> tuple[dict, dict]:
    """Train on Ray Train; returns (the best epoch's state dict, the history) (see the module's docstring)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if not len(validation):
        raise ConfigError("training on Ray picks the best epoch on validation rows; this data has none")
    storage = Path(storage)
    name = "run"
    if ray_settings.resume and not (storage / name).is_dir():
        raise ConfigError(f"--resume: no earlier run to continue in {storage}; start one without --resume")
    if not ray_settings.resume and storage.exists():
        shutil.rmtree(storage)
    storage.mkdir(parents=True, exist_ok=True)
    started_ray = not ray.is_initialized()
    if started_ray:
        local = {} if ray_settings.address else {"num_cpus": max(2, int(ray_settings.workers
                                                                       * ray_settings.cpus_per_worker) + 1)}
        # the dashboard serves the State API, which Ray Train's placement-group cleaner polls (without it: a
        # warning every second of the run)
        ray.init(address=ray_settings.address, log_to_driver=True, logging_config=ray.LoggingConfig(log_level="WARNING"),
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}, **local)  # each epoch line once
    quiet_data()
    try:
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"settings": asdict(settings) | {"deadline": None}, "model": asdict(config),
                               "threads": max(1, int(ray_settings.cpus_per_worker)),
                               "validation": ray.put({"sparse": validation.sparse, "dense": validation.dense,
                                                      "label": validation.label})},
            scaling_config=ray.train.ScalingConfig(num_workers=ray_settings.workers, use_gpu=ray_settings.use_gpu,
                                                   resources_per_worker={"CPU": ray_settings.cpus_per_worker}),
            run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                           failure_config=ray.train.FailureConfig(max_failures=ray_settings.max_failures),
                                           logging_config=ray.LoggingConfig(log_level="WARNING")),
            datasets={"train": _dataset(fit)},
        )
        try:
            result = trainer.fit()
        except Exception as e:  # Ray Train raises its own error types; the run's own message says what failed
            raise TrainRunError(f"the Ray Train run failed: {str(e).splitlines()[0][:300]}") from e
        if result.checkpoint is None:
            raise TrainRunError("the Ray Train run ended without a checkpoint")
        import torch

        with result.checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, weights_only=False)
    finally:
        if started_ray:
            ray.shutdown()
    run = saved["run"]
    history = {"epochs": run["history"], "best_epoch": run["best_epoch"], "best_validation_auc": run["best_auc"],
               "workers": ray_settings.workers, "rows_per_s": run["rows"] / max(run["seconds"], 1e-9)}
    (storage / "history.json").write_text(json.dumps(history, indent=2))
    return run["best_state"], history
