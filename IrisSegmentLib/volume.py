"""A 3D scalar image or label map with its voxel-to-world geometry.

The engine works on plain arrays plus a 4x4 affine in RAS (as nibabel and Slicer's IJKToRAS
use), so the same code serves files, Slicer nodes and tests. Array axes are (i, j, k).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError

FLAT_SHARE = 0.5  # share of equal neighbours between a label map (0.75 or more) and a scan (0.17 or less)
IMAGE_LIKE_LABELS = 16  # a "label map" with more labels than this and noisy voxels is a scan
LABEL_MAP_VALUES = 256  # more distinct values than this: a scan, whatever its voxels look like
_SAMPLE = 1 << 20  # voxels sampled to find a volume's most common and distinct values
_SLICES = 16  # slices per axis in which neighbours are compared


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
        if self.affine.shape != (4, 4):
            raise InputError(f"{what}: the geometry must be a 4x4 voxel-to-world matrix, got shape {self.affine.shape}.")
        if not np.all(np.isfinite(self.affine)):
            raise InputError(f"{what}: the voxel-to-world matrix (spacing, origin, directions) holds NaN or infinite values; fix the image header.")
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

    def check_voxel_type(self) -> None:
        """Intensities must be real numbers: complex, RGB (vector) and other voxel types are refused."""
        kind = self.array.dtype.kind
        what = self.name or "image"
        if kind == "c":
            raise InputError(
                f"{what}: holds complex-valued voxels ({self.array.dtype}); IrisSegment needs real intensities: "
                "save the magnitude image (for MRI, the reconstructed magnitude) and give that."
            )
        if kind == "V" or self.array.dtype.fields:
            raise InputError(
                f"{what}: holds color or vector voxels ({self.array.dtype}); IrisSegment needs a grayscale scan: "
                "convert it to a scalar volume first (Slicer: Vector to Scalar Volume module)."
            )
        if kind not in "iufb":
            raise InputError(f"{what}: unsupported voxel type {self.array.dtype}; give a scan of integer or floating-point intensities.")

    def check_image(self) -> None:
        """An image to encode or segment: real intensities, all finite."""
        self.check_voxel_type()
        self.check_finite()

    def check_finite(self) -> None:
        if self.array.dtype.kind not in "iub" and not np.all(np.isfinite(self.array)):
            bad = int(np.size(self.array) - np.count_nonzero(np.isfinite(self.array)))
            raise InputError(
                f"{self.name or 'image'}: {bad} voxels are NaN or infinite. "
                "Replace them (e.g. with the background value) before segmenting."
            )

    def looks_like_label_map(self) -> bool:
        """True for an image whose voxels look like a label map's: at most LABEL_MAP_VALUES distinct
        non-negative whole numbers, piecewise constant (most voxels off the most common value equal their
        neighbour).

        Scans carry noise. On the development data (every set, 3 scans and 3 label maps each) 75 % or more
        of a label map's voxels off its background equal their neighbour in-plane, the thin structures of
        HeadNeck included, and 17 % or fewer of a scan's off its most common value (CT padding, MR air), but
        for one CT upsampled by pixel replication (76 %, with 1,902 distinct values and negative ones)."""
        return _label_like(self.array) and _distinct_values(self.array) <= LABEL_MAP_VALUES and _flat_share(self.array) >= FLAT_SHARE

    def looks_like_image(self) -> bool:
        """True for a label map that looks like a scan (a scan given in its place): more than
        IMAGE_LIKE_LABELS labels that few voxels share with their neighbours (see looks_like_label_map).
        Many labels alone do not make a scan: an instance segmentation (cells, nuclei) holds hundreds,
        each a patch of equal voxels; how many one reference may hold is the engine's rule."""
        if not _label_like(self.array):
            return False
        return _distinct_values(self.array) > IMAGE_LIKE_LABELS and _flat_share(self.array) < FLAT_SHARE

    def describe_values(self) -> str:
        """How many distinct values the volume holds and how piecewise constant it is, for messages."""
        distinct = _distinct_values(self.array)
        return f"{distinct}{'+' if distinct > LABEL_MAP_VALUES else ''} distinct values, {100 * _flat_share(self.array):.0f} % of its voxels equal to their neighbour"

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


def _sample(array: np.ndarray) -> np.ndarray:
    return array.reshape(-1)[:: max(1, array.size // _SAMPLE)]


def _label_like(array: np.ndarray) -> bool:
    """Non-negative whole numbers, as a label map holds."""
    if array.dtype.kind not in "iufb" or array.size == 0:
        return False
    if array.dtype.kind == "f" and not (np.all(np.isfinite(array)) and np.array_equal(array, np.round(array))):
        return False
    return bool(array.min() >= 0)


def _distinct_values(array: np.ndarray) -> int:
    return len(np.unique(_sample(array)))


def _flat_share(array: np.ndarray) -> float:
    """Among voxels off the most common value, the share equal to their neighbour within a slice
    (up to _SLICES slices across each axis, both in-plane directions); 0 when every voxel has that value."""
    values, counts = np.unique(_sample(array), return_counts=True)
    background = values[np.argmax(counts)]
    equal = total = 0
    for axis in range(3):
        if array.shape[axis] == 0:
            continue
        picks = np.unique(np.linspace(0, array.shape[axis] - 1, min(_SLICES, array.shape[axis])).round().astype(int))
        slices = np.take(array, picks, axis=axis)
        for other in (a for a in range(3) if a != axis):
            moved = np.moveaxis(slices, other, 0)
            off = moved[1:] != background
            equal += int(np.count_nonzero((moved[1:] == moved[:-1]) & off))
            total += int(np.count_nonzero(off))
    return equal / total if total else 0.0
