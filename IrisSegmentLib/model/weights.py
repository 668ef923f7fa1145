"""Save and load model weights (safetensors + JSON metadata) with checks a user can act on."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import WeightsError
from .config import IrisConfig
from .iris import IrisModel
from .serialization import load_tensors, save_tensors

FORMAT = "iris-segment-weights"
FORMAT_VERSION = "1"
DEFAULT_WEIGHTS_NAME = "iris_segment_cpu.safetensors"
ENV_WEIGHTS = "IRIS_SEGMENT_WEIGHTS"


def default_weights_path() -> Path:
    """$IRIS_SEGMENT_WEIGHTS, else the bundled file: Resources/ of the source tree, or the copy
    installed inside the package by the Slicer build."""
    if os.environ.get(ENV_WEIGHTS):
        return Path(os.environ[ENV_WEIGHTS])
    package = Path(__file__).resolve().parents[1]
    candidates = [package.parent / "Resources" / DEFAULT_WEIGHTS_NAME, package / "Resources" / DEFAULT_WEIGHTS_NAME]
    return next((p for p in candidates if p.is_file()), candidates[0])


def save_model(model: IrisModel, path: str | Path, provenance: dict | None = None) -> None:
    """Weights in float16 (half the size, no measurable change in output) plus config and provenance."""
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_json(),
        "architecture_id": model.config.architecture_id(),
        "provenance": json.dumps(provenance or {}, sort_keys=True),
    }
    save_tensors(path, state, metadata)


def model_id_of(state: dict[str, torch.Tensor], config: IrisConfig) -> str:
    """Identifies the exact weights: task embeddings are only valid for the model that made them."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return f"{config.architecture_id()}-{digest.hexdigest()[:12]}"


def load_model(weights: str | Path | None = None, device: str | torch.device = "auto") -> IrisModel:
    """Build the network from a weights file's own config and load it, on `device`, in eval mode."""
    path = Path(weights) if weights else default_weights_path()
    if not path.is_file():
        raise WeightsError(
            f"model weights not found at {path}. Pass a weights file (--weights / the Model field) "
            f"or set {ENV_WEIGHTS}; the bundled file is Resources/{DEFAULT_WEIGHTS_NAME}."
        )
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not an IrisSegment weights file (format {meta.get('format')!r}).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path}: weights format version {meta.get('format_version')} is not supported by this IrisSegment; update IrisSegment.")
    try:
        config = IrisConfig.from_json(meta["config"])
        model = IrisModel(config)
        expected = model.state_dict()
        if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
            raise ValueError("its tensors do not match the architecture its config describes")
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightsError(f"{path}: the weights do not fit their model settings ({exc}); the file is corrupt or from another model.") from None
    if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise WeightsError(f"{path}: the weights hold NaN or infinite values; the file is corrupt.")
    model.model_id = model_id_of(tensors, config)
    model.provenance = json.loads(meta.get("provenance", "{}"))
    model.weights_path = path
    model.eval()
    return model.to(resolve_device(device) if isinstance(device, str) else device)
