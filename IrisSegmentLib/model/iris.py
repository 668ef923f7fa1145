"""The Iris network: encode references once into task tokens, decode any number of targets."""
from __future__ import annotations

import torch
from torch import nn

from .config import IrisConfig
from .decoder import MaskDecoder
from .encoder import Encoder
from .task_encoder import TaskEncoder


class IrisModel(nn.Module):
    def __init__(self, config: IrisConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.task_encoder = TaskEncoder(config)
        self.decoder = MaskDecoder(config)
        # Memory bank: one task embedding per class seen in training (EMA), indexed like config.memory_classes.
        # Set by load_model: which weights these are (task embeddings record it) and where they came from.
        self.model_id = ""
        self.provenance: dict = {}
        self.weights_path = None
        self.register_buffer(
            "memory_bank", torch.zeros(len(config.memory_classes), config.tokens_per_class, config.token_dim)
        )

    def encode_task(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image (B, 1, D, H, W), masks (B, K, D, H, W) -> task tokens (B, K, T, token_dim)."""
        self._check_size(image)
        return self.task_encoder(self.encoder(image), masks.to(image.dtype))

    def segment(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """image (B, 1, D, H, W), tokens (B, K, T, token_dim) -> logits (B, K, D, H, W)."""
        self._check_size(image)
        return self.decoder(self.encoder(image), tokens, tuple(image.shape[2:]))

    def forward(self, reference: torch.Tensor, reference_masks: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One training episode: (target logits, reference task tokens)."""
        tokens = self.encode_task(reference, reference_masks)
        return self.segment(target, tokens), tokens

    def _check_size(self, image: torch.Tensor) -> None:
        if image.ndim != 5 or any(s % self.config.total_stride for s in image.shape[2:]):
            raise ValueError(f"input must be (B, C, D, H, W) with sizes divisible by {self.config.total_stride}, got {tuple(image.shape)}")
