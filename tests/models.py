"""Tiny modules, each reproducing one real edge case. Importable by workers too."""

from __future__ import annotations

import torch
from torch import nn


class TinyLM(nn.Module):
    """Tied embedding/head, a non-persistent buffer computed in __init__, a persistent one."""

    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim)) for _ in range(layers)
        )
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer(
            "inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), persistent=False
        )
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, ids):
        x = self.embed(ids) * self.scale
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def build_tiny() -> TinyLM:
    return TinyLM()


def trained_tiny(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    m = TinyLM()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
        m.scale.fill_(0.25)
    return m
