"""Layer-dropping distillation of a text encoder: a student that keeps some of the teacher's transformer
layers (initialized from them), trained to give the teacher's embeddings.

The texts are the tuning half's queries, the corpus's product titles and query-like spans of those titles
(what the encoder will embed); the held-out queries are never seen. A fifth of the tuning queries (at most
``MAX_VALIDATION``) is set aside for validation, on which everything data-dependent is chosen: which layers
the student keeps (the candidates whose untrained student agrees best with the teacher) and after which
epoch its weights are kept (the best mean cosine with the teacher, or with a ranking loss the best top-10
agreement over the catalog). The loss is the mean squared difference of the two L2-normalized embeddings
(2 - 2 cos); ``ranking_weight`` adds the teacher's order of the catalog for each text, ``token_weight`` the
teacher's last hidden state of each token (:func:`token_loss`). The student is then exported like any encoder
(:func:`export_encoder`: checked against its own PyTorch model), with what was done in its ``encoder.json``.
"""

from __future__ import annotations

import copy
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from recserve.data.search import SearchData
from recserve.encoder.artifact import FILES
from recserve.encoder.export import PACKAGED, ExportResult, export_encoder, load_sentence_transformer, packaged_model_dir
from recserve.errors import ConfigError, DataError
from recserve.outdir import check_out

Schedule = Literal["constant", "linear"]
MAX_VALIDATION = 2000
"""Validation queries at most (a fifth of the tuning queries)."""
SPAN_WORDS = (1, 4)
"""Words in a query-like span of a title (a training text), fewest and most."""
TOP = 10
"""Nearest titles compared when the ranking loss chooses the epoch (the report's top-10 overlap)."""
WARMUP = 0.06
"""Share of the training steps the ``linear`` schedule warms up over."""
TRAIN_SEQ_LENGTH = 64
"""Tokens per text while training (titles and queries are shorter; the exported student keeps the teacher's limit)."""


@dataclass
class DistillSettings:
    layers: int = 3
    """Transformer layers the student keeps."""
    epochs: int = 4
    """Most passes over the training texts; the best epoch on validation is kept."""
    batch_size: int = 64
    learning_rate: float = 1e-4
    """The peak learning rate (see ``schedule``)."""
    schedule: Schedule = "constant"
    """``constant``: ``learning_rate`` throughout; ``linear``: up from 0 over the first ``WARMUP`` of the steps, then
    down to 0 at the last step (the weights settle at the end instead of still jumping at every batch)."""
    max_texts: int = 30_000
    """Training texts at most (a seeded sample), to bound the time on a CPU."""
    ranking_weight: float = 0.0
    """Weight of the ranking-agreement loss over the teacher's catalog embeddings (0: cosine loss only)."""
    temperature: float = 0.05
    """Softmax temperature of the ranking-agreement loss (lower: only the top of each ranking counts)."""
    token_weight: float = 0.0
    """Weight of the token loss: 1 - cosine between the student's and the teacher's last hidden state of each token,
    averaged over the text's tokens (0: off). Many targets per text instead of one pooled vector."""
    seed: int = 0
    device: str | None = None
    """PyTorch device to train on; None: the first CUDA GPU when there is one, else the CPU."""


@dataclass
class DistillReport:
    kept_layers: list[int]
    candidates: dict[str, float]
    """Each kept-layer candidate's validation cosine with the teacher before training."""
    epochs: list[float] = field(default_factory=list)
    """Validation cosine with the teacher after each epoch (with a ranking loss: top-10 agreement)."""
    best_epoch: int = 0
    """0: no epoch beat the student as first cut from the teacher (``start``)."""
    start: float = 0.0
    """The validation measure of the kept layers before any training."""
    train_texts: int = 0
    validation_texts: int = 0


def layer_candidates(total: int, keep: int) -> list[list[int]]:
    """Kept-layer subsets to choose among: spread over the depth, every other from the top and from the
    bottom, and the lowest ``keep`` layers."""
    if not 0 < keep < total:
        raise ConfigError(f"a student keeps 1 to {total - 1} of the teacher's {total} layers; got {keep}")
    spread = sorted({round(i * (total - 1) / max(keep - 1, 1)) for i in range(keep)}) if keep > 1 else [total - 1]
    top = sorted(total - 1 - 2 * i for i in range(keep)) if 2 * keep <= total + 1 else None
    bottom = [2 * i for i in range(keep)] if 2 * keep - 1 <= total - 1 else None
    out: list[list[int]] = []
    for c in (spread, top, bottom, list(range(keep))):
        if c is not None and len(c) == keep and min(c) >= 0 and c not in out:
            out.append(c)
    return out


def learning_rate_factor(schedule: Schedule, step: int, total: int) -> float:
    """The share of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, round(WARMUP * total))
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / (total - warmup + 1))


def token_loss(got, mask, targets):
    """Mean over the real tokens (``mask`` 1) of 1 - cosine between ``got`` [batch, length, dim] and the teacher's
    states of each text (``targets``: one [its length, dim] tensor a text, padding cut off)."""
    import torch

    target = torch.zeros_like(got)
    for row, t in enumerate(targets):
        target[row, :len(t)] = t.to(got.device, got.dtype)
    cos = torch.nn.functional.cosine_similarity(got, target, dim=2)
    return ((1 - cos) * mask).sum() / mask.sum()


def span_positions(titles: list[str]) -> int:
    """Where a span of ``SPAN_WORDS`` words can start and end in the titles: the most spans drawn from them.
    Without the cap a small catalog was padded up to ``max_texts`` with repeats: 400 synthetic titles (5,902
    places) made 29,400 spans, 2,935 of them distinct, 5 minutes a distillation on 2 cores."""
    lo, hi = SPAN_WORDS
    return sum(max(0, words - k + 1) for words in (len(t.split()) for t in titles) for k in range(lo, hi + 1))


def _texts(data: SearchData, settings: DistillSettings) -> tuple[list[str], list[str]]:
    """(training texts, validation texts), seeded.

    Validation: a fifth of the tuning queries (at most ``MAX_VALIDATION``), never trained on. A query encoder is
    judged on queries, and titles make a misleading measure: a title's own embedding is in the catalog, so its
    neighbours are easy to agree on (on Home Depot, validation on nine-tenths titles read 0.82 top-10 agreement
    for a student whose held-out overlap was 0.699; on queries it read 0.74 for one that held out at 0.724).
    Training, ``max_texts`` at most: the other tuning queries first, then the catalog's titles and as many
    query-like spans of titles (``SPAN_WORDS`` consecutive words; no more of them than the titles have places
    for, :func:`span_positions`), so the student learns both the short, partial texts queries are and the titles
    they are matched against."""
    rng = random.Random(settings.seed)
    tuning, _ = data.split(held_out=False)
    queries = sorted(set(tuning))
    if len(queries) < 2:
        raise DataError(f"distillation needs at least 2 distinct tuning queries (one to validate on); "
                        f"the data has {len(queries)}")
    rng.shuffle(queries)
    n_val = min(MAX_VALIDATION, max(1, len(queries) // 5))
    val, train = queries[:n_val], queries[n_val:settings.max_texts + n_val]
    titles = sorted(set(data.titles) - set(val))
    rng.shuffle(titles)
    room = settings.max_texts - len(train)
    train += titles[:(room + 1) // 2]
    lo, hi = SPAN_WORDS
    for _ in range(min(settings.max_texts - len(train), span_positions(titles))):
        words = rng.choice(titles).split()
        k = rng.randint(min(lo, len(words)), min(hi, len(words)))
        i = rng.randint(0, len(words) - k)
        train.append(" ".join(words[i:i + k]))
    rng.shuffle(train)
    return train, val


def distill_encoder(out: Path, data: SearchData, teacher: Path | None = None, settings: DistillSettings | None = None,
                    *, force: bool = False, progress: Callable[[str], None] = lambda _: None
                    ) -> tuple[ExportResult, DistillReport]:
    """Distill the teacher (the packaged encoder by default) into a student on ``data``'s tuning texts and export
    it to ``out`` (see the module's docstring)."""
    import torch

    s = settings or DistillSettings()
    check_out(out, force, FILES, "recserve encoder distill")
    teacher_dir = Path(teacher) if teacher is not None else packaged_model_dir()
    device = s.device or ("cuda" if torch.cuda.is_available() else "cpu")
    st = load_sentence_transformer(teacher_dir).to(device)
    total = int(st[0].auto_model.config.num_hidden_layers)
    candidates = layer_candidates(total, s.layers)
    train, val = _texts(data, s)
    torch.manual_seed(s.seed)
    limit = st.max_seq_length
    st.max_seq_length = TRAIN_SEQ_LENGTH
    progress(f"teacher embeddings of {len(train) + len(val):,} texts (on {device})")
    with torch.no_grad():
        target_train = st.encode(train, batch_size=128, convert_to_tensor=True)
        tokens_train = ([t.half() for t in st.encode(train, batch_size=128, output_value="token_embeddings")]
                        if s.token_weight > 0 else None)
        target_val = st.encode(val, batch_size=128, convert_to_tensor=True)
        catalog = None
        if s.ranking_weight > 0:
            progress(f"teacher embeddings of {len(data.titles):,} catalog titles")
            catalog = torch.nn.functional.normalize(
                st.encode(list(data.titles), batch_size=128, convert_to_tensor=True), dim=1)
            val_top = (target_val @ catalog.T).topk(TOP, dim=1).indices

    def student_with(kept: list[int]):
        student = copy.deepcopy(st)
        bert = student[0].auto_model
        bert.encoder.layer = torch.nn.ModuleList([bert.encoder.layer[i] for i in kept])
        bert.config.num_hidden_layers = len(kept)
        return student

    def agreement(student, ranking: bool = True) -> float:
        student.eval()
        with torch.no_grad():
            got = student.encode(val, batch_size=128, convert_to_tensor=True)
            if catalog is None or not ranking:
                return float(torch.nn.functional.cosine_similarity(got, target_val).mean())
            top = (torch.nn.functional.normalize(got, dim=1) @ catalog.T).topk(TOP, dim=1).indices
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, val_top)) / (TOP * len(val))

    def ranking_loss(got, target):
        log_s = torch.log_softmax(got @ catalog.T / s.temperature, dim=1)
        log_t = torch.log_softmax(target @ catalog.T / s.temperature, dim=1)
        return torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="batchmean")

    scores = {",".join(map(str, c)): agreement(student_with(c), ranking=False) for c in candidates}
    kept = [int(i) for i in max(scores, key=scores.get).split(",")]
    report = DistillReport(kept, scores, train_texts=len(train), validation_texts=len(val))
    student = student_with(kept)
    optimizer = torch.optim.AdamW(student.parameters(), lr=s.learning_rate)
    steps = s.epochs * -(-len(train) // s.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: learning_rate_factor(s.schedule, i, steps))
    best, best_state = agreement(student), copy.deepcopy(student.state_dict())
    report.start = best
    order = list(range(len(train)))
    rng = random.Random(s.seed)
    for epoch in range(1, s.epochs + 1):
        student.train()
        rng.shuffle(order)
        for start in range(0, len(order), s.batch_size):
            idx = order[start:start + s.batch_size]
            features = {k: v.to(device) if hasattr(v, "to") else v
                        for k, v in student.preprocess([train[i] for i in idx]).items()}
            features = student(features)
            got = torch.nn.functional.normalize(features["sentence_embedding"], dim=1)
            loss = torch.nn.functional.mse_loss(got, target_train[idx])
            if catalog is not None:
                loss = loss + s.ranking_weight * ranking_loss(got, target_train[idx])
            if tokens_train is not None:
                loss = loss + s.token_weight * token_loss(features["token_embeddings"], features["attention_mask"],
                                                          [tokens_train[i] for i in idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        cos = agreement(student)
        report.epochs.append(cos)
        progress(f"epoch {epoch}: validation {'cosine' if catalog is None else 'top-10 agreement'} "
                 f"with the teacher {cos:.4f}")
        if cos > best:
            best, best_state, report.best_epoch = cos, copy.deepcopy(student.state_dict()), epoch
    student.load_state_dict(best_state)
    student.to("cpu")
    student.max_seq_length = limit
    with tempfile.TemporaryDirectory() as tmp:
        student.save(tmp)
        result = export_encoder(out, Path(tmp), force=force, command="recserve encoder distill",
                                source=PACKAGED if teacher is None else str(teacher_dir.resolve()),
                                compression=(f"distill: {len(kept)} of {total} layers (kept {kept}), "
                                             f"epoch {report.best_epoch} of {s.epochs}",))
    return result, report
