"""Dataset specs: ``KIND[:PATH][,key=value...]`` -> the matching reader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recserve.data import criteo, interactions, movielens, synthetic, tensors
from recserve.data.schema import Dataset
from recserve.data.splits import carve_validation
from recserve.errors import DataError

VALID_FORMS = (
    "criteo:PATH|DIR|GLOB[,min_freq=N] | movielens:DIR | interactions:PATH|DIR|GLOB[,meta=PATH][,neg_ratio=N] | "
    "synthetic[:ROWS][,users=N][,items=N][,seed=N] | tensors:PATH.npz|PATH.parquet"
)
OPTIONS = {
    "criteo": {"min_freq": int},
    "movielens": {},
    "interactions": {"meta": str, "neg_ratio": int},
    "synthetic": {"users": int, "items": int, "seed": int},
    "tensors": {},
}
NEEDS_PATH = {"criteo", "movielens", "interactions", "tensors", "search"}
SEARCH_FORMS = "search:PATH[,query=COL][,title=COL][,relevance=COL][,product=COL] | synthetic[:QUERIES][,products=N][,seed=N]"
SEARCH_OPTIONS = {
    "search": {"query": str, "title": str, "relevance": str, "product": str},
    "synthetic": {"products": int, "seed": int},
}
"""What a text encoder is evaluated on (recserve/data/search.py): judged queries and product titles."""


@dataclass
class Spec:
    kind: str
    path: str | None
    options: dict[str, int | str] = field(default_factory=dict)


def _bad(spec: str, why: str, forms: str = VALID_FORMS) -> DataError:
    return DataError(f"dataset spec {spec!r}: {why}; valid forms: {forms}")


def parse_spec(spec: str, search: bool = False) -> Spec:
    """Split a spec into kind, path and typed options; DataError (listing the valid forms) on any mistake.
    ``search``: a spec of search data for a text encoder (:data:`SEARCH_OPTIONS`), not of ranking data."""
    known, forms = (SEARCH_OPTIONS, SEARCH_FORMS) if search else (OPTIONS, VALID_FORMS)
    head, *pairs = spec.strip().split(",")
    kind, _, path = head.partition(":")
    kind = kind.strip().lower()
    if kind == "search" and not search:
        raise _bad(spec, "search data (queries and titles) is for text encoders, not rankers")
    if kind not in known:
        raise _bad(spec, f"unknown kind {kind!r}", forms)
    path = path.strip() or None
    if kind in NEEDS_PATH and path is None:
        raise _bad(spec, f"{kind} needs a path ({kind}:PATH)", forms)
    if kind == "synthetic" and path is not None and not (path.isdigit() and int(path) > 0):
        unit = "query" if search else "row"
        raise _bad(spec, f"synthetic:{'QUERIES' if search else 'ROWS'} needs a positive integer {unit} count, "
                   f"got {path!r}", forms)
    options: dict[str, int | str] = {}
    for pair in pairs:
        key, eq, value = (s.strip() for s in pair.partition("="))
        if not eq or not key or not value:
            raise _bad(spec, f"option {pair!r} is not key=value")
        if key not in known[kind]:
            allowed = ", ".join(known[kind]) or "none"
            raise _bad(spec, f"unknown option {key!r} for {kind} (allowed: {allowed})", forms)
        if known[kind][key] is int:
            if not value.isdigit():
                raise _bad(spec, f"option {key}={value!r} must be a non-negative integer", forms)
            options[key] = int(value)
        else:
            options[key] = value
    return Spec(kind, path, options)


def load_dataset(
    spec: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    eval_negatives: int = 100,
    preprocessing: Path | None = None,
    validation_fraction: float = 0.1,
) -> Dataset:
    """Load the dataset a spec names; splits are deterministic given ``seed``.

    ``preprocessing``: a JSON written by :meth:`Dataset.save_preprocessing`; its vocabularies and dense
    transforms are reused instead of fitted, so ids match the model trained with it.
    For ``synthetic``, the spec's ``seed=`` draws the data (default: ``seed``), ``seed`` the split.
    Readers whose test split is random get a random validation carve of ``validation_fraction`` of
    the training rows; readers that split by time carve validation by time too.
    """
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must be between 0 and 1 (exclusive), e.g. 0.2")
    if eval_negatives < 0:
        raise DataError(f"eval_negatives={eval_negatives} must be >= 0, e.g. 100")
    s = parse_spec(spec)
    common = {"seed": seed, "preprocessing": preprocessing}
    if s.kind == "criteo":
        ds = criteo.load(Path(s.path), test_fraction=test_fraction, validation_fraction=validation_fraction,
                         **s.options, **common)
    elif s.kind == "movielens":
        ds = movielens.load(Path(s.path), test_fraction=test_fraction, eval_negatives=eval_negatives, **common)
    elif s.kind == "interactions":
        meta = s.options.get("meta")
        ds = interactions.load(
            Path(s.path),
            meta=Path(str(meta)) if meta else None,
            neg_ratio=int(s.options.get("neg_ratio", 4)),
            eval_negatives=eval_negatives,
            **common,
        )
    elif s.kind == "tensors":
        ds = tensors.load(Path(s.path), seed=seed, test_fraction=test_fraction)
    else:
        ds = synthetic.generate(
            int(s.path) if s.path else 100_000,
            users=int(s.options.get("users", 2000)),
            items=int(s.options.get("items", 5000)),
            seed=int(s.options.get("seed", seed)),
            split_seed=seed,
            test_fraction=test_fraction,
            eval_negatives=eval_negatives,
            preprocessing=preprocessing,
        )
    ds.spec = spec
    if ds.ranking_train is not None and ds.validation_index is None:
        ds.validation_index = carve_validation(len(ds.ranking_train), validation_fraction, seed)
    return ds
