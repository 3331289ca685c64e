"""A two-tower retriever: a user (or query) tower and an item tower meeting in a dot product.

Each tower embeds its categorical features, runs an MLP and L2-normalizes, so the score of a
user-item pair is the cosine of their embeddings. Trained with in-batch negatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from recserve.models.ranker import mlp, oov_clamp


@dataclass
class TwoTowerConfig:
    """Shape of a two-tower retriever."""

    user_cardinalities: list[int]
    item_cardinalities: list[int]
    embedding_dim: int = 32
    tower_mlp: list[int] = field(default_factory=lambda: [256, 128])
    output_dim: int = 64
    temperature: float = 0.05
    """Softmax temperature of the in-batch loss (scores are cosines in [-1, 1])."""

    def to_json(self) -> dict:
        return asdict(self)


class Tower(nn.Module):
    def __init__(self, cardinalities: list[int], dim: int, hidden: list[int], out: int):
        super().__init__()
        offsets = torch.tensor([0] + list(cardinalities[:-1]), dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("limits", torch.tensor(cardinalities, dtype=torch.int64), persistent=False)
        self.embedding = nn.Embedding(sum(cardinalities), dim)
        nn.init.normal_(self.embedding.weight, std=0.05)
        self.mlp = mlp([dim * len(cardinalities), *hidden, out], last_activation=False)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        x = self.mlp(self.embedding(oov_clamp(sparse, self.limits) + self.offsets).flatten(1))
        return nn.functional.normalize(x, dim=1)


class TwoTower(nn.Module):
    """``forward(user_sparse [U,Fu], item_sparse [I,Fi]) -> (user_embedding [U,E], item_embedding [I,E])``."""

    def __init__(self, config: TwoTowerConfig):
        super().__init__()
        self.config = config
        self.user_tower = Tower(config.user_cardinalities, config.embedding_dim, config.tower_mlp, config.output_dim)
        self.item_tower = Tower(config.item_cardinalities, config.embedding_dim, config.tower_mlp, config.output_dim)

    def forward(self, user_sparse: torch.Tensor, item_sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_tower(user_sparse), self.item_tower(item_sparse)
