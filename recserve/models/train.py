"""CPU training loops for the reference models, with a progress bar.

``fit_ranker`` also does knowledge distillation when given teacher logits, and fine-tuning of a
pruned model (masks from ``torch.nn.utils.prune`` stay applied through its forward hooks).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from recserve.converters.metrics import auc_score
from recserve.data.schema import RankingData, RetrievalData
from recserve.models.ranker import Ranker
from recserve.models.two_tower import TwoTower


@dataclass
class TrainSettings:
    """How to train; the defaults suit the demo and the public samples on 2 CPU cores."""

    epochs: int = 3
    batch_size: int = 1024
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    seed: int = 0
    patience: int | None = None
    """Rankers: stop after this many epochs without a better validation score (None: run every epoch)."""
    decay_on_plateau: bool = False
    """Rankers: halve the learning rate after each epoch that does not improve the validation score."""
    threads: int = 2
    deadline: float | None = None
    """``time.monotonic()`` after which ranker training stops at the end of the epoch (a time budget)."""
    epoch_lines: bool = True
    """Without a terminal (CI, a log file), print a line per epoch to stderr (a bar needs a TTY)."""
    logq_correction: bool = False
    """Two-tower only: subtract log(item frequency) from the in-batch logits (sampled-softmax
    correction; popular items are in-batch negatives more often) and mask repeats of the positive
    item among a batch's negatives. It puts popularity back into the scores: better recall on
    MovieLens-100k, but on popularity-driven data (the synthetic generator) every user gets about
    the same candidates, so it is opt-in."""


@dataclass
class Distillation:
    """Soft targets for a student: ``alpha * BCE(labels) + (1 - alpha) * soft loss``.

    The soft loss is ``T^2 * BCE(student / T, sigmoid(teacher / T))`` (``bce``) or the mean squared
    difference of the logits (``mse``: every row's order counts alike, which is what AUC reads).
    """

    teacher_logits: np.ndarray
    temperature: float = 2.0
    alpha: float = 0.5
    loss: str = "bce"
    validation_logits: np.ndarray | None = None
    """The teacher's logits on the rows given as ``validation``: with them, the best epoch is the one
    whose scores agree most with the teacher's there (mean squared logit difference), reading no label."""


def ranker_loss(logit: torch.Tensor, label: torch.Tensor, teacher: torch.Tensor | None = None,
                distill: Distillation | None = None) -> torch.Tensor:
    """BCE on the labels, blended with the teacher part when distilling (see :class:`Distillation`)."""
    bce = nn.functional.binary_cross_entropy_with_logits
    loss = bce(logit, label)
    if distill is None:
        return loss
    t = distill.temperature
    if distill.loss == "mse":
        soft_loss = nn.functional.mse_loss(logit, teacher)
    else:
        soft_loss = t * t * bce(logit / t, torch.sigmoid(teacher / t))
    return distill.alpha * loss + (1 - distill.alpha) * soft_loss


def _progress() -> Progress:
    """A bar on a terminal; nothing elsewhere (:func:`_epoch_line` reports instead)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), transient=True, disable=not sys.stderr.isatty())


def _epoch_line(settings: TrainSettings, label: str, started: float, text: str) -> None:
    if settings.epoch_lines and not sys.stderr.isatty():
        print(f"{label}: {text} ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)


def predict_logits(model: Ranker, data: RankingData, batch_size: int = 8192, device=None) -> np.ndarray:
    """The model's logits for ``data`` (float32), scored in batches (on ``device`` when given: a GPU)."""
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(data), batch_size):
            sp = torch.from_numpy(data.sparse[s:s + batch_size])
            de = torch.from_numpy(data.dense[s:s + batch_size])
            if device is not None:
                sp, de = sp.to(device), de.to(device)
            out.append(model(sp, de).squeeze(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def fit_ranker(model: Ranker, data: RankingData, settings: TrainSettings, *, validation: RankingData | None = None,
               distill: Distillation | None = None, label: str = "train") -> dict:
    """Train ``model`` in place on ``data``; returns a history dict.

    With ``validation`` rows (never trained on), the epoch with the best validation AUC is kept and
    ``settings.patience`` stops the run early; without, the last epoch is kept.
    """
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    rng = np.random.default_rng(settings.seed)
    judged = validation is not None and len(validation) > 0
    sparse, dense, y = (torch.from_numpy(a) for a in (data.sparse, data.dense, data.label))
    teacher = torch.from_numpy(distill.teacher_logits.astype(np.float32)) if distill is not None else None
    by_agreement = judged and distill is not None and distill.validation_logits is not None
    opt = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    best_score, best_auc, best_epoch, best_state, history = -np.inf, -1.0, 0, None, []
    started = time.monotonic()
    with _progress() as progress:
        task = progress.add_task(label, total=settings.epochs * max(1, len(data) // settings.batch_size), info="")
        for epoch in range(settings.epochs):
            model.train()
            perm = torch.from_numpy(rng.permutation(len(data)))
            for s in range(0, len(perm), settings.batch_size):
                b = perm[s:s + settings.batch_size]
                logit = model(sparse[b], dense[b]).squeeze(1)
                loss = ranker_loss(logit, y[b], teacher[b] if teacher is not None else None, distill)
                opt.zero_grad()
                loss.backward()
                opt.step()
                progress.update(task, advance=1, info=f"epoch {epoch + 1}/{settings.epochs} loss {loss.item():.4f}")
            val_logits = predict_logits(model, validation) if judged else None
            val_auc = auc_score(validation.label, val_logits) if judged else float("nan")
            entry = {"epoch": epoch + 1, "validation_auc": val_auc}
            score = val_auc
            if by_agreement:
                score = -float(np.mean((val_logits - distill.validation_logits) ** 2))
                entry["validation_logit_mse"] = -score
            history.append(entry)
            _epoch_line(settings, label, started, f"epoch {epoch + 1}/{settings.epochs}, loss {loss.item():.4f}"
                        + (f", validation AUC {val_auc:.4f}" if judged else ""))
            if not judged or score > best_score:
                best_score, best_auc, best_epoch = score, val_auc, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                if settings.patience is not None and epoch + 1 - best_epoch >= settings.patience:
                    break
                if settings.decay_on_plateau:
                    for group in opt.param_groups:
                        group["lr"] /= 2
            if settings.deadline is not None and time.monotonic() >= settings.deadline:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"epochs": history, "best_epoch": best_epoch, "best_validation_auc": best_auc}


def fit_two_tower(model: TwoTower, data: RetrievalData, settings: TrainSettings, *, label: str = "train") -> dict:
    """In-batch-negative softmax training on the positive pairs."""
    started = time.monotonic()
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    rng = np.random.default_rng(settings.seed)
    users = torch.from_numpy(data.user_table)
    items = torch.from_numpy(data.item_table)
    pairs = data.train_pairs
    counts = np.bincount(pairs[:, 1], minlength=len(data.item_table)).astype(np.float64)
    log_q = torch.from_numpy(np.log(np.maximum(counts, 1.0) / max(1, len(pairs))).astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    history = []
    with _progress() as progress:
        task = progress.add_task(label, total=settings.epochs * max(1, len(pairs) // settings.batch_size), info="")
        for epoch in range(settings.epochs):
            model.train()
            perm = rng.permutation(len(pairs))
            total = 0.0
            for s in range(0, len(perm), settings.batch_size):
                b = torch.from_numpy(pairs[perm[s:s + settings.batch_size]])
                u, i = model(users[b[:, 0]], items[b[:, 1]])
                logits = u @ i.T / model.config.temperature
                if settings.logq_correction:
                    logits = logits - log_q[b[:, 1]][None, :]
                    repeats = (b[:, 1][:, None] == b[:, 1][None, :]) & ~torch.eye(len(b), dtype=torch.bool)
                    logits = logits.masked_fill(repeats, float("-inf"))
                loss = nn.functional.cross_entropy(logits, torch.arange(len(b)))
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item()
                progress.update(task, advance=1, info=f"epoch {epoch + 1}/{settings.epochs} loss {loss.item():.4f}")
            history.append({"epoch": epoch + 1, "mean_loss": total / max(1, -(-len(perm) // settings.batch_size))})
            _epoch_line(settings, label, started, f"epoch {epoch + 1}/{settings.epochs}, "
                                                  f"mean loss {history[-1]['mean_loss']:.4f}")
    model.eval()
    return {"epochs": history}
