"""A 3D scalar image or label map with its voxel-to-world geometry.

The engine works on plain arrays plus a 4x4 affine in RAS (as nibabel and Slicer's IJKToRAS
use), so the same code serves files, Slicer nodes and tests. Array axes are (i, j, k).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


@dataclass
class Volume:
    """Voxel array indexed (i, j, k) and the affine mapping (i, j, k, 1) to RAS millimetres."""

    array: np.ndarray
    affine: np.ndarray
    name: str = ""
    # For label maps: label value -> segment metadata (name, color, terminology); empty for images.
    segments: dict[int, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        what = self.name or "volume"
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise InputError(f"{what}: the geometry must be a finite 4x4 matrix, got shape {self.affine.shape}.")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-9:
            raise InputError(f"{what}: the voxel-to-world matrix is singular (zero spacing?); fix the image header.")
        array = np.asarray(self.array)
        if array.ndim == 4 and array.shape[3] == 1:
            array = array[..., 0]
        if array.ndim != 3:
            raise InputError(
                f"{what}: expected a 3D volume, got {array.ndim}D with shape {array.shape}. "
                "Give a single 3D scan (split 4D series into 3D volumes first)."
            )
        if min(array.shape) < 1:
            raise InputError(f"{what}: the volume is empty (shape {array.shape}).")
        self.array = array

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def world_corners(self) -> np.ndarray:
        """RAS positions of the 8 corner voxel centres, shape (8, 3)."""
        idx = np.array([[i, j, k] for i in (0, self.shape[0] - 1) for j in (0, self.shape[1] - 1) for k in (0, self.shape[2] - 1)], dtype=np.float64)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def same_grid(self, other: "Volume", tolerance_mm: float = 1e-3) -> bool:
        """True when both volumes have the same shape and voxel positions (to a tolerance)."""
        return self.shape == other.shape and bool(np.allclose(self.affine, other.affine, atol=tolerance_mm))

    def check_finite(self) -> None:
        if not np.all(np.isfinite(self.array)):
            bad = int(np.size(self.array) - np.count_nonzero(np.isfinite(self.array)))
            raise InputError(
                f"{self.name or 'image'}: {bad} voxels are NaN or infinite. "
                "Replace them (e.g. with the background value) before segmenting."
            )

    def check_label_map(self) -> None:
        """A label map must hold non-negative integers and match no image yet."""
        arr = self.array
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
                raise InputError(f"{self.name or 'label map'}: holds non-integer values; a label map must hold integer labels.")
        if arr.dtype.kind not in "iufb":
            raise InputError(f"{self.name or 'label map'}: unsupported voxel type {arr.dtype}.")
        if arr.size and arr.min() < 0:
            raise InputError(f"{self.name or 'label map'}: holds negative labels; labels must be 0 (background) or positive.")

    def check_matches(self, image: "Volume") -> None:
        """A label map must lie on its image's grid, voxel for voxel."""
        if self.shape != image.shape:
            raise InputError(
                f"label map {self.name!r} has shape {self.shape} but image {image.name!r} has {image.shape}: "
                "they must be on the same voxel grid. Resample the label map onto the image first."
            )
        if not np.allclose(self.affine, image.affine, atol=1e-2):
            raise InputError(
                f"label map {self.name!r} and image {image.name!r} have the same shape but different geometry "
                "(origin, spacing or direction): resample the label map onto the image first."
            )
