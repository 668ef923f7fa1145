"""Reference matching: copy the reference's labels onto the target along the encoder's features.

The network's decoder follows its task tokens for the structures it trained on, but for a structure it
never saw it finds little even on the reference itself (benchmarks/results/generalization_*.md), while
its encoder still tells the places of a scan apart. So every reference also leaves a matching memory:
the descriptors of its voxels (the encoder's stride-4, -8 and -16 maps, each L2-normalised, upsampled to
stride 4 and concatenated) with each class's share of each voxel. A target voxel takes its TOP_K most
similar memory voxels and their softmax-weighted (cosine similarity / TEMPERATURE) class shares are its
prior. On the shipped model this prior alone self-segments the unseen sets with working-grid Dice
0.77-0.94 (network 0.02-0.27) and segments their next case 0.22-0.36 (network 0.03-0.05);
benchmarks/matching_prior.py has the table.

Voxels near a class are kept at stride 4; the rest of the reference at stride 8 (one descriptor per
2x2x2 block, averaged), which keeps a task file a few MB for a small structure.

A stride-4 voxel is 11-14 mm on a whole-body CT: a rib or a vertebra's rim is a fraction of one, and the
stride-4 vote gives it a share well below a half. So each memory also keeps a boundary band: the
stride-2 voxels within one voxel of a class's border, described by the stem's stride-2 map and the
stride-4 map (`band_descriptors`). Where the stride-4 prior is unsure (between UNSURE and 1 - UNSURE for
some class) and the stride-4 vote found a memory voxel at least EXACT_MATCH similar, a target voxel is
voted again among the band, and that vote replaces the prior where the band holds an EXACT_MATCH too:
the same anatomy seen alike, as in a follow-up scan or the reference itself. On TotalSeg_CT_example
segmented with itself it raised the working-grid Dice from 0.43 to 0.76; between different patients
hardly a voxel is that similar, and the stride-4 prior stays as it is.

A rib is one or two working voxels thick: half a stride-2 voxel, still lost in a share. So each band key
also carries the classes of its 2x2x2 working voxels (`detail`, one bit each, a byte per class), and the
band's vote places them at the working voxels of the target's stride-2 voxel it redraws. Self-segmentation
of TotalSeg_CT_example's 40 classes of 1 cm3 or more went from 0.782 to 0.969 Dice with it (ribs 10-12
from 0.17-0.57 to 0.89-0.99), TotalSeg_MR_example's 22 from 0.868 to 0.972, and a band's file is smaller:
a byte per class and key instead of a float16 share.

On a new patient a structure's look-alikes elsewhere vote for it too. So each memory key also keeps its
position, and a class's stride-4 vote is placed (inference/geometry.py): RANSAC finds the similarity map
(rotation, scale, shift) from target to reference that the mutual nearest pairs around the class agree
on, a key's similarity then loses SPATIAL_WEIGHT per squared stride-4 voxel between it and where the map
sends the target voxel, and target voxels the map sends far from the class get no vote for it. One-shot
Fetal_Brain_MRI went from 0.511 to 0.680 Dice with it, Prostate_MR from 0.469 to 0.689
(benchmarks/results/generalization_placed.md). In a context ensemble each reference's map is found apart,
and a map that puts the class elsewhere in the target than the others agree on is dropped: Fetal_Brain_MRI
fetal_run3 segmented with three references went from 0.490 to 0.670 with it (one-shot 0.683). An ensemble
segments at one working spacing, its references' median, and a few percent of scale can cost a reference its
map: one whose pairs agree on none there is sought again with the target at its own spacing, where its
one-shot looks (IrisPredictor._own_scale_maps). The maps must then also agree on how large they make the class
in the target (geometry.SIZE_RATIO). The 3-reference Fetal_Brain_MRI ensemble went from 0.604 to 0.723 Dice
(fetal_t30_axial1 0.000 to 0.720; one-shot 0.680), Cells_Confocal from 0.369 to 0.359 (one target 0.632 to
0.592), the four other sets of benchmarks/results/generalization_ownscale_ensemble3.md unchanged.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..model.loss import dice_bce_loss
from .calibration import mask_dice
from .geometry import apply_map, consensus, inverse_map, ransac_similarity, voxel_centres

DESCRIPTOR_LEVELS = (1, 2, 3)  # encoder stages (strides 4, 8, 16 with the stride-2 stem) that describe a voxel
MATCH_LEVEL = DESCRIPTOR_LEVELS[0]  # the stage whose grid the matching runs on
# Neighbours and temperature, from benchmarks/matching_prior.py's sweep (Fetal_Brain_MRI one-shot, working
# grid): 1, 4 and 8 neighbours at 0.01-0.02 scored 0.359-0.369, 16 at 0.05 0.285, 64 at 0.1 0.023. Soft
# votes over many neighbours blur a structure into its surroundings; 8 sharp ones keep a little smoothing.
TOP_K = 8
TEMPERATURE = 0.01
QUERY_CHUNK = 1024  # target voxels compared at once: a chunk holds QUERY_CHUNK x memory-size similarities
BAND_LEVEL = 0  # the stem's stride-2 stage: the grid of the boundary band
UNSURE = 0.02  # a stride-4 prior between this and 1 - this for some class is voted again in the band
# The least similarity at which a target voxel is taken to see the reference's own anatomy: the band's vote
# then overrides the stride-4 prior, and the predictor trusts the matching there over the network. A target
# voxel finds its own reference voxel in the band at 0.996-1.0 (5th percentile to median of the unsure
# voxels, TotalSeg_CT_example segmented with itself) and another patient's at 0.80-0.965 (5th to 95th
# percentile, Prostate_MR prostate_000 -> prostate_005; Fetal_Brain_MRI fetal_run1 -> fetal_run3 0.73-0.95).
# At 0.95 the band lost Prostate's one-shot working-grid Dice (0.514 to 0.486); at 0.98 it keeps it (0.514)
# and Fetal's (0.197 to 0.198). At stride 4 one voxel in 3,000 of another patient's reaches 0.98 (Prostate_MR,
# HeadNeck_CT, Abdomen_MRI, Hippocampus_MRI pairs: 99.9th percentiles 0.949-0.978).
EXACT_MATCH = 0.98
# Placing the votes (inference/geometry.py): a class's map is sought among the mutual nearest pairs whose reference
# voxel lies within half the class's extent (and one voxel) of it, needs MIN_INLIERS pairs agreeing within
# RANSAC_TOLERANCE stride-4 voxels, and then a reference voxel's similarity loses SPATIAL_WEIGHT per squared
# stride-4 voxel between it and where the map sends the target voxel. On the unseen sets' one-shot pairs (shipped
# model, stride-4 prior on the working grid, benchmarks/results/matching_prior_placed_w*.md) weights 0.003 / 0.01 /
# 0.03 scored Prostate_MR 0.610 / 0.638 / 0.641 (unplaced 0.380), Fetal_Brain_MRI 0.610 / 0.622 / 0.618 (0.499),
# Cells_Confocal (one class of every cell: no map helps much) 0.317 / 0.312 / 0.310 (0.319).
MIN_INLIERS = 8
RANSAC_TOLERANCE = 2.0
SPATIAL_WEIGHT = 0.01
PLACE_MARGIN = 6  # stride-4 voxels around a class's box (mapped) where its placed vote runs; the class's keys lose SPATIAL_WEIGHT * 36 there
# The most similar keys of each reference among which a placed vote picks its TOP_K: with affine maps (before the
# similarity maps of inference/geometry.py) 64 scored Prostate_MR one-shot 0.631 end to end, 256 0.671, every key
# around the class (twice as slow on TotalSeg CT) 0.669.
PLACE_CANDIDATES = 256
BAND_PREFIX = "band_"  # a band memory's tensors in a file: its memory's prefix followed by this
CELLS = 8  # working voxels of one stride-2 band voxel: the bits of a band key's `detail`


def descriptors(features: list[torch.Tensor]) -> torch.Tensor:
    """(B, C, *stride-4 grid) unit descriptors from the encoder's feature maps (finest first)."""
    size = tuple(features[MATCH_LEVEL].shape[2:])
    parts = [F.normalize(F.interpolate(features[level], size=size, mode="trilinear", align_corners=False)
                         if tuple(features[level].shape[2:]) != size else features[level], dim=1)
             for level in DESCRIPTOR_LEVELS]
    return F.normalize(torch.cat(parts, 1), dim=1)


def band_descriptors(features: list[torch.Tensor]) -> torch.Tensor:
    """(B, C, *stride-2 grid) unit descriptors of the boundary band: the stem's map and the stride-4 map
    upsampled, each unit length, concatenated."""
    size = tuple(features[BAND_LEVEL].shape[2:])
    parts = [features[BAND_LEVEL], F.interpolate(features[MATCH_LEVEL], size=size, mode="trilinear", align_corners=False)]
    return F.normalize(torch.cat([F.normalize(part, dim=1) for part in parts], 1), dim=1)


@dataclass
class MatchingMemory:
    """What the matching keeps of its references: per kept voxel a descriptor (`keys`, (N, C) float16),
    each class's share of it (`masks`, (K, N) float16) and the reference it comes from (`reference`, (N,));
    `holds` (K, R) says which references hold each class, so a reference that lacks a class (an ensemble
    of references labelled differently) never votes that class absent. `band` is the memory of the
    boundary band (the module docstring), kept alike; None in task files written before it. A band's
    `detail` (K, N) uint8 holds each class's 2x2x2 working voxels of each key as bits (`pack_cells`);
    None in task files written before it, where the band redraws stride-2 shares. `positions` (N, 3) float32
    holds each key's RAS centre in its reference's own coordinates, which places the votes (`match`); None in
    a band and in task files written before it, where votes go unplaced. `spacings` (R,) holds each
    reference's working spacing (mm), where an ensemble seeks a reference's map again when it finds none at
    the ensemble's (`match`); None in a band and in task files written before it."""

    keys: torch.Tensor
    masks: torch.Tensor
    reference: torch.Tensor
    holds: torch.Tensor
    band: "MatchingMemory | None" = None
    detail: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    spacings: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = self.keys.shape[0]
        if self.keys.ndim != 2 or self.masks.ndim != 2 or self.masks.shape[1] != n or self.reference.shape != (n,):
            raise ValueError("a matching memory needs keys (N, C), masks (K, N) and reference (N,)")
        if self.holds.ndim != 2 or self.holds.shape[0] != self.masks.shape[0] or self.holds.dtype != torch.bool:
            raise ValueError("holds must be (K, R) true/false, one row per class")
        if n and (int(self.reference.min()) < 0 or int(self.reference.max()) >= self.holds.shape[1]):
            raise ValueError("every memory voxel must come from one of the references in holds")
        if not (torch.isfinite(self.keys).all() and torch.isfinite(self.masks).all()):
            raise ValueError("the matching memory holds NaN or infinite values")
        if self.band is not None and (self.band.masks.shape[0] != self.masks.shape[0] or self.band.holds.shape != self.holds.shape):
            raise ValueError("a matching memory's band must hold the same classes and references as the memory")
        if self.detail is not None and (self.detail.shape != self.masks.shape or self.detail.dtype != torch.uint8):
            raise ValueError("a band's detail must be (K, N) bytes, one per class and key")
        if self.positions is not None and (self.positions.shape != (n, 3) or not torch.isfinite(self.positions).all()):
            raise ValueError("a matching memory's positions must be (N, 3) finite coordinates, one per key")
        if self.spacings is not None and (self.spacings.shape != (self.holds.shape[1],) or not (torch.isfinite(self.spacings) & (self.spacings > 0)).all()):
            raise ValueError("a matching memory's spacings must be one positive spacing per reference")

    @classmethod
    def of_reference(cls, features: list[torch.Tensor], masks: torch.Tensor, affine: np.ndarray | None = None) -> "MatchingMemory":
        """The memory of one reference: its encoder features (batch of one) and class masks (K, *working grid);
        with the working grid's index -> RAS `affine`, the keys' positions and the reference's spacing."""
        fine = descriptors(features)[0]
        size = tuple(fine.shape[1:])
        shares = F.adaptive_avg_pool3d(masks[None].float(), size)[0]
        coarse, coarse_shares = F.normalize(F.avg_pool3d(fine[None], 2)[0], dim=0), F.avg_pool3d(shares[None], 2)[0]
        near = F.max_pool3d((coarse_shares.sum(0) > 0).float()[None, None], 3, stride=1, padding=1)[0, 0] > 0
        near_fine = F.interpolate(near[None, None].float(), size=size, mode="nearest")[0, 0] > 0
        keys = torch.cat([fine[:, near_fine].T, coarse[:, ~near].T])
        kept = torch.cat([shares[:, near_fine], coarse_shares[:, ~near]], 1)
        positions = spacings = None
        if affine is not None:
            spacings = torch.tensor([float(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).mean())])
            centres = torch.from_numpy(voxel_centres(affine, tuple(masks.shape[1:]), size).T.reshape(3, *size)).float()
            positions = torch.cat([centres[:, near_fine.cpu()].T, F.avg_pool3d(centres[None], 2)[0][:, ~near.cpu()].T])
        holds = torch.ones((masks.shape[0], 1), dtype=torch.bool)
        return cls(keys.half().cpu(), kept.half().cpu(), torch.zeros(keys.shape[0], dtype=torch.int64), holds,
                   cls._band_of_reference(features, masks, holds), positions=positions, spacings=spacings)

    @classmethod
    def _band_of_reference(cls, features: list[torch.Tensor], masks: torch.Tensor, holds: torch.Tensor) -> "MatchingMemory":
        """The boundary band of one reference: its stride-2 voxels with, within one voxel, both some of a
        class and some of not that class."""
        described = band_descriptors(features)[0]
        size = tuple(described.shape[1:])
        shares = F.adaptive_avg_pool3d(masks[None].float(), size)[0]
        inside = F.max_pool3d((shares > 0).float()[None], 3, stride=1, padding=1)[0] > 0
        outside = F.max_pool3d((shares < 1).float()[None], 3, stride=1, padding=1)[0] > 0
        band = (inside & outside).any(0)
        detail = pack_cells(masks)[:, band].cpu() if tuple(masks.shape[1:]) == tuple(2 * n for n in size) else None
        return cls(described[:, band].T.half().cpu(), shares[:, band].half().cpu(), torch.zeros(int(band.sum()), dtype=torch.int64), holds,
                   detail=detail)

    @staticmethod
    def of_views(views: list["MatchingMemory"]) -> "MatchingMemory":
        """One reference's memory from the memories of its views (the same classes on differently framed
        working grids: IrisPredictor.reference_on_grid): every view's voxels vote as the reference's own.
        The encoder's features depend on the framing (instance normalisation, the border, the lattice),
        so each view adds the reference as another framing of a target would see it: on
        Fetal_Brain_MRI's one-shot pairs the two views scored 0.513 where either alone scored 0.465-0.503."""
        first = views[0]
        bands = [view.band for view in views if view.band is not None]
        details = [view.detail for view in views if view.detail is not None]
        positions = [view.positions for view in views if view.positions is not None]
        return MatchingMemory(torch.cat([view.keys for view in views]), torch.cat([view.masks for view in views], 1),
                              torch.cat([view.reference for view in views]), first.holds,
                              MatchingMemory.of_views(bands) if len(bands) == len(views) else None,
                              torch.cat(details, 1) if len(details) == len(views) else None,
                              torch.cat(positions) if len(positions) == len(views) else None, first.spacings)

    def select(self, rows: list[int]) -> "MatchingMemory":
        return MatchingMemory(self.keys, self.masks[rows], self.reference, self.holds[rows], self.band.select(rows) if self.band is not None else None,
                              self.detail[rows] if self.detail is not None else None, self.positions, self.spacings)

    @staticmethod
    def combine(parts: list[tuple["MatchingMemory", list[int | None]]]) -> "MatchingMemory":
        """Several memories as one, for an ensemble of K classes: each part with, per ensemble class, its
        own row of that class (None where its references lack the class)."""
        classes = len(parts[0][1])
        detailed = all(memory.detail is not None for memory, _ in parts)
        keys, masks, details, reference, holds, offset = [], [], [], [], [], 0
        for memory, rows in parts:
            keys.append(memory.keys)
            reference.append(memory.reference + offset)
            part_masks = torch.zeros((classes, memory.keys.shape[0]), dtype=memory.masks.dtype)
            part_detail = torch.zeros((classes, memory.keys.shape[0]), dtype=torch.uint8) if detailed else None
            part_holds = torch.zeros((classes, memory.holds.shape[1]), dtype=torch.bool)
            for k, row in enumerate(rows):
                if row is not None:
                    part_masks[k], part_holds[k] = memory.masks[row], memory.holds[row]
                    if part_detail is not None:
                        part_detail[k] = memory.detail[row]  # type: ignore[index]
            masks.append(part_masks)
            details.append(part_detail)
            holds.append(part_holds)
            offset += memory.holds.shape[1]
        band = None
        if all(memory.band is not None for memory, _ in parts):
            band = MatchingMemory.combine([(memory.band, rows) for memory, rows in parts])  # type: ignore[misc]
        placed = all(memory.positions is not None for memory, _ in parts)
        spaced = all(memory.spacings is not None for memory, _ in parts)
        return MatchingMemory(torch.cat(keys), torch.cat(masks, 1), torch.cat(reference), torch.cat(holds, 1), band,
                              torch.cat(details, 1) if detailed else None,
                              torch.cat([memory.positions for memory, _ in parts]) if placed else None,  # type: ignore[misc]
                              torch.cat([memory.spacings for memory, _ in parts]) if spaced else None)  # type: ignore[misc]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """For a safetensors file (holds as uint8: the format's bool is not read everywhere). A band with
        `detail` keeps only that: its shares are the detail's bits counted (`from_tensors`)."""
        tensors = {f"{prefix}keys": self.keys.half(), f"{prefix}reference": self.reference.to(torch.int32), f"{prefix}holds": self.holds.to(torch.uint8)}
        tensors |= {f"{prefix}detail": self.detail} if self.detail is not None else {f"{prefix}masks": self.masks.half()}
        tensors |= {f"{prefix}positions": self.positions.float()} if self.positions is not None else {}
        tensors |= {f"{prefix}spacings": self.spacings.float()} if self.spacings is not None else {}
        return tensors | (self.band.tensors(f"{prefix}{BAND_PREFIX}") if self.band is not None else {})

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "MatchingMemory | None":
        if f"{prefix}keys" not in tensors:
            return None
        detail = tensors.get(f"{prefix}detail")
        if detail is not None and detail.dtype != torch.uint8:
            raise ValueError(f"{prefix}detail must be bytes")
        masks = (unpack_cells(detail).sum(1) / CELLS).half() if detail is not None else tensors[f"{prefix}masks"].half()
        positions = tensors.get(f"{prefix}positions")
        if positions is not None and not positions.is_floating_point():
            raise ValueError(f"{prefix}positions must be coordinates")
        spacings = tensors.get(f"{prefix}spacings")
        if spacings is not None and not spacings.is_floating_point():
            raise ValueError(f"{prefix}spacings must be millimetres")
        return cls(tensors[f"{prefix}keys"].half(), masks, tensors[f"{prefix}reference"].long(),
                   tensors[f"{prefix}holds"].bool(), cls.from_tensors(tensors, f"{prefix}{BAND_PREFIX}"), detail,
                   positions.float() if positions is not None else None, spacings.float() if spacings is not None else None)

    def prior(self, features: list[torch.Tensor], size: tuple[int, ...], affine: np.ndarray | None = None) -> torch.Tensor:
        """(K, *size): each class's matched share on a target window, from the window's encoder features
        (batch of one); computed at stride 4 (and at stride 2 in the band, for a `size` finer than stride
        4) and upsampled to `size`; placed (`match`) with the window's index -> RAS `affine`."""
        return self.match(features, size, affine=affine)[0]

    def match(
        self, features: list[torch.Tensor], size: tuple[int, ...], exact: bool = True, affine: np.ndarray | None = None,
        own_scale: "OwnScaleMaps | None" = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`prior`, and (*size) where the target finds a memory voxel at least EXACT_MATCH similar (1) or
        not (0), upsampled alike: where it sees the reference's own anatomy. Without `exact` no voxel is
        taken for exact and the band is not voted: the prior a new patient gets. With the window's
        index -> RAS `affine` and a memory that knows its keys' positions, each class's vote is placed
        where its matched pairs agree on a map to the reference (`_placed`); `own_scale` gives, for a
        reference whose pairs here agree on none, the maps found with the target at that reference's own
        spacing."""
        queries = descriptors(features)[0]
        grid = tuple(queries.shape[1:])
        placing = affine is not None and self.positions is not None
        flat = queries.flatten(1).T
        nearest = self._nearest(flat, TOP_K, mutual=placing)
        votes, best = self._votes(nearest)
        exactly = (best >= EXACT_MATCH) & exact
        if placing:
            votes = self._placed(flat, votes, nearest, voxel_centres(affine, size, grid), _stride_voxel(affine, size, grid), exactly, own_scale)
        exactly = exactly.reshape(1, 1, *grid)
        prior = votes.reshape(1, -1, *grid)
        upsampled = F.interpolate(torch.cat([prior, exactly.float()], 1), size=size, mode="trilinear", align_corners=False)[0]
        if self.band is None or all(n <= g for n, g in zip(size, grid)) or not exactly.any():
            return upsampled[:-1], upsampled[-1]
        change = self.band._correction(prior, exactly, features)
        return (upsampled[:-1] + F.interpolate(change, size=size, mode="trilinear", align_corners=False)[0]).clamp(0, 1), upsampled[-1]

    def _correction(self, prior: torch.Tensor, exact: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """(1, K, *grid): what this band memory's vote changes of the stride-4 `prior` (1, K, *stride-4 grid)
        upsampled, where that is unsure and both the stride-4 vote (`exact`, (1, 1, *stride-4 grid)) and the
        band find an EXACT_MATCH (the module docstring); zero elsewhere, so a target unlike every reference
        keeps the stride-4 prior as it is, at the cost of the stride-4 vote alone. The grid is the working
        grid (stride 1) where the band has `detail`, else its own stride-2 grid."""
        queries = band_descriptors(features)[0]
        size = tuple(queries.shape[1:])
        coarse = F.interpolate(prior, size=size, mode="trilinear", align_corners=False)[0]
        unsure = ((coarse > UNSURE) & (coarse < 1 - UNSURE)).any(0) & (F.interpolate(exact.float(), size=size, mode="nearest")[0, 0] > 0)
        cells = CELLS if self.detail is not None else 1
        redrawn = torch.zeros((prior.shape[1], cells, *size), device=prior.device)
        taken = torch.zeros((1, cells, *size), device=prior.device)
        if unsure.any():
            votes, best = self._votes(self._nearest(queries[:, unsure].T, TOP_K, mutual=False), cells)
            redrawn[:, :, unsure] = votes
            taken[:, :, unsure] = (best >= EXACT_MATCH).float()
        if cells == 1:
            return ((redrawn[:, 0] - coarse) * taken[:, 0])[None]
        fine = F.interpolate(prior, size=tuple(2 * n for n in size), mode="trilinear", align_corners=False)[0]
        return ((spread_cells(redrawn) - fine) * spread_cells(taken))[None]

    def _nearest(self, queries: torch.Tensor, count: int, mutual: bool = True, references: list[int] | None = None) -> "_Nearest":
        """Each of (N, C) `queries`' `count` most similar keys of each reference that holds some class (or of
        `references`) and, when `mutual`, each key's most similar query."""
        device = queries.device
        keys, reference = self.keys.to(device, torch.float32), self.reference.to(device)
        similarity = torch.full((self.holds.shape[1], queries.shape[0], count), -torch.inf, device=device)
        index = torch.zeros(similarity.shape, dtype=torch.int64, device=device)
        key_similarity = torch.full((keys.shape[0],), -torch.inf, device=device)
        key_best = torch.zeros(keys.shape[0], dtype=torch.int64, device=device)
        for r in torch.nonzero(self.holds.any(0))[:, 0].tolist() if references is None else references:
            columns = torch.nonzero(reference == r)[:, 0]
            if not len(columns):
                continue
            own, k = keys[columns], min(count, len(columns))
            for start in range(0, queries.shape[0], QUERY_CHUNK):
                chunk = queries[start:start + QUERY_CHUNK] @ own.T
                top, picked = chunk.topk(k, dim=1)
                similarity[r, start:start + len(chunk), :k], index[r, start:start + len(chunk), :k] = top, columns[picked]
                if mutual:
                    most, which = chunk.max(0)
                    better = most > key_similarity[columns]
                    key_similarity[columns] = torch.where(better, most, key_similarity[columns])
                    key_best[columns] = torch.where(better, which + start, key_best[columns])
        return _Nearest(similarity, index, key_best if mutual else None)

    def _votes(self, nearest: "_Nearest", cells: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, N) each class's vote for the N queries of `nearest` among the references that hold it, and (N,)
        each query's highest similarity to a key that voted. With CELLS `cells` the votes are of each of the
        2x2x2 working voxels of a band key (`detail`): (K, CELLS, N)."""
        device = nearest.similarity.device
        if cells == 1:
            masks = self.masks.to(device, torch.float32)[:, None]
        else:
            assert self.detail is not None, "votes of cells need a band's detail"
            masks = unpack_cells(self.detail.to(device)).float()
        queries = nearest.similarity.shape[1]
        votes = torch.zeros((self.masks.shape[0], cells, queries), device=device)
        best = torch.full((queries,), -1.0, device=device)
        groups: dict[tuple[bool, ...], list[int]] = {}
        for row, held in enumerate(self.holds.tolist()):
            groups.setdefault(tuple(held), []).append(row)
        for held, rows in groups.items():
            voters = [r for r, h in enumerate(held) if h and bool((self.reference == r).any())]
            if not voters:
                continue
            similarity = nearest.similarity[voters, :, :TOP_K].permute(1, 0, 2).flatten(1)
            top, picked = similarity.topk(TOP_K, dim=1)
            chosen = nearest.index[voters, :, :TOP_K].permute(1, 0, 2).flatten(1).gather(1, picked)
            votes[rows] = _weigh(top, chosen, masks[rows].flatten(0, 1)).reshape(len(rows), cells, -1)
            best = torch.maximum(best, top[:, 0])
        return (votes[:, 0] if cells == 1 else votes), best

    def maps_of_reference(self, features: list[torch.Tensor], size: tuple[int, ...], affine: np.ndarray, reference: int) -> dict[int, "ClassMap"]:
        """Per class that `reference` holds, the map its mutual nearest pairs with a target window agree on
        (the window's encoder features, batch of one, of working grid `size` with index -> RAS `affine`):
        how the predictor seeks a reference's maps with the target at that reference's own spacing."""
        queries = descriptors(features)[0]
        grid = tuple(queries.shape[1:])
        nearest = self._nearest(queries.flatten(1).T, TOP_K, mutual=True, references=[reference])
        found = self._class_maps(nearest, voxel_centres(affine, size, grid), _stride_voxel(affine, size, grid), references=[reference])
        return {row: maps[0] for row, maps in found.items()}

    def _class_maps(
        self, nearest: "_Nearest", where: np.ndarray, voxel: float, own_scale: "OwnScaleMaps | None" = None, references: list[int] | None = None,
    ) -> dict[int, list["ClassMap"]]:
        """Per class, the map of each reference holding it (of `references`, default all) whose mutual
        nearest pairs near the class agree on one (geometry.ransac_similarity), the target's voxels at RAS
        `where` (N, 3) and stride-4 `voxel` mm; where a reference's pairs agree on none, its map from
        `own_scale`, if that finds one."""
        assert self.positions is not None and nearest.key_best is not None
        positions, reference = self.positions.numpy().astype(np.float64), self.reference.numpy()
        shares = self.masks.float().numpy()
        first = nearest.index[:, :, 0]
        mutual = (nearest.similarity[:, :, 0] > -torch.inf) & (nearest.key_best[first] == torch.arange(len(where), device=first.device))
        found: dict[int, list[ClassMap]] = {}
        for row in range(shares.shape[0]):
            for r in torch.nonzero(self.holds[row])[:, 0].tolist():
                share = shares[row] * (reference == r)
                if share.max() <= 0 or references is not None and r not in references:
                    continue
                inside = positions[share >= min(0.5, float(share.max()))]
                lo, hi = inside.min(0), inside.max(0)
                reach = 0.5 * (hi - lo) + voxel
                pairs = torch.nonzero(mutual[r])[:, 0].cpu().numpy()
                matched = first[r, pairs].cpu().numpy()
                near = np.all((positions[matched] >= lo - reach) & (positions[matched] <= hi + reach), 1)
                fitted = ransac_similarity(where[pairs[near]], positions[matched[near]], RANSAC_TOLERANCE * voxel, MIN_INLIERS, seed=row)
                if fitted is not None:
                    found.setdefault(row, []).append(ClassMap(r, *fitted, lo, hi))
                elif own_scale is not None and row in (elsewhere := own_scale(r)):
                    found.setdefault(row, []).append(elsewhere[row])
        return found

    def _placed(
        self, queries: torch.Tensor, votes: torch.Tensor, nearest: "_Nearest", where: np.ndarray, voxel: float, exactly: torch.Tensor,
        own_scale: "OwnScaleMaps | None" = None,
    ) -> torch.Tensor:
        """`votes` (K, N) of (N, C) `queries` with the vote of each class whose map to some reference holding
        it is found (`_class_maps`) cast again among each query's PLACE_CANDIDATES most similar keys: a key's
        similarity loses SPATIAL_WEIGHT per squared stride-4 `voxel` (mm) between it and where the map sends
        the query (`where`, (N, 3) RAS), and a query that its maps send farther than PLACE_MARGIN voxels from
        the class's box gets no vote for it. In an ensemble, the references' maps must agree on where the
        class lies in the target and on its size there (geometry.consensus): a map that disagrees with the
        best-supported group does not vote, nor does a reference holding the class whose pairs agree on no
        map while another's do. A query that matches a reference `exactly` keeps its vote: there the map is
        the identity."""
        assert self.positions is not None
        device = votes.device
        shares = self.masks.float()
        maps: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
        margin = PLACE_MARGIN * voxel
        for row, found in self._class_maps(nearest, where, voxel, own_scale).items():
            if len(found) > 1:  # an ensemble: the maps must agree on where the class lies in the target, and how large it is there
                radius = max(0.5 * float((m.hi - m.lo).max()) for m in found) + RANSAC_TOLERANCE * voxel
                agreeing = consensus(np.stack([m.centre_in_target() for m in found]), np.array([m.inliers for m in found]), radius,
                                     np.array([m.size_in_target(voxel) for m in found]))
                found = [m for m, keep in zip(found, agreeing) if keep]
            for m in found:
                sent = apply_map(m.mapping, where)
                seen = torch.from_numpy(np.all((sent >= m.lo - margin) & (sent <= m.hi + margin), 1)).to(device)
                maps.setdefault(row, []).append((m.reference, torch.from_numpy(sent).float().to(device), seen))
        if not maps:
            return votes
        placed = votes.clone()
        for row in maps:
            placed[row] = torch.where(exactly, votes[row], 0.0)
        cast_on = torch.nonzero(torch.stack([seen for placements in maps.values() for _, _, seen in placements]).any(0) & ~exactly)[:, 0]
        if not len(cast_on):
            return placed
        mapped = sorted({r for placements in maps.values() for r, _, _ in placements})
        candidates = self._nearest(queries[cast_on], PLACE_CANDIDATES, mutual=False, references=mapped)
        located = self.positions.to(device)
        for row, placements in maps.items():
            tops, chosen = [], []
            for r, sent, seen in placements:
                apart = (located[candidates.index[r]] - sent[cast_on][:, None]).square().sum(-1) / voxel**2
                tops.append(torch.where(seen[cast_on][:, None], candidates.similarity[r] - SPATIAL_WEIGHT * apart, -torch.inf))
                chosen.append(candidates.index[r])
            top, picked = torch.cat(tops, 1).topk(TOP_K, dim=1)
            reached = top[:, 0] > -torch.inf
            cast = torch.zeros(len(cast_on), device=device)
            cast[reached] = _weigh(top[reached], torch.cat(chosen, 1).gather(1, picked)[reached], shares[row][None].to(device))[0]
            placed[row, cast_on] = cast
        return placed


@dataclass
class ClassMap:
    """The similarity map (target RAS -> reference RAS, geometry.apply_map) that the mutual nearest pairs
    around one class agree on, for one reference of a memory: `inliers` pairs agree with it; `lo`, `hi` are
    the corners of the class's box in the reference (its keys' centres)."""

    reference: int
    mapping: np.ndarray
    inliers: int
    lo: np.ndarray
    hi: np.ndarray

    def centre_in_target(self) -> np.ndarray:
        """Where the map puts the class's centre in the target (RAS)."""
        return apply_map(inverse_map(self.mapping), (0.5 * (self.lo + self.hi))[None])[0]

    def size_in_target(self, voxel: float) -> float:
        """How large (mm, the cube root of its box's volume, a `voxel` added per side) the map makes the class
        in the target: its size in the reference over the map's scale."""
        return float(np.cbrt(np.prod(self.hi - self.lo + voxel)) / np.cbrt(abs(np.linalg.det(self.mapping[:3]))))


OwnScaleMaps = Callable[[int], dict[int, ClassMap]]  # a reference's maps per class, found with the target at its own spacing


def _stride_voxel(affine: np.ndarray, size: tuple[int, ...], grid: tuple[int, ...]) -> float:
    """The side (mm) of one cell of a `grid` pooled from a working window of `size` with index -> RAS `affine`."""
    return float(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).mean()) * size[0] / grid[0]


@dataclass
class _Nearest:
    """What one comparison of queries with a memory's keys found: per reference (R), each query's most similar
    keys (`similarity` and memory `index`, (R, N, count), most similar first; -inf past a reference's keys)
    and, per key, its most similar query (`key_best`; None when not asked for)."""

    similarity: torch.Tensor
    index: torch.Tensor
    key_best: torch.Tensor | None


def pack_cells(masks: torch.Tensor) -> torch.Tensor:
    """(K, *grid/2) uint8: binary masks (K, *grid) with each 2x2x2 block of working voxels as the bits of
    one byte (bit 4 dz + 2 dy + dx)."""
    k, d, h, w = masks.shape
    blocks = (masks > 0.5).reshape(k, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(k, d // 2, h // 2, w // 2, CELLS)
    return (blocks.to(torch.uint8) << torch.arange(CELLS, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_cells(detail: torch.Tensor) -> torch.Tensor:
    """(K, CELLS, N) 0/1 bytes of (K, N) `pack_cells` bytes."""
    return (detail[:, None] >> torch.arange(CELLS, dtype=torch.uint8, device=detail.device)[None, :, None]) & 1


def spread_cells(cells: torch.Tensor) -> torch.Tensor:
    """(K, *2 grid): per-cell values (K, CELLS, *grid) of each stride-2 voxel placed at its 2x2x2 working
    voxels, as `pack_cells` orders them."""
    k, _, d, h, w = cells.shape
    return cells.reshape(k, 2, 2, 2, d, h, w).permute(0, 4, 1, 5, 2, 6, 3).reshape(k, 2 * d, 2 * h, 2 * w)


def drawn_at_stride(masks: torch.Tensor, stride: int) -> list[float]:
    """Per class, the Dice of binary `masks` (K, *grid, each side a multiple of `stride`) against what a vote at
    `stride` can draw of them: each stride voxel's share, upsampled as `match` does, above a half. It bounds
    what the matching gives a target that does not match its reference exactly (a new patient: no band)."""
    drawn = []
    for mask in masks.float():
        coarse = F.avg_pool3d(mask[None, None], stride)
        shown = F.interpolate(coarse, size=tuple(mask.shape), mode="trilinear", align_corners=False)[0, 0] > 0.5
        drawn.append(mask_dice(shown, mask > 0.5))
    return drawn


def matching_loss(ref_features: list[torch.Tensor], target_features: list[torch.Tensor], ref_masks: torch.Tensor,
                  target_masks: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Training: Dice + BCE of the matched prior (at stride 4, every reference voxel a key) against the
    target's masks pooled alike, per episode of a batch; (B, K) `classes` marks the real classes. It
    teaches the encoder features under which a voxel's nearest reference voxels carry its label."""
    queries, keys = descriptors([f.float() for f in target_features]), descriptors([f.float() for f in ref_features])
    size = tuple(queries.shape[2:])
    shares = F.adaptive_avg_pool3d(ref_masks.float(), size).flatten(2)
    truth = F.adaptive_avg_pool3d(target_masks.float(), size).flatten(2)
    priors = torch.stack([_vote(q.flatten(1).T, k.flatten(1).T, m)[0] for q, k, m in zip(queries, keys, shares)])
    return dice_bce_loss(torch.logit(priors.clamp(1e-4, 1 - 1e-4)), truth, classes.float())


def _vote(queries: torch.Tensor, keys: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, Nq): each query's softmax-weighted vote of its TOP_K most similar keys' class shares (K, Nk);
    and (Nq,) its highest similarity."""
    top, nearest = [], []
    k = min(TOP_K, keys.shape[0])
    for start in range(0, queries.shape[0], QUERY_CHUNK):
        similarity, picked = (queries[start:start + QUERY_CHUNK] @ keys.T).topk(k, dim=1)
        top.append(similarity)
        nearest.append(picked)
    top_all = torch.cat(top)
    return _weigh(top_all, torch.cat(nearest), masks), top_all[:, 0]


def _weigh(similarity: torch.Tensor, chosen: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(K, N): the softmax (similarity / TEMPERATURE) weighted class shares (K, keys) of each query's chosen
    keys ((N, k) similarities and key indices; a -inf similarity weighs nothing)."""
    weights = torch.softmax(similarity / TEMPERATURE, 1)
    return torch.cat([(masks[:, chosen[start:start + QUERY_CHUNK]] * weights[start:start + QUERY_CHUNK][None]).sum(-1)
                      for start in range(0, chosen.shape[0], QUERY_CHUNK)], 1) if len(chosen) else masks.new_zeros((masks.shape[0], 0))
