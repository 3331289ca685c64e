"""Dataset readers: ``load_dataset(spec)`` -> :class:`Dataset` (ranking rows, retrieval pairs, preprocessing)."""

from recserve.data.schema import (
    OOV_ID,
    Dataset,
    DenseTransform,
    RankingData,
    RetrievalData,
    SparseFeature,
    Vocabulary,
    load_preprocessing,
)
from recserve.data.spec import VALID_FORMS, load_dataset, parse_spec

__all__ = [
    "OOV_ID",
    "VALID_FORMS",
    "Dataset",
    "DenseTransform",
    "RankingData",
    "RetrievalData",
    "SparseFeature",
    "Vocabulary",
    "load_dataset",
    "load_preprocessing",
    "parse_spec",
]
