"""Attention blocks shared by the task encoder and the mask decoder."""
from __future__ import annotations

import torch
from torch import nn


class Attention(nn.Module):
    """Pre-norm multi-head attention with a residual: queries attend to `context`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, queries: torch.Tensor, context: torch.Tensor | None = None, ignore: torch.Tensor | None = None) -> torch.Tensor:
        """`ignore` (B, keys) marks keys no query may attend to (padding)."""
        q = self.norm_q(queries)
        kv = q if context is None else self.norm_kv(context)
        out, _ = self.attn(q, kv, kv, key_padding_mask=ignore, need_weights=False)
        return queries + out


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual and out in (None, dim)
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x) if self.residual else self.net(x)
