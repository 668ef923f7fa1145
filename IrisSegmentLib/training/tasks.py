"""Task generators whose structures have no fixed meaning, so the model must read them off the reference.

A model trained only on a few anatomical classes learns those classes and then ignores its
reference for anything else (self-segmentation of unseen structures near zero). Here each episode
invents its own structures, so nothing but the reference can say what to segment:

- `random_label_map`: a partition from the argmax of smoothed noise fields plus random blobs down
  to a few voxels, imaged SynthSeg-style; the query is another smoothly deformed view of it.
- `agnostic_regions`: regions of a real scan with no anatomical name: intensity bands, supervoxels
  merged with similar neighbours (`merged_supervoxels`) or the scan's own labels, cut by random
  Voronoi cells and split into connected components. A voxel that is one episode's foreground is the
  next one's background.
- `touching_pair` / `merged`: the union of two touching classes of a real label map as one class.

All generators are pure functions of the numpy Generator they are given.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.measure import label as connected_components
from skimage.segmentation import slic


def _smooth_fields(count: int, shape: tuple[int, int, int], coarse: int, rng: np.random.Generator) -> torch.Tensor:
    """`count` random fields, white noise on a `coarse`^3 lattice interpolated up to `shape`."""
    noise = torch.from_numpy(rng.standard_normal((1, count, coarse, coarse, coarse)).astype(np.float32))
    return F.interpolate(noise, size=shape, mode="trilinear", align_corners=False)[0]


def _argmax(fields: torch.Tensor) -> np.ndarray:
    """Index of the largest field per voxel (numpy's reduction over the leading axis is several times
    faster than torch's on CPU)."""
    return np.argmax(fields.numpy(), 0)


def random_label_map(shape: tuple[int, int, int], classes: int, rng: np.random.Generator, context_labels: int | None = None) -> np.ndarray:
    """A label map with the episode's classes 1..`classes` and unnamed context labels above them.

    The context labels (a noise-field partition) shape the synthetic image but are never asked for.
    Each class is, at random, either a region of its own noise partition (large, irregular) or a
    blob: a noise-perturbed ellipsoid whose radius ranges from 1.5 voxels to a quarter of the
    field, so small structures are common. Every class keeps at least one voxel.
    """
    context = int(context_labels if context_labels is not None else rng.integers(2, 7))
    coarse = int(rng.integers(3, 9))
    out = (_argmax(_smooth_fields(context, shape, coarse, rng)) + classes + 1).astype(np.int16)
    partition = _argmax(_smooth_fields(classes + 2, shape, int(rng.integers(3, 7)), rng))
    size = np.array(shape)
    masks = []
    for value in range(1, classes + 1):
        if rng.random() < 0.35:
            mask = partition == value
        else:
            mask = np.zeros(shape, dtype=bool)
            radius = np.exp(rng.uniform(np.log(1.5), np.log(size.min() / 4))) * rng.uniform(0.6, 1.4, 3)
            center = rng.uniform(0.15, 0.85, 3) * size
            lo = np.clip(np.floor(center - 1.3 * radius.max()), 0, size - 1).astype(int)
            hi = np.clip(np.ceil(center + 1.3 * radius.max()) + 1, lo + 1, size).astype(int)
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            coords = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij"), -1)
            rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0].astype(np.float32)
            local = (coords - center.astype(np.float32)) @ rotation / radius.astype(np.float32)
            wobble = 0.4 * _smooth_fields(1, tuple(hi - lo), int(rng.integers(2, 5)), rng)[0].numpy()
            mask[box] = (local**2).sum(-1) + wobble < 1.0
        if not mask.any():
            mask = np.zeros(shape, dtype=bool)
            mask[tuple(int(c) for c in rng.integers(0, size))] = True
        masks.append((value, mask))
    # Smaller structures are painted last, over larger ones, so they survive; one that larger
    # ones still cover entirely keeps a voxel of its own.
    for value, mask in sorted(masks, key=lambda item: -int(item[1].sum())):
        out[mask] = value
    for value, mask in masks:
        if not (out == value).any():
            out[tuple(np.argwhere(mask)[0])] = value
    return out


def smooth_displacement(shape: tuple[int, int, int], rng: np.random.Generator, magnitude: float) -> torch.Tensor:
    """A smooth random displacement for grid_sample (1, *shape, 3), at most about `magnitude` voxels."""
    field = _smooth_fields(3, shape, int(rng.integers(3, 6)), rng)
    field = field / field.abs().amax().clamp_min(1e-6) * magnitude
    # grid_sample's normalised coordinates span 2 over the whole axis; its last axis is (x, y, z) = (k, j, i).
    scale = torch.tensor([2.0 / shape[2], 2.0 / shape[1], 2.0 / shape[0]])
    return field.flip(0).permute(1, 2, 3, 0)[None] * scale


def warp_labels(labels: np.ndarray, displacement: torch.Tensor) -> np.ndarray:
    """Labels moved by a displacement from `smooth_displacement` (nearest neighbour)."""
    identity = F.affine_grid(torch.eye(3, 4)[None], [1, 1, *labels.shape], align_corners=False)
    source = torch.from_numpy(labels.astype(np.float32))[None, None]
    warped = F.grid_sample(source, identity + displacement, mode="nearest", padding_mode="border", align_corners=False)
    return warped[0, 0].numpy().astype(labels.dtype)


def voronoi_cells(shape: tuple[int, int, int], cells: int, rng: np.random.Generator) -> np.ndarray:
    """Random Voronoi partition into `cells` cells (computed on a coarse lattice, so borders are blocky
    only at a few voxels' scale)."""
    coarse = tuple(max(2, n // 4) for n in shape)
    seeds = rng.uniform(0, 1, (cells, 3)) * np.array(coarse)
    grid = np.stack(np.meshgrid(*[np.arange(n) + 0.5 for n in coarse], indexing="ij"), -1)
    nearest = ((grid[..., None, :] - seeds) ** 2).sum(-1).argmin(-1).astype(np.int16)
    zoomed = nearest.repeat(4, 0).repeat(4, 1).repeat(4, 2)
    padded = np.pad(zoomed, [(0, max(0, n - z)) for n, z in zip(shape, zoomed.shape)], mode="edge")
    return padded[: shape[0], : shape[1], : shape[2]]


def merged_supervoxels(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A partition of `image` (1..N) whose borders follow its own edges, with parts of organ-like size.

    SLIC supervoxels (computed at half resolution, where they cost a third of a second for a 96^3
    canvas) are merged across a random share of the borders between neighbours of similar mean
    intensity, so a region is sometimes one supervoxel and sometimes a structure made of several;
    intensity bands alone follow iso-contours, which run through organs as often as around them."""
    small = image[::2, ::2, ::2].astype(np.float64)
    segments = slic(small, n_segments=int(rng.integers(16, 160)), compactness=float(rng.uniform(0.05, 0.5)),
                    channel_axis=None, start_label=0, enforce_connectivity=True)
    count = int(segments.max()) + 1
    means = np.bincount(segments.ravel(), small.ravel(), count) / np.maximum(np.bincount(segments.ravel(), minlength=count), 1)
    pairs = np.concatenate([np.stack([np.moveaxis(segments, axis, 0)[:-1].ravel(), np.moveaxis(segments, axis, 0)[1:].ravel()], 1) for axis in range(3)])
    pairs = np.unique(np.sort(pairs[pairs[:, 0] != pairs[:, 1]], 1), axis=0)
    parent = np.arange(count)

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    if len(pairs):
        differences = np.abs(means[pairs[:, 0]] - means[pairs[:, 1]])
        similar = differences <= np.quantile(differences, rng.uniform(0.1, 0.6))
        for a, b in pairs[similar & (rng.random(len(pairs)) < rng.uniform(0.3, 0.9))]:
            parent[root(int(a))] = root(int(b))
    roots = np.array([root(node) for node in range(count)])
    labels = np.unique(roots, return_inverse=True)[1].reshape(-1)[segments] + 1
    full = labels.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    return full[: image.shape[0], : image.shape[1], : image.shape[2]].astype(np.int32)


def agnostic_regions(image: np.ndarray, rng: np.random.Generator, labels: np.ndarray | None = None, min_voxels: int = 8) -> np.ndarray:
    """Regions of a real scan that carry no anatomical name, as a label map 1..N (0: unused).

    The base partition is the scan's own label map (when given, half the time), its merged supervoxels
    (`merged_supervoxels`) or bands of its smoothed intensity at random quantiles; it is cut by random
    Voronoi cells most of the time (labels split into parts), then split into connected components.
    Components smaller than `min_voxels` are dropped.
    """
    if labels is not None and rng.random() < 0.5:
        base = labels.astype(np.int32)
    elif rng.random() < 0.5:
        base = merged_supervoxels(image, rng)
    else:
        smooth = ndimage.gaussian_filter(image.astype(np.float32), sigma=float(rng.uniform(0.5, 2.0)))
        bands = int(rng.integers(2, 7))
        edges = np.quantile(smooth, np.sort(rng.uniform(0.05, 0.95, bands - 1)))
        base = np.digitize(smooth, edges).astype(np.int32)
    if rng.random() < 0.7:
        cells = int(rng.integers(2, 24))
        base = base * cells + voronoi_cells(image.shape, cells, rng)
    regions = connected_components(base, background=-1, connectivity=1).astype(np.int32)
    sizes = np.bincount(regions.ravel())
    small = sizes < min_voxels
    small[0] = True
    regions[small[regions]] = 0
    return regions


def touching_pair(masks: torch.Tensor, rng: np.random.Generator, margin: int = 2) -> tuple[int, int] | None:
    """Two classes of the masks (K, ...) that lie within `margin` voxels of each other, in random
    order of search; None when no two do."""
    order = rng.permutation(masks.shape[0])
    for a in order:
        grown = F.max_pool3d(masks[a][None, None], 2 * margin + 1, stride=1, padding=margin)[0, 0] > 0
        for b in order:
            if b != a and bool((grown & (masks[b] > 0)).any()):
                return int(min(a, b)), int(max(a, b))
    return None


def merged(masks: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
    """masks (K, ...) with class pair[1] folded into class pair[0] (K - 1 classes)."""
    first, second = pair
    out = masks.clone()
    out[first] = torch.maximum(out[first], out[second])
    return torch.cat([out[:second], out[second + 1:]])
