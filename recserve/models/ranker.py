"""A ranker of the DLRM / DCN-v2 family.

One embedding table holds every categorical feature (row offsets per feature), a bottom MLP maps
the dense features to one more embedding-sized field, a stack of cross layers models feature
interactions (``x_{l+1} = x_0 * (W x_l + b) + x_l``, optionally low-rank ``W = U V``), and a top
MLP produces one logit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn


@dataclass
class RankerConfig:
    """Shape of a ranker. Everything needed to rebuild it from ``model.json``."""

    cardinalities: list[int]
    """Ids per sparse feature (OOV id 0 included)."""
    num_dense: int
    embedding_dim: int = 32
    cross_layers: int = 3
    cross_rank: int | None = None
    """None: full-rank cross layers; an int: low-rank ``U V`` with that inner size."""
    bottom_mlp: list[int] = field(default_factory=lambda: [64])
    top_mlp: list[int] = field(default_factory=lambda: [512, 256, 128])

    def to_json(self) -> dict:
        return asdict(self)


def mlp(sizes: list[int], *, last_activation: bool = True) -> nn.Sequential:
    """Linear + ReLU chain through ``sizes`` (first entry is the input width)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_activation or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def oov_clamp(ids: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """Ids outside ``[0, cardinality)`` of their feature become the OOV id 0 (never another feature's row)."""
    return torch.where((ids >= 0) & (ids < limits), ids, torch.zeros_like(ids))


class CrossLayer(nn.Module):
    def __init__(self, width: int, rank: int | None):
        super().__init__()
        if rank is None:
            self.proj = nn.Linear(width, width)
        else:
            self.proj = nn.Sequential(nn.Linear(width, rank, bias=False), nn.Linear(rank, width))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.proj(x) + x


class Ranker(nn.Module):
    """``forward(sparse int64 [B,S], dense float32 [B,D]) -> logit [B,1]``."""

    def __init__(self, config: RankerConfig):
        super().__init__()
        self.config = config
        d = config.embedding_dim
        offsets = torch.tensor([0] + list(config.cardinalities[:-1]), dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("limits", torch.tensor(config.cardinalities, dtype=torch.int64), persistent=False)
        self.embedding = nn.Embedding(sum(config.cardinalities), d)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.bottom = mlp([config.num_dense, *config.bottom_mlp, d])
        width = d * (len(config.cardinalities) + 1)
        self.cross = nn.ModuleList(CrossLayer(width, config.cross_rank) for _ in range(config.cross_layers))
        self.top = mlp([width, *config.top_mlp, 1], last_activation=False)

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(oov_clamp(sparse, self.limits) + self.offsets).flatten(1)
        x0 = torch.cat([emb, self.bottom(dense)], dim=1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.top(x)
