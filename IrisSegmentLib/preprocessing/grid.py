"""Working grids and resampling between any oriented voxel grid and an RAS-aligned isotropic one.

Every resampling is one `grid_sample` call driven by the exact voxel-to-voxel affine, so oblique,
flipped and anisotropic inputs need no separate reorientation step and the way back to the
target's original grid is the same function with the roles swapped.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# grid_sample's last axis is (x, y, z) = (k, j, i) of a (C, I, J, K) tensor.
_XYZ_TO_IJK = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.float64)


@dataclass(frozen=True)
class Grid:
    """A voxel grid: shape (I, J, K) and its 4x4 index -> RAS affine."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def rows(self, start: int, stop: int) -> "Grid":
        """The sub-grid of index rows start..stop-1 along the first axis."""
        return self.box(np.array([start, 0, 0]), np.array([stop, *self.shape[1:]]))

    def box(self, lo: np.ndarray, hi: np.ndarray) -> "Grid":
        """The sub-grid of the index box lo..hi-1."""
        shift = np.eye(4)
        shift[:3, 3] = lo
        return Grid(tuple(int(n) for n in np.asarray(hi) - np.asarray(lo)), self.affine @ shift)  # type: ignore[arg-type]

    def tile(self, tile: tuple[slice, ...]) -> "Grid":
        """The sub-grid of a window of slices (preprocessing.windows)."""
        return self.box(np.array([axis.start for axis in tile]), np.array([axis.stop for axis in tile]))

    def index_box(self, wmin: np.ndarray, wmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The index box lo..hi-1 of this grid's voxels that may lie in the RAS box wmin..wmax
        (clipped to the grid; empty when lo >= hi on some axis)."""
        corners = np.array([[x, y, z, 1.0] for x in (wmin[0], wmax[0]) for y in (wmin[1], wmax[1]) for z in (wmin[2], wmax[2])])
        index = (corners @ np.linalg.inv(self.affine).T)[:, :3]
        lo = np.clip(np.floor(index.min(0)).astype(int), 0, self.shape)
        hi = np.clip(np.ceil(index.max(0)).astype(int) + 1, 0, self.shape)
        return lo, hi

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """RAS min/max of the grid's voxel-edge corners."""
        return box_world_bounds(self.affine, np.zeros(3), np.asarray(self.shape) - 1)


@dataclass(frozen=True)
class Overlay:
    """Per-class probabilities (len(rows), *grid.shape) on a smaller, finer grid: inside it they
    replace the working grid's probabilities of those class rows (the second pass for small classes)."""

    rows: list[int]
    probabilities: torch.Tensor
    grid: Grid


def box_world_bounds(affine: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """RAS min/max of the voxel-edge corners of the index box lo..hi (inclusive)."""
    edges = [(lo[a] - 0.5, hi[a] + 0.5) for a in range(3)]
    corners = np.array([[i, j, k, 1.0] for i in edges[0] for j in edges[1] for k in edges[2]])
    world = corners @ affine.T
    return world[:, :3].min(0), world[:, :3].max(0)


def aligned_grid(center: np.ndarray, spacing: float, shape: tuple[int, int, int]) -> Grid:
    """An RAS-aligned isotropic grid of `shape` centred on `center`."""
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = np.asarray(center) - spacing * (np.asarray(shape) - 1) / 2
    return Grid(tuple(int(s) for s in shape), affine)


def round_up(n: float, multiple: int) -> int:
    """n rounded up to a multiple of the network stride, and at least two of them: the coarsest
    feature map then has more than one voxel a side, which instance normalisation needs."""
    return max(2 * multiple, int(math.ceil(n / multiple - 1e-6)) * multiple)


def fit_spacing(affine: np.ndarray, lo: np.ndarray, hi: np.ndarray, size: int) -> float:
    """Isotropic spacing at which the index box lo..hi fits `size` voxels a side, but never finer
    than 3/4 of the volume's finest voxel (upsampling past that adds cost, not detail)."""
    wmin, wmax = box_world_bounds(affine, lo, hi)
    native = float(np.linalg.norm(affine[:3, :3], axis=0).min())
    return max(float((wmax - wmin).max()) / size, 0.75 * native)


def covering_grid(affine: np.ndarray, lo: np.ndarray, hi: np.ndarray, spacing: float, multiple: int, max_size: int | None = None) -> Grid:
    """The RAS grid at `spacing` covering the index box lo..hi, each side a multiple of `multiple`."""
    wmin, wmax = box_world_bounds(affine, lo, hi)
    shape = [round_up(e / spacing, multiple) for e in wmax - wmin]
    if max_size:
        shape = [min(n, round_up(max_size, multiple)) for n in shape]
    return aligned_grid((wmin + wmax) / 2, spacing, tuple(shape))  # type: ignore[arg-type]


def fit_grid(affine: np.ndarray, lo: np.ndarray, hi: np.ndarray, size: int, multiple: int) -> Grid:
    """The RAS grid, at most `size` voxels a side, covering the index box lo..hi of a volume."""
    return covering_grid(affine, lo, hi, fit_spacing(affine, lo, hi, size), multiple, max_size=size)


def crop_grid(affine: np.ndarray, volume_shape: tuple[int, ...], center: np.ndarray, spacing: float, size: int, multiple: int) -> Grid:
    """A grid at `spacing` centred on `center` (RAS), `size` voxels a side at most and no larger
    than the volume's own extent needs: a reference crop around its labels."""
    wmin, wmax = box_world_bounds(affine, np.zeros(3), np.array(volume_shape) - 1)
    shape = tuple(min(round_up(e / spacing, multiple), round_up(size, multiple)) for e in wmax - wmin)
    return aligned_grid(center, spacing, shape)  # type: ignore[arg-type]


def _normalized_to_index(shape: tuple[int, ...]) -> np.ndarray:
    """4x4 map from grid_sample's normalised (x, y, z) (align_corners=False) to voxel (i, j, k)."""
    n = np.asarray(shape, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = np.diag(n / 2) @ _XYZ_TO_IJK
    m[:3, 3] = (n - 1) / 2
    return m


def resample(
    data: torch.Tensor,
    source_affine: np.ndarray,
    grid: Grid,
    mode: str = "bilinear",
    world_transform: np.ndarray | None = None,
    padding: str = "zeros",
) -> torch.Tensor:
    """Sample `data` (C, I, J, K) on `grid`, returning (C, *grid.shape).

    `world_transform` (4x4, RAS -> RAS) moves where each grid point samples from: augmentation
    composes it here so images are interpolated once.
    """
    world = grid.affine if world_transform is None else world_transform @ grid.affine
    theta = np.linalg.inv(_normalized_to_index(data.shape[1:])) @ np.linalg.inv(source_affine) @ world @ _normalized_to_index(grid.shape)
    theta_t = torch.as_tensor(theta[:3], dtype=torch.float32, device=data.device)[None]
    coords = F.affine_grid(theta_t, [1, data.shape[0], *grid.shape], align_corners=False)
    source = data[None] if data.is_floating_point() else data[None].float()
    return F.grid_sample(source, coords, mode=mode, padding_mode=padding, align_corners=False)[0]


def labels_on_grid(
    probabilities: torch.Tensor, source_affine: np.ndarray, grid: Grid, label_values: list[int],
    threshold: float | Sequence[float] = 0.5, slab: int = 8, overlays: Sequence[Overlay] = (),
) -> np.ndarray:
    """Per-class probabilities (K, ...) on a working grid -> label map on `grid` (the target's own).

    Probabilities are interpolated linearly, a slab of rows at a time so memory stays bounded on
    large targets; inside each of `overlays` its classes' probabilities come from the overlay
    instead. A voxel takes the most probable of the classes whose probability exceeds their
    threshold (one for all classes, or one per class).
    """
    values = torch.tensor([0, *label_values], dtype=torch.int64, device=probabilities.device)
    thresholds = torch.as_tensor(threshold, dtype=probabilities.dtype, device=probabilities.device).reshape(-1, 1, 1, 1)
    out = np.zeros(grid.shape, dtype=np.int64)
    for start in range(0, grid.shape[0], slab):
        stop = min(grid.shape[0], start + slab)
        rows = grid.rows(start, stop)
        probs = resample(probabilities, source_affine, rows)
        for overlay in overlays:
            lo, hi = rows.index_box(*overlay.grid.world_bounds())
            if (lo >= hi).any():
                continue
            part = rows.box(lo, hi)
            inside = resample(torch.ones((1, *overlay.grid.shape), device=probs.device), overlay.grid.affine, part)[0] > 1 - 1e-4
            box = (slice(None), *(slice(a, b) for a, b in zip(lo, hi)))
            region = probs[box]  # a view: writing its rows writes probs
            region[overlay.rows] = torch.where(inside, resample(overlay.probabilities.to(probs.device), overlay.grid.affine, part), region[overlay.rows])
        best, index = torch.where(probs > thresholds, probs, torch.zeros_like(probs)).max(0)
        out[start:stop] = torch.where(best > 0, values[index + 1], values[0]).cpu().numpy()
    return out
