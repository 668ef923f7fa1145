"""One dataclass sets the network's size, so a CPU model and a paper-size model share the code."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class IrisConfig:
    in_channels: int = 1
    # Channels per encoder stage; stage 0 follows the strided stem, each later stage halves the size.
    channels: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_stage: int = 1
    stem_stride: int = 2
    # Task tokens are built from the `task_levels` coarsest stages (strides 16, 8 and 4 by default);
    # the decoder's two-way attention runs at the `decoder_attention_levels` coarsest of them.
    task_levels: int = 3
    decoder_attention_levels: int = 2
    context_tokens: int = 10          # m learnable query tokens per class and level
    token_dim: int = 128              # every level's tokens are projected to this width
    attention_heads: int = 4
    context_blocks: int = 2           # attention blocks in the task encoder's context branch
    pixel_shuffle: int = 2            # context branch: trade channels for resolution by this factor
    working_size: int = 128           # targets are resampled to fit this cube (voxels per side)
    # Memory bank: class names learned in training, one embedding each (EMA of training embeddings).
    memory_classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_stride(self) -> int:
        return self.stem_stride * 2 ** (len(self.channels) - 1)

    @property
    def tokens_per_class(self) -> int:
        return self.task_levels * (1 + self.context_tokens)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IrisConfig":
        raw = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}")
        for key in ("channels", "memory_classes"):
            if key in raw:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    def architecture_id(self) -> str:
        """Hash of everything that shapes the weights: embeddings from one id fit only that id."""
        arch = asdict(self)
        arch.pop("working_size")
        arch.pop("memory_classes")
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
