"""Shared helpers and fixtures for the engine tests (model, predictor, bad input, CLI).

Kept out of conftest.py (which may hold Slicer scene fixtures): test modules import what they use,
e.g. `from engine_fixtures import model, predictor  # noqa: F401` makes those fixtures available.

Everything is sized to run in seconds on one CPU thread: a small random network
(channels 8..64, 64-voxel working cube) and the 35x51x35 hippocampus crops of the shared data.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from IrisSegmentLib.model.config import IrisConfig
from IrisSegmentLib.model.iris import IrisModel
from IrisSegmentLib.volume import Volume
from support import DATA, make_affine, require_paths, rotation

HIPPOCAMPUS = DATA / "Hippocampus_MRI"
CASES = ("001", "003", "004", "007")  # small (about 35x51x35 at 1 mm), labels 1 and 2
CLASS_NAMES = {1: "hippocampus_anterior", 2: "hippocampus_posterior"}  # from the dataset's dataset.json

SMALL = dict(channels=(8, 16, 32, 64), token_dim=32, context_tokens=4, working_size=64)


def small_config(**overrides) -> IrisConfig:
    return IrisConfig(**{**SMALL, **overrides})


def random_model(seed: int = 0, **overrides) -> IrisModel:
    """The small network with weights drawn after torch.manual_seed(seed), in eval mode."""
    torch.manual_seed(seed)
    return IrisModel(small_config(**overrides)).eval()


def image_path(case: str) -> Path:
    return HIPPOCAMPUS / "imagesTr" / f"hippocampus_{case}_0000.nii.gz"


def labels_path(case: str) -> Path:
    return HIPPOCAMPUS / "labelsTr" / f"hippocampus_{case}.nii.gz"


def require_data() -> None:
    """Skip the running test unless the image and label map of every case in CASES are there."""
    require_paths(*(path(c) for c in CASES for path in (image_path, labels_path)))


@functools.lru_cache(maxsize=None)
def _read_case(case: str) -> tuple[Volume, Volume]:
    from IrisSegmentLib.io import read_image, read_label_map

    return read_image(image_path(case)), read_label_map(labels_path(case))


def case(number: str) -> tuple[Volume, Volume]:
    """(image, label map) of a hippocampus case as read by IrisSegmentLib.io; a fresh copy each call."""
    require_data()
    return copy.deepcopy(_read_case(number))


# Geometries a target can come with; the image content stays the same array.
AFFINES = {
    "oblique": make_affine(rotation(2, 30) @ rotation(0, -20), (1.0, 1.0, 1.0), (12.3, -45.6, 78.9)),
    "anisotropic": make_affine(np.eye(3), (0.8, 1.0, 2.5), (-20.0, 5.0, 3.0)),
    "flipped": make_affine(np.diag([-1.0, 1.0, -1.0]), (1.0, 1.2, 1.0), (5.0, 5.0, 5.0)),  # negative determinant
    "oblique_anisotropic_mirrored": make_affine(rotation(1, 25) @ rotation(2, -40) @ np.diag([1.0, -1.0, 1.0]), (0.9, 1.4, 2.0), (1.0, 2.0, 3.0)),
    "permuted": make_affine(np.array([[0.0, 0, -1], [-1, 0, 0], [0, 1, 0]]), (1.0, 0.7, 1.5), (90.0, 120.5, -60.0)),
}


def dice(a: np.ndarray, b: np.ndarray, value: int) -> float:
    x, y = a == value, b == value
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


class CallCounter:
    """Counts forward calls of a module (and keeps the shapes of its first input and output)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.inputs: list = []
        self.outputs: list = []
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.calls += 1
        self.inputs.append(args)
        self.outputs.append(output)

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "CallCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model() -> IrisModel:
    """The small random model (seed 0), shared by a module's tests: nothing may change its weights."""
    return random_model(0)


@pytest.fixture
def predictor(model):
    """A fresh predictor (counters at zero) on the shared model."""
    from IrisSegmentLib.inference.predictor import IrisPredictor

    return IrisPredictor(model)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """The small random model saved with save_model (float16 safetensors + config)."""
    from IrisSegmentLib.model.weights import save_model

    path = tmp_path_factory.mktemp("weights") / "small.safetensors"
    save_model(random_model(0), path, provenance={"purpose": "tests", "trained": "no (random)"})
    return path


@pytest.fixture
def quick_reference_fit(monkeypatch):
    """The command line fits each reference's poorly followed classes to it by default (40 steps); the random
    test network follows none, so every reference is fitted: 2 steps keep that default path, quickly."""
    from IrisSegmentLib import cli

    monkeypatch.setattr(cli, "REFERENCE_FIT_STEPS", 2)
