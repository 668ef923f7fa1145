"""3D residual UNet encoder shared by references and targets."""
from __future__ import annotations

import torch
from torch import nn

from .config import IrisConfig


def conv_norm_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with a skip; a 1x1x1 projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_norm_act(cin, cout, stride)
        self.conv2 = nn.Sequential(
            nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.InstanceNorm3d(cout, affine=True)
        )
        self.skip = (
            nn.Identity()
            if cin == cout and stride == 1
            else nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.InstanceNorm3d(cout, affine=True))
        )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.skip(x))


class Encoder(nn.Module):
    """Strided stem (early downsampling keeps CPU cost low), then one stage per entry of `channels`.

    Returns the feature maps of every stage, finest first (strides stem, 2*stem, 4*stem, ...).
    """

    def __init__(self, config: IrisConfig) -> None:
        super().__init__()
        ch = config.channels
        self.stem = conv_norm_act(config.in_channels, ch[0], stride=config.stem_stride)
        self.stages = nn.ModuleList()
        for i, c in enumerate(ch):
            cin = ch[0] if i == 0 else ch[i - 1]
            blocks = [ResidualBlock(cin, c, stride=1 if i == 0 else 2)]
            blocks += [ResidualBlock(c, c) for _ in range(config.blocks_per_stage - 1)]
            self.stages.append(nn.Sequential(*blocks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
