"""The Iris network: encode references once into task tokens, decode any number of targets."""
from __future__ import annotations

import torch
from torch import nn

from .config import IrisConfig
from .decoder import MaskDecoder
from .encoder import Encoder
from .task_encoder import TaskEncoder


# Classes whose task tokens are computed together by encode_task. The task encoder treats every class on
# its own, but holds several full-size tensors per class: all 27 classes of a 128^3 reference at once
# took 3.5 GB, 125 classes 14 GB (and 343 ran out of memory), while the tokens are the same in chunks.
TASK_CLASSES_PER_PASS = 8


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
        """image (B, 1, D, H, W), masks (B, K, D, H, W) -> task tokens (B, K, T, token_dim): one encoder pass,
        then the task encoder on TASK_CLASSES_PER_PASS classes at a time, so memory does not grow with K."""
        self._check_size(image)
        return self.task_tokens(self.encoder(image), masks)

    def task_tokens(self, features: list[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
        """`encode_task` from the encoder's features of the image, for a caller that uses them again."""
        masks = masks.to(features[0].dtype)
        return torch.cat([self.task_encoder(features, masks[:, start:start + TASK_CLASSES_PER_PASS])
                          for start in range(0, masks.shape[1], TASK_CLASSES_PER_PASS)], 1)

    def segment(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """image (B, 1, D, H, W), tokens (B, K, T, token_dim) -> logits (B, K, D, H, W)."""
        self._check_size(image)
        return self.decoder(self.encoder(image), tokens, tuple(image.shape[2:]))

    def forward(
        self, reference: torch.Tensor, reference_masks: torch.Tensor, target: torch.Tensor, classes: torch.Tensor | None = None,
        with_features: bool = False,
    ) -> tuple:
        """A batch of training episodes: (target logits, reference task tokens), and with `with_features`
        the encoder's (reference, target) feature maps too, for the matching loss.

        References and targets go through the encoder as one batch: on a CPU, batched 3D
        convolutions take oneDNN kernels that are several times faster than one volume at a time.
        `classes` (B, K) marks real classes when episodes are padded to one K.
        """
        self._check_size(reference)
        self._check_size(target)
        if reference.shape == target.shape:
            both = self.encoder(torch.cat([reference, target]))
            b = reference.shape[0]
            ref_features, target_features = [f[:b] for f in both], [f[b:] for f in both]
        else:
            ref_features, target_features = self.encoder(reference), self.encoder(target)
        tokens = self.task_encoder(ref_features, reference_masks.to(reference.dtype))
        logits = self.decoder(target_features, tokens, tuple(target.shape[2:]), classes)
        return (logits, tokens, (ref_features, target_features)) if with_features else (logits, tokens)

    def _check_size(self, image: torch.Tensor) -> None:
        if image.ndim != 5 or any(s % self.config.total_stride for s in image.shape[2:]):
            raise ValueError(f"input must be (B, C, D, H, W) with sizes divisible by {self.config.total_stride}, got {tuple(image.shape)}")
