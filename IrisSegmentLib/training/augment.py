"""Augmentation for episodic training: spatial (composed into resampling), intensity, slice thickness, synthesis."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    GaussianSmooth,
    RandAdjustContrast,
    RandBiasField,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandScaleIntensity,
    RandShiftIntensity,
)
from monai.transforms.utils import create_rotate, create_scale, create_translate


def random_world_transform(center: np.ndarray, rng: np.random.Generator, degrees: float = 10.0, scale: float = 0.1) -> np.ndarray:
    """RAS -> RAS rotation (+-degrees per axis) and anisotropic scaling about `center` (Iris recipe)."""
    rotate = create_rotate(3, tuple(np.deg2rad(rng.uniform(-degrees, degrees, 3))))
    stretch = create_scale(3, tuple(rng.uniform(1 - scale, 1 + scale, 3)))
    return create_translate(3, tuple(center)) @ rotate @ stretch @ create_translate(3, tuple(-np.asarray(center)))


class IntensityAugment:
    """Brightness, contrast (gamma), blur, noise and bias field, each at random, with a seed per call
    so an episode is reproducible from the step number alone (exact resume)."""

    def __init__(self) -> None:
        self.transforms = Compose([
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.1, prob=0.5),
            RandAdjustContrast(gamma=(0.8, 1.2), prob=0.3, retain_stats=True),
            RandGaussianSmooth(sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.2),
            RandBiasField(coeff_range=(0.0, 0.2), prob=0.3),
            RandGaussianNoise(std=0.05, prob=0.3),
        ])

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        self.transforms.set_random_state(seed=seed)
        out = self.transforms(image)
        return torch.as_tensor(out, dtype=torch.float32)


def thick_slices(image: torch.Tensor, axis: int, factor: int) -> torch.Tensor:
    """`image` (C, I, J, K) as a scan with `factor` times thicker slices along voxel `axis` would show it:
    averaged over slabs of `factor` voxels there, then interpolated back onto the same grid."""
    kernel = [1, 1, 1]
    kernel[axis] = factor
    pooled = F.avg_pool3d(image[None], kernel, ceil_mode=True)
    return F.interpolate(pooled, size=image.shape[1:], mode="trilinear", align_corners=False)[0]


class SliceThickness:
    """Now and then, thick slices along one random axis (RandomAnisotropy in TorchIO's terms), drawn
    afresh for each image, so a reference and its query can be acquired across each other.

    Clinical MR stacks are 2-5 times thicker across their slices than within them, and the slice
    direction changes from stack to stack (the fetal stacks of ../shared/data are acquired axial,
    coronal and sagittal). Resampled onto an isotropic working grid, the same brain is then blurred
    along a different axis in the reference than in the target; without this, the real scans of
    training show that only as their sets happen to (the CT and most MR sets one direction)."""

    def __init__(self, probability: float = 0.25, factors: tuple[int, int] = (2, 5)) -> None:
        self.probability, self.factors = probability, factors

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        if rng.random() >= self.probability:
            return image
        return thick_slices(image, int(rng.integers(3)), int(rng.integers(*self.factors)))


class LabelSynthesizer:
    """SynthSeg-style image from a label map: a Gaussian intensity per label, blur, bias field,
    lower resolution and noise, then z-scored like a real scan."""

    def __init__(self) -> None:
        self.bias = RandBiasField(coeff_range=(0.0, 0.3), prob=1.0)

    @staticmethod
    def draw_table(rng: np.random.Generator, max_label: int = 1024) -> np.ndarray:
        """Mean and standard deviation per label value; shared by a reference and its query."""
        means = rng.uniform(0, 1, max_label)
        stds = rng.uniform(0.01, 0.1, max_label)
        return np.stack([means, stds], 1).astype(np.float32)

    def __call__(self, labels: torch.Tensor, table: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        lab = labels.long().clamp(0, len(table) - 1)
        means = torch.from_numpy(table[:, 0] * rng.uniform(0.95, 1.05))
        stds = torch.from_numpy(table[:, 1])
        image = means[lab] + stds[lab] * torch.from_numpy(rng.standard_normal(lab.shape).astype(np.float32))
        sigma = rng.uniform(0.3, 1.2)
        image = torch.as_tensor(GaussianSmooth(sigma=sigma)(image), dtype=torch.float32)
        if rng.random() < 0.3:  # low-resolution acquisition (thick slices come after, per image: SliceThickness)
            factor = int(rng.integers(2, 4))
            size = image.shape[1:]
            image = F.interpolate(F.avg_pool3d(image[None], factor, ceil_mode=True), size=size, mode="trilinear", align_corners=False)[0]
        self.bias.set_random_state(seed=int(rng.integers(2**31)))
        image = torch.as_tensor(self.bias(image), dtype=torch.float32)
        image = image + 0.02 * torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
        return (image - image.mean()) / image.std().clamp_min(1e-6)
