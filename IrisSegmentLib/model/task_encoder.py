"""Task encoding: turn one reference's features and class masks into per-class task tokens.

Per class and per coarse level, two branches (Iris, Gao et al. 2025):
- foreground token: the feature map upsampled to input resolution, averaged inside the mask;
- context tokens: m learnable queries attending to features fused with the mask at a
  PixelShuffle-raised resolution.
All classes of a reference share its encoder features; only pooling and attention run per class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLP, Attention
from .config import IrisConfig


def pixel_shuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """(B, C*r^3, D, H, W) -> (B, C, D*r, H*r, W*r)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c // r**3, r, r, r, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c // r**3, d * r, h * r, w * r)


def pixel_unshuffle_3d(x: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of pixel_shuffle_3d."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // r, r, h // r, r, w // r, r)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * r**3, d // r, h // r, w // r)


def _linear_upsampling_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in): the weights 1-D linear upsampling (align_corners=False) gives each input."""
    eye = torch.eye(size_in, dtype=like.dtype, device=like.device)[None]
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[0].T


def upsampling_adjoint(masks: torch.Tensor, feature_size: tuple[int, ...]) -> torch.Tensor:
    """Weights w at feature resolution with sum(up(F) * m) == sum(F * w) for trilinear upsampling `up`.

    Pooling the upsampled feature map inside a full-resolution mask keeps small structures
    (the paper's high-resolution foreground pooling) but materialising C channels at input
    resolution costs gigabytes; the adjoint gives the identical sum at feature resolution.
    Trilinear upsampling is a product of one linear map per axis, so its adjoint is three small
    matrix products.
    """
    uz, uy, ux = (_linear_upsampling_matrix(n, size, masks) for n, size in zip(feature_size, masks.shape[2:]))
    weights = masks @ ux
    weights = torch.einsum("bkdhw,hH->bkdHw", weights, uy)
    return torch.einsum("bkdhw,dD->bkDhw", weights, uz)


class ContextBlock(nn.Module):
    """Self-attention, cross-attention to the masked features, self-attention, MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self1 = Attention(dim, heads)
        self.cross = Attention(dim, heads)
        self.self2 = Attention(dim, heads)
        self.mlp = MLP(dim, 2 * dim)

    def forward(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.self2(self.cross(self.self1(tokens), features)))


class LevelTaskEncoder(nn.Module):
    """Both branches for one encoder level of `channels` channels."""

    def __init__(self, channels: int, config: IrisConfig) -> None:
        super().__init__()
        r = config.pixel_shuffle
        if channels % r**3:
            raise ValueError(f"{channels} channels cannot be pixel-shuffled by {r}")
        self.r = r
        fine = channels // r**3
        self.fuse = nn.Sequential(
            nn.Conv3d(fine + 1, fine, 3, padding=1), nn.InstanceNorm3d(fine, affine=True), nn.LeakyReLU(0.01)
        )
        self.to_fg = nn.Linear(channels, config.token_dim)
        self.to_ctx = nn.Linear(channels, config.token_dim)
        self.queries = nn.Parameter(torch.randn(config.context_tokens, config.token_dim) * 0.02)
        self.inside = nn.Parameter(torch.randn(config.token_dim) * 0.02)
        self.blocks = nn.ModuleList(ContextBlock(config.token_dim, config.attention_heads) for _ in range(config.context_blocks))

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """features (B, C, d, h, w), masks (B, K, D, H, W) in {0, 1} -> tokens (B, K, 1 + m, token_dim)."""
        b, c = features.shape[:2]
        k = masks.shape[1]
        size = features.shape[2:]
        # Foreground branch.
        weights = upsampling_adjoint(masks, tuple(size))
        area = masks.flatten(2).sum(-1).clamp_min(1.0)
        fg = torch.einsum("bcdhw,bkdhw->bkc", features, weights) / area[..., None]
        fg = self.to_fg(fg)[:, :, None]
        # Context branch: features at r-times the resolution, fused with the mask there.
        fine = pixel_shuffle_3d(features, self.r)
        fine = fine[:, None].expand(b, k, *fine.shape[1:]).reshape(b * k, *fine.shape[1:])
        small_mask = F.adaptive_avg_pool3d(masks.reshape(b * k, 1, *masks.shape[2:]), fine.shape[2:])
        fused = pixel_unshuffle_3d(self.fuse(torch.cat([fine, small_mask], 1)), self.r)
        fused = fused + features[:, None].expand(b, k, *features.shape[1:]).reshape(b * k, c, *size)
        # The class's mask is marked on the keys and its foreground token seeds the queries: without
        # both, attention over the whole reference learns to ignore the mask and every class's
        # context tokens come out the same.
        inside = F.avg_pool3d(small_mask, self.r).flatten(1)  # the mask fraction of each feature voxel
        keys = self.to_ctx(fused.flatten(2).transpose(1, 2)) + inside[..., None] * self.inside
        tokens = self.queries[None] + fg.reshape(b * k, 1, -1)
        for block in self.blocks:
            tokens = block(tokens, keys)
        return torch.cat([fg, tokens.reshape(b, k, *tokens.shape[1:])], 2)


class TaskEncoder(nn.Module):
    def __init__(self, config: IrisConfig) -> None:
        super().__init__()
        self.levels = config.task_levels
        coarse = config.channels[-config.task_levels :]
        self.encoders = nn.ModuleList(LevelTaskEncoder(c, config) for c in reversed(coarse))

    def forward(self, features: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """Encoder features (finest first) and masks (B, K, D, H, W) -> (B, K, T, token_dim), coarsest level first."""
        coarse = features[::-1][: self.levels]
        return torch.cat([enc(f, masks) for enc, f in zip(self.encoders, coarse)], 2)
