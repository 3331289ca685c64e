"""The directory ``recserve train`` writes, and reading it back.

```
OUT/model.onnx          fp32 ONNX, dynamic batch (what serving and compression start from)
OUT/model.pt            PyTorch state dict (lets compression fine-tune and distill)
OUT/model.json          kind, architecture, data spec, seed, held-out metrics
OUT/preprocessing.json  vocabularies and dense transforms (raw features -> model inputs)
```
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from recserve.data.schema import Dataset
from recserve.errors import ModelError
from recserve.models.export import export_onnx
from recserve.models.ranker import Ranker, RankerConfig
from recserve.models.two_tower import TwoTower, TwoTowerConfig

KINDS = ("ranker", "two-tower")


@dataclass
class TrainedModel:
    kind: str
    config: RankerConfig | TwoTowerConfig
    module: nn.Module
    data_spec: str
    seed: int = 0
    metrics: dict = field(default_factory=dict)

    def export(self, data: Dataset) -> onnx.ModelProto:
        return export_onnx(self.module, self.kind, sample_feed(self.kind, data))

    def save(self, out: Path, data: Dataset, onnx_model: onnx.ModelProto) -> None:
        out.mkdir(parents=True, exist_ok=True)
        onnx.save(onnx_model, out / "model.onnx")
        torch.save(self.module.state_dict(), out / "model.pt")
        data.save_preprocessing(out / "preprocessing.json")
        meta = {"kind": self.kind, "config": self.config.to_json(), "data_spec": self.data_spec,
                "seed": self.seed, "metrics": self.metrics}
        (out / "model.json").write_text(json.dumps(meta, indent=2))


def build_module(kind: str, config: RankerConfig | TwoTowerConfig, seed: int | None = None) -> nn.Module:
    """A new model of ``kind``; ``seed`` draws its initial weights (without touching torch's global generator),
    so a run is repeatable from its seed alone."""
    if seed is None:
        return Ranker(config) if kind == "ranker" else TwoTower(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Ranker(config) if kind == "ranker" else TwoTower(config)


def sample_feed(kind: str, data: Dataset, n: int = 64) -> dict[str, np.ndarray]:
    """A few real training inputs, used to trace the export and check it against PyTorch."""
    if kind == "ranker":
        t = data.ranking_train
        return {"sparse": t.sparse[:n], "dense": t.dense[:n]}
    r = data.retrieval
    return {"user_sparse": r.user_table[:n], "item_sparse": r.item_table[:n]}


def is_trained_dir(path: Path) -> bool:
    return path.is_dir() and (path / "model.json").exists() and (path / "model.pt").exists()


def load_trained(path: Path) -> TrainedModel:
    """Read a ``recserve train`` output directory back into a PyTorch module."""
    try:
        meta = json.loads((path / "model.json").read_text())
        kind = meta["kind"]
        config = (RankerConfig if kind == "ranker" else TwoTowerConfig)(**meta["config"])
        module = build_module(kind, config)
        module.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    except (OSError, KeyError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ModelError(f"{path} is not a complete `recserve train` output ({e}); train again or pass model.onnx") from e
    module.eval()
    return TrainedModel(kind, config, module, meta.get("data_spec", ""), meta.get("seed", 0), meta.get("metrics", {}))
