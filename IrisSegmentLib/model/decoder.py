"""Mask decoder: every class's task tokens and the target's features, K logit maps in one pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLP, Attention
from .config import IrisConfig
from .encoder import ResidualBlock


class TwoWayBlock(nn.Module):
    """Tokens attend to the image, the image attends to the tokens, then the tokens to each other."""

    def __init__(self, channels: int, config: IrisConfig) -> None:
        super().__init__()
        dim = config.token_dim
        self.to_tokens_space = nn.Linear(channels, dim)
        self.tokens_from_image = Attention(dim, config.attention_heads)
        self.image_from_tokens = Attention(dim, config.attention_heads)
        self.tokens_self = Attention(dim, config.attention_heads)
        self.token_mlp = MLP(dim, 2 * dim)
        self.back = nn.Linear(dim, channels)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, *size = image.shape
        flat = self.to_tokens_space(image.flatten(2).transpose(1, 2))
        tokens = self.tokens_from_image(tokens, flat)
        flat = self.image_from_tokens(flat, tokens, padding)
        tokens = self.token_mlp(self.tokens_self(tokens, ignore=padding))
        image = image + self.back(flat).transpose(1, 2).reshape(b, c, *size)
        return image, tokens


class MaskDecoder(nn.Module):
    """UNet decoder over the target features; two-way attention at the coarsest levels.

    Skips are added, not concatenated: the finest stage dominates a target's cost, and adding
    halves its input channels.

    Each class's tokens become, through a small MLP, a weight vector and bias dotted with the
    finest feature map: one logit map per class, all classes in the same pass.
    """

    def __init__(self, config: IrisConfig) -> None:
        super().__init__()
        ch = config.channels
        if not 1 <= config.decoder_attention_levels <= config.task_levels:
            raise ValueError("decoder_attention_levels must be between 1 and task_levels")
        self.attention_levels = config.decoder_attention_levels
        self.slot_embedding = nn.Parameter(torch.randn(config.tokens_per_class, config.token_dim) * 0.02)
        self.two_way = nn.ModuleList(TwoWayBlock(ch[-1 - i], config) for i in range(self.attention_levels))
        self.up = nn.ModuleList(nn.ConvTranspose3d(ch[i], ch[i - 1], 2, stride=2) for i in range(len(ch) - 1, 0, -1))
        self.merge = nn.ModuleList(ResidualBlock(ch[i - 1], ch[i - 1]) for i in range(len(ch) - 1, 0, -1))
        self.to_weights = MLP(config.token_dim, config.token_dim, ch[0] + 1, residual=False)

    def forward(
        self, features: list[torch.Tensor], tokens: torch.Tensor, output_size: tuple[int, ...], classes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """features: target encoder maps (finest first, batch B); tokens (B, K, T, D) -> logits (B, K, *output_size).

        `classes` (B, K) bool marks real classes when a batch pads its episodes to one K: padded
        classes' tokens are never attended to, so they change nothing for the real ones.
        """
        b, k, t, d = tokens.shape
        flat_tokens = (tokens + self.slot_embedding).reshape(b, k * t, d)
        padding = None if classes is None else ~classes[:, :, None].expand(b, k, t).reshape(b, k * t)
        x = features[-1]
        skips = features[-2::-1]
        for level in range(len(features)):
            if level < self.attention_levels:
                x, flat_tokens = self.two_way[level](x, flat_tokens, padding)
            if level < len(skips):
                x = self.merge[level](self.up[level](x) + skips[level])
        params = self.to_weights(flat_tokens.reshape(b, k, t, d).mean(2))
        logits = torch.einsum("bkc,bcdhw->bkdhw", params[..., :-1], x) + params[..., -1, None, None, None]
        # Upsampling logits equals dotting the weights with upsampled features (both are linear).
        return F.interpolate(logits, size=output_size, mode="trilinear", align_corners=False)
