"""``recserve train --workers N``: the ranker trained on Ray Train (issue 20), one code path for 1 and N workers.

- **Data parallel.** ``TorchTrainer`` starts N worker processes; ``prepare_model`` wraps the ranker in
  DistributedDataParallel (gloo on CPU, NCCL where each worker has a GPU), which averages the gradients of
  each step. Each worker steps on ``batch_size / N`` rows, so the global batch, the learning rate and the
  number of steps per epoch are those of one process: N workers learn what one would, N times as wide.
- **Data.** The training rows are a Ray Data dataset split across the workers as a stream
  (``get_dataset_shard``): a worker iterates its share in batches, shuffled through a local buffer, and
  never holds the data whole. In-memory data is put into Ray's object store; Criteo shards are read and
  encoded block by block by Ray Data actors (:mod:`recserve.models.streamed`), so no process holds them.
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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from recserve.data.schema import RankingData
from recserve.errors import ConfigError, RecserveError
from recserve.models.ranker import RankerConfig
from recserve.models.train import Distillation, TrainSettings

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
    """One GPU per worker (NCCL between them) instead of CPUs (gloo)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves for each worker; also its PyTorch threads."""
    readers: int = 1
    """Ray Data actors that parse and encode shards for a streamed run (``criteo:DIR``)."""


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

    from recserve.converters.metrics import auc_score
    from recserve.models.artifact import build_module
    from recserve.models.train import Distillation, predict_logits, ranker_loss

    quiet_train()
    quiet_data()
    s = TrainSettings(**config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(s.seed)
    torch.set_num_threads(max(1, config["threads"]))
    model = ray.get(config["module"]) if config.get("module") is not None else \
        build_module("ranker", RankerConfig(**config["model"]))
    run = {"history": [], "best_auc": -1.0, "best_score": -np.inf, "best_epoch": 0, "best_state": None, "rows": 0,
           "seconds": 0.0}
    saved = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, weights_only=False, map_location="cpu")
        model.load_state_dict(saved["model"])
        run = saved["run"]
    model = ray.train.torch.prepare_model(model)  # DDP, and onto this worker's GPU with use_gpu
    opt = torch.optim.Adam(model.parameters(), lr=s.learning_rate, weight_decay=s.weight_decay)
    if saved is not None:
        opt.load_state_dict(saved["optimizer"])  # its state follows the parameters' device
    plain = model.module if hasattr(model, "module") else model
    shard = ray.train.get_dataset_shard("train")
    validation = ray.get(config["validation"])
    teacher_validation = config.get("validation_teacher")
    board, per_epoch = config["board"], config["rows_per_epoch"]
    distill = Distillation(np.zeros(0, np.float32), **config["distill"]) if config.get("distill") else None
    per_worker = max(1, s.batch_size // world)
    for epoch in range(len(run["history"]), s.epochs):
        model.train()
        started, rows, loss, next_report = time.monotonic(), 0, torch.zeros(()), 0.0
        for batch in shard.iter_torch_batches(batch_size=per_worker, local_shuffle_buffer_size=SHUFFLE_BUFFER,
                                              local_shuffle_seed=s.seed + epoch):
            logit = model(batch["sparse"], batch["dense"]).squeeze(1)
            loss = ranker_loss(logit, batch["label"].float(), batch.get("teacher"), distill)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows += len(batch["label"])
            if rank == 0 and time.monotonic() >= next_report:
                board.put.remote(epoch=epoch + 1, rows=(epoch * per_epoch if per_epoch else 0) + rows * world,
                                 rows_per_s=rows * world / max(time.monotonic() - started, 1e-9))
                next_report = time.monotonic() + 0.5
        seconds = time.monotonic() - started
        metrics = {"epoch": epoch + 1, "loss": float(loss.item()), "rows_per_s_worker": rows / max(seconds, 1e-9)}
        # every rank scores the validation rows (the same weights after DDP's averaging, the same rows): they
        # all reach the same patience and learning-rate decisions without a message
        scores = predict_logits(plain, validation, device=device)
        auc = auc_score(validation.label, scores)
        entry = {"epoch": epoch + 1, "validation_auc": auc, "loss": metrics["loss"]}
        score = auc
        if teacher_validation is not None:  # distillation choosing its epoch by agreement with the teacher
            entry["validation_logit_mse"] = float(np.mean((scores - teacher_validation) ** 2))
            score = -entry["validation_logit_mse"]
        run["history"].append(entry)
        run["rows"] += rows * world
        run["seconds"] += seconds
        improved = score > run["best_score"] or run["best_state"] is None
        if improved:
            run.update(best_auc=auc, best_score=score, best_epoch=epoch + 1,
                       best_state={k: v.detach().cpu().clone() for k, v in plain.state_dict().items()})
        elif s.decay_on_plateau:
            for group in opt.param_groups:
                group["lr"] /= 2
        stop = not improved and s.patience is not None and epoch + 1 - run["best_epoch"] >= s.patience
        if rank != 0:
            ray.train.report(metrics)
        else:
            board.put.remote(epoch=epoch + 1, rows=(epoch + 1) * per_epoch if per_epoch else run["rows"],
                             validation_auc=auc, rows_per_s=rows * world / max(seconds, 1e-9))
            print(f"epoch {epoch + 1}/{s.epochs}: {rows * world / max(seconds, 1e-9):,.0f} rows/s on {world} "
                  f"worker{'s' if world > 1 else ''}, loss {metrics['loss']:.4f}, validation AUC {auc:.4f}"
                  + (" (no better for patience's epochs: stopping)" if stop else ""), flush=True)
            with tempfile.TemporaryDirectory() as d:
                torch.save({"model": plain.state_dict(), "optimizer": opt.state_dict(), "run": run},
                           Path(d) / STATE_FILE)
                ray.train.report(metrics | {"validation_auc": auc},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))
        if stop:
            break


@contextmanager
def progress_bar(board, epochs: int, rows_per_epoch: int):
    """One bar for the run on a terminal (rows over all epochs, rows/s, epoch, validation AUC), however many
    workers there are; without a terminal, rank 0's epoch lines say the same."""
    import sys
    import threading

    import ray
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    if not sys.stderr.isatty():
        yield
        return
    done = threading.Event()
    bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                   transient=True)

    def follow() -> None:
        while not done.wait(0.5):
            try:
                st = ray.get(board.get.remote(), timeout=5)
            except Exception:  # noqa: BLE001  a restarting group, a slow actor: the next poll will tell
                continue
            auc = f", val AUC {st['validation_auc']:.4f}" if "validation_auc" in st else ""
            bar.update(task, completed=st.get("rows", 0),
                       info=f"epoch {st.get('epoch', 1)}/{epochs}, {st.get('rows_per_s', 0):,.0f} rows/s{auc}")

    with bar:
        task = bar.add_task("train", total=max(1, epochs * rows_per_epoch), info="starting workers")
        thread = threading.Thread(target=follow, daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def quiet_train() -> None:
    """Ray Train logs every report at INFO under a logger named by its file's path, which its own log-level
    setting (``RunConfig.logging_config``, a filter on ``ray.train.*``) does not reach."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def quiet_data() -> None:
    """Ray Data's per-operator progress bars and "execution finished" lines would interleave with the run's own
    epoch lines."""
    import logging

    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": we did
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def _dataset(rows: RankingData, teacher: np.ndarray | None = None):
    """The rows as a Ray Data dataset of tensor columns (sparse [S] int64, dense [D] float32, label float32, and
    the teacher's logits float32 when distilling)."""
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    columns = {"sparse": ArrowTensorArray.from_numpy(np.ascontiguousarray(rows.sparse, np.int64)),
               "dense": ArrowTensorArray.from_numpy(np.ascontiguousarray(rows.dense, np.float32)),
               "label": pa.array(np.asarray(rows.label, np.float32))}
    if teacher is not None:
        columns["teacher"] = pa.array(np.asarray(teacher, np.float32))
    return ray.data.from_arrow(pa.table(columns))


@contextmanager
def ray_running(ray_settings: RaySettings, readers: int = 0):
    """Ray for the block: the cluster at ``address``, else a local Ray for the run (stopped after it); one already
    initialized in this process is used as it is. ``readers``: CPUs kept for Ray Data's shard readers."""
    import ray

    started = not ray.is_initialized()
    if started:
        local = {} if ray_settings.address else {"num_cpus": max(2, int(ray_settings.workers
                                                                       * ray_settings.cpus_per_worker) + 1 + readers)}
        ray.init(address=ray_settings.address, log_to_driver=True, logging_config=ray.LoggingConfig(log_level="WARNING"),
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # each epoch line once
                                               "RAY_DATA_LOG_LEVEL": "WARNING"}}, **local)
    quiet_data()
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def fit_ranker_ray(config: RankerConfig | None, fit, validation: RankingData, settings: TrainSettings,
                   ray_settings: RaySettings, storage: Path, rows_per_epoch: int | None = None, *,
                   distill: Distillation | None = None, module=None) -> tuple[dict, dict]:
    """Train on Ray Train; returns (the best epoch's state dict, the history) (see the module's docstring).

    ``fit``: the training rows in memory (put into Ray's object store), or a Ray Data dataset of them
    (``sparse``, ``dense``, ``label`` columns; streamed from shards by :mod:`recserve.models.streamed`), with its
    ``rows_per_epoch`` for the progress bar. ``distill``: train a student on the teacher's logits for the ``fit``
    rows (``distill.teacher_logits`` for rows in memory; a ``teacher`` column of a dataset) as
    :func:`recserve.models.train.fit_ranker` does, choosing the epoch by agreement when it
    carries the validation rows' logits. ``module``: the model to train (a student initialized from its teacher,
    a pruned or factorized ranker to fine-tune; each worker gets a copy) instead of a new one of ``config``."""
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
    rows_per_epoch = len(fit) if isinstance(fit, RankingData) else int(rows_per_epoch or 0)
    teacher_validation = None
    if distill is not None and distill.validation_logits is not None:
        teacher_validation = np.asarray(distill.validation_logits, np.float32)
    with ray_running(ray_settings):
        from recserve.models.board import ProgressBoard

        board = ray.remote(num_cpus=0)(ProgressBoard).remote()
        trainer = TorchTrainer(
            _loop,
            train_loop_config={"settings": asdict(settings) | {"deadline": None},
                               "model": asdict(config) if config is not None else None,
                               "board": board, "rows_per_epoch": rows_per_epoch,
                               "threads": max(1, int(ray_settings.cpus_per_worker)),
                               "validation": ray.put(validation), "validation_teacher": teacher_validation,
                               "distill": None if distill is None else {"temperature": distill.temperature,
                                                                        "alpha": distill.alpha, "loss": distill.loss},
                               "module": None if module is None else ray.put(module)},
            scaling_config=ray.train.ScalingConfig(num_workers=ray_settings.workers, use_gpu=ray_settings.use_gpu,
                                                   resources_per_worker={"CPU": ray_settings.cpus_per_worker}),
            run_config=ray.train.RunConfig(name=name, storage_path=str(storage),
                                           failure_config=ray.train.FailureConfig(max_failures=ray_settings.max_failures),
                                           logging_config=ray.LoggingConfig(log_level="WARNING")),
            datasets={"train": _dataset(fit, distill.teacher_logits if distill else None)
                      if isinstance(fit, RankingData) else fit},
        )
        try:
            with progress_bar(board, settings.epochs, rows_per_epoch):
                result = trainer.fit()
        except Exception as e:  # Ray Train raises its own error types; the run's own message says what failed
            raise TrainRunError(f"the Ray Train run failed: {str(e).splitlines()[0][:300]}") from e
        if result.checkpoint is None:
            raise TrainRunError("the Ray Train run ended without a checkpoint")
        import torch

        with result.checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / STATE_FILE, weights_only=False, map_location="cpu")
    run = saved["run"]
    history = {"epochs": run["history"], "best_epoch": run["best_epoch"], "best_validation_auc": run["best_auc"],
               "workers": ray_settings.workers, "rows_per_s": run["rows"] / max(run["seconds"], 1e-9)}
    (storage / "history.json").write_text(json.dumps(history, indent=2))
    return run["best_state"], history
