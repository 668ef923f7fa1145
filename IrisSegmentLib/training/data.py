"""Training data: every set in a data root, loaded once into memory, and episode sampling.

Three kinds of set, all in the nnU-Net layout of ../shared/data:
- paired: several scans with labels; reference and query are different cases;
- single: one or two scans; reference and query are two augmented views (or the other case);
- synthetic: label maps only; images are synthesised per episode (SynthSeg-style), with one
  label-to-intensity draw shared by reference and query so the task stays well posed.

Three kinds of episode (`TASK_MIX`): labelled (a set's named classes, sometimes two touching ones
merged), invented (random label maps, `tasks.random_label_map`) and agnostic (nameless regions of a
real scan, `tasks.agnostic_regions`). Only labelled episodes carry class names (and feed the memory
bank); in the other two the reference is the only thing that says what to segment.
Whole sets (`unseen_sets` of Resources/splits.json) are never trained on, and classes
(`unseen_classes`) never asked for by name (an agnostic region may still cover part of one): they are
the generalization benchmark's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..io import read_image, read_label_map
from ..io.sidecars import parse_label_table
from ..preprocessing.grid import aligned_grid, fit_grid, resample
from ..preprocessing.intensity import foreground_box, normalize
from .augment import IntensityAugment, LabelSynthesizer, SliceThickness, random_world_transform
from .tasks import agnostic_regions, merged, random_label_map, smooth_displacement, touching_pair, warp_labels

SPLIT_FILE = Path(__file__).resolve().parents[2] / "Resources" / "splits.json"
# Label values at or above this in the SynthSeg brain maps are unnamed extra-cerebral tissue:
# they shape synthetic images but are never asked for as classes.
MAX_NAMED_SYNTH_LABEL = 100
# Unseen classes of a synthetic set stay in its label maps (they shape the image) moved above every
# named value, so they are never asked for.
UNSEEN_SYNTH_OFFSET = 600
# Relative shares of the episode kinds (see the module docstring). Chosen for iris-cpu-v3, which
# starts from a model that had learned its labelled classes and ignored references otherwise.
TASK_MIX = {"labelled": 0.4, "invented": 0.3, "agnostic": 0.3}
# At least this many voxels of a class in the reference crop, or the class is left out of the episode.
MIN_REFERENCE_VOXELS = 4
# Invented and agnostic episodes show the query at a scale drawn log-uniformly in [1 / QUERY_SCALE, QUERY_SCALE]
# of the reference's (iris-cpu-v3 to v7: each of the two 0.9-1.1, a ratio rarely past 1.15). A new patient's
# structure is not the reference's size: an older fetus's brain is 1.27 times a younger one's across
# (Fetal_Brain_MRI), and the shipped model's matches, pairing by look at scanner size, put one-shot maps at
# scale 0.79 there. Labelled episodes keep their physical sizes: there the size is part of the anatomy.
# iris-cpu-v8 (v6's recipe with this) measured no change on the unseen one-shot pairs by step 1,100 (model card).
QUERY_SCALE = 1.35


@dataclass
class Case:
    dataset: str
    case_id: str
    image: torch.Tensor | None            # (1, I, J, K) normalised float16, None for label-map-only sets
    labels: torch.Tensor                  # (1, I, J, K) int16
    affine: np.ndarray
    base_spacing: float                   # working spacing the inference pipeline would pick for it
    class_voxels: dict[int, np.ndarray]   # label -> sample of its voxel indices (n, 3)


@dataclass
class TrainingSet:
    name: str
    kind: str                              # "paired" | "single" | "synthetic"
    modality: str
    label_names: dict[int, str]
    cases: list[Case] = field(default_factory=list)
    weight: float = 1.0

    def class_key(self, value: int) -> str:
        return f"{self.name}/{self.label_names.get(value, f'label_{value}')}"


@dataclass
class Episode:
    reference: torch.Tensor        # (1, 1, P, P, P)
    reference_masks: torch.Tensor  # (1, K, P, P, P)
    query: torch.Tensor            # (1, 1, P, P, P)
    query_masks: torch.Tensor      # (1, K, P, P, P)
    class_keys: list[str | None]   # None: an invented or nameless class (no memory-bank entry)


def load_split(path: Path = SPLIT_FILE) -> dict[str, list[str]]:
    """Held-out case ids per dataset: never used for training, used for evaluation."""
    return json.loads(path.read_text())["heldout"] if path.exists() else {}


def load_unseen(path: Path = SPLIT_FILE) -> tuple[set[str], set[str]]:
    """Whole sets never trained on, and class names never asked for (the generalization benchmark's).
    An unseen class of a trained set can still fall inside a nameless agnostic region."""
    meta = json.loads(path.read_text()) if path.exists() else {}
    return set(meta.get("unseen_sets", [])), {c.lower() for c in meta.get("unseen_classes", [])}


def _class_voxels(labels: np.ndarray, values: list[int], rng: np.random.Generator, keep: int = 256) -> dict[int, np.ndarray]:
    out = {}
    for v in values:
        idx = np.argwhere(labels == v)
        if len(idx):
            out[v] = idx[rng.choice(len(idx), size=min(keep, len(idx)), replace=False)].astype(np.int16)
    return out


def load_set(folder: Path, working_size: int, heldout: set[str], weight: float, unseen_classes: set[str] = frozenset()) -> TrainingSet:
    """A set's training cases; labels of `unseen_classes` are removed (image sets) or moved out of
    the named range (synthetic sets), so no episode can ask for them."""
    meta = json.loads((folder / "dataset.json").read_text())
    names = {v: k for v, k in parse_label_table(meta["labels"])[0].items() if v != 0}
    hidden = [v for v, name in names.items() if name.lower() in unseen_classes]
    names = {v: k for v, k in names.items() if v not in hidden}
    synthetic = not (folder / "imagesTr").exists()
    label_files = sorted((folder / "labelsTr").glob("*.nii.gz"))
    channel = next(iter(meta.get("channel_names", {}).values()), "MR")
    tset = TrainingSet(folder.name, "synthetic" if synthetic else "paired", "CT" if channel == "CT" else "MR", names, weight=weight)
    rng = np.random.default_rng(0)
    for lf in label_files:
        case_id = lf.name[: -len(".nii.gz")]
        if case_id in heldout:
            continue
        label_map = read_label_map(lf)
        labels, affine = label_map.array.astype(np.int16), label_map.affine
        for v in hidden:
            labels[labels == v] = v + UNSEEN_SYNTH_OFFSET if synthetic else 0
        image = None
        if synthetic:
            lo, hi = foreground_box((labels > 0).astype(np.float32), "MR", margin=2)
        else:
            raw = read_image(folder / "imagesTr" / f"{case_id}_0000.nii.gz").array.astype(np.float32)
            lo, hi = foreground_box(raw, tset.modality)
            image = torch.from_numpy(normalize(raw, tset.modality)).to(torch.float16)[None]
        values = [v for v in np.unique(labels).tolist() if v != 0 and (not synthetic or v < MAX_NAMED_SYNTH_LABEL)]
        spacing = float(fit_grid(affine, lo, hi, working_size, 16).spacing[0])
        tset.cases.append(Case(folder.name, case_id, image, torch.from_numpy(labels)[None], affine, spacing, _class_voxels(labels, values, rng)))
    if not synthetic and len(tset.cases) <= 2:
        tset.kind = "single"
    return tset


# Relative episode shares of the labelled episodes. From step 2,000 of iris-cpu-v2 HeadNeck and Abdomen
# (their small or few cases not yet learned) took share from Hippocampus (learned first; was 3 / 2 / 2).
# iris-cpu-v4 doubles Hippocampus again: with 60 % of the episodes invented or agnostic (TASK_MIX),
# iris-cpu-v3 ended at 0.795 held-out one-shot Dice there, against the shipped model's 0.813.
DEFAULT_WEIGHTS = {
    "HeadNeck_CT": 5.0, "Hippocampus_MRI": 2.0, "Abdomen_MRI": 3.0, "LabelMaps_Abdomen": 1.5,
    "LabelMaps_Brain": 1.5, "Brain_T1": 0.5, "TotalSeg_CT_example": 0.5, "TotalSeg_MR_example": 0.5,
    "SpinalCord_MRI": 0.3, "Tumor_MRI": 0.3,
}


def load_all(root: Path, working_size: int, datasets: list[str] | None = None) -> list[TrainingSet]:
    """Every trainable set under `root`: held-out cases, unseen sets and unseen classes left out."""
    split = load_split()
    unseen_sets, unseen_classes = load_unseen()
    sets = []
    for folder in sorted(p for p in root.iterdir() if (p / "dataset.json").exists()):
        if (datasets and folder.name not in datasets) or folder.name in unseen_sets:
            continue
        sets.append(load_set(folder, working_size, set(split.get(folder.name, [])), DEFAULT_WEIGHTS.get(folder.name, 1.0), unseen_classes))
    return [s for s in sets if s.cases]


class EpisodeSampler:
    """Draws one in-context task: a reference and a query crop and the classes to find in the query.

    `max_classes` bounds labelled episodes (a random subset of a set's classes); `max_invented`
    bounds invented and agnostic ones, which reach many classes and small structures more often
    than any labelled set could. `identical`: the share of invented and agnostic episodes whose
    query is the reference itself (self-segmentation, the easiest task a reference sets).
    `query_scale`: how much larger or smaller than in the reference an invented or agnostic
    episode's query may show its structures (QUERY_SCALE).
    """

    def __init__(
        self, sets: list[TrainingSet], patch: int, max_classes: int = 4, mix: dict[str, float] | None = None,
        max_invented: int = 12, merge_probability: float = 0.15, identical: float = 0.1, query_scale: float = QUERY_SCALE,
    ) -> None:
        if query_scale < 1:
            raise ValueError(f"query_scale bounds a ratio of sizes and must be at least 1, got {query_scale}")
        self.sets = sets
        self.patch = patch
        self.max_classes = max_classes
        self.max_invented = max_invented
        self.merge_probability = merge_probability
        self.identical = identical
        self.query_scale = query_scale
        # the side of the region an invented or agnostic episode is cut from: room for a query at the largest scale
        self.canvas = int(patch * 1.25 * query_scale)
        weights = np.array([s.weight for s in sets])
        self.set_probs = weights / weights.sum()
        self.image_sets = [s for s in sets if s.kind != "synthetic"]
        image_weights = np.array([s.weight for s in self.image_sets])
        self.image_set_probs = image_weights / image_weights.sum() if len(image_weights) else image_weights
        mix = dict(TASK_MIX if mix is None else mix)
        if not self.image_sets:
            mix.pop("agnostic", None)
        self.kinds = sorted(k for k, share in mix.items() if share > 0)
        unknown = set(self.kinds) - set(TASK_MIX)
        if unknown or not self.kinds:
            raise ValueError(f"episode kinds must be some of {sorted(TASK_MIX)} with a positive share, got {mix}")
        shares = np.array([mix[k] for k in self.kinds])
        self.kind_probs = shares / shares.sum()
        self.augment = IntensityAugment()
        self.slices = SliceThickness()
        self.synthesizer = LabelSynthesizer()

    def class_keys(self) -> list[str]:
        return sorted({s.class_key(v) for s in self.sets for c in s.cases for v in c.class_voxels})

    def sample(self, rng: np.random.Generator) -> Episode:
        for _ in range(50):
            kind = self.kinds[rng.choice(len(self.kinds), p=self.kind_probs)]
            episode = {"labelled": self._labelled, "invented": self._invented, "agnostic": self._agnostic}[kind](rng)
            if episode is not None:
                return episode
        raise RuntimeError("could not draw an episode with a visible class in 50 tries; check the data")

    # ------------------------------------------------------------------ episode kinds
    def _labelled(self, rng: np.random.Generator) -> Episode | None:
        tset = self.sets[rng.choice(len(self.sets), p=self.set_probs)]
        ref_case = tset.cases[rng.integers(len(tset.cases))]
        if tset.kind == "single" and (len(tset.cases) == 1 or rng.random() < 0.5):
            query_case = ref_case
        else:
            others = [c for c in tset.cases if c is not ref_case]
            query_case = others[rng.integers(len(others))]
        common = sorted(set(ref_case.class_voxels) & set(query_case.class_voxels))
        if not common:
            return None
        chosen = [int(v) for v in rng.choice(common, size=min(len(common), int(rng.integers(1, self.max_classes + 1))), replace=False)]
        spacing = query_case.base_spacing * rng.uniform(0.85, 1.15)
        # Mostly centred on one chosen class; otherwise on any labelled structure of the query, so the
        # chosen classes sit anywhere in the crop or outside it and "segment what is in the middle"
        # cannot pass for following the reference.
        focus_pool = chosen if rng.random() < 0.7 else sorted(query_case.class_voxels)
        focus = focus_pool[rng.integers(len(focus_pool))]
        q_center = self._center(query_case, [focus], rng, spread=0.35)
        r_center = self._center(ref_case, chosen, rng, spread=0.1)
        query_img, query_lab = self._crop(query_case, q_center, spacing, rng)
        ref_img, ref_lab = self._crop(ref_case, r_center, spacing * rng.uniform(0.9, 1.1), rng)
        values = torch.tensor(chosen, dtype=torch.int16)[:, None, None, None]
        ref_masks, query_masks, keep = self._visible((ref_lab == values).float(), (query_lab == values).float())
        if ref_masks is None:
            return None
        keys: list[str | None] = [tset.class_key(v) for v, k in zip(chosen, keep) if k]
        if len(keys) > 1 and rng.random() < self.merge_probability:
            pair = touching_pair(ref_masks, rng)
            if pair is not None:  # two touching structures as one class: a task no name describes
                ref_masks, query_masks = merged(ref_masks, pair), merged(query_masks, pair)
                keys = [None if i == pair[0] else key for i, key in enumerate(keys) if i != pair[1]]
        if tset.kind == "synthetic":
            table = self.synthesizer.draw_table(rng)
            ref_img = self.synthesizer(ref_lab, table, rng)
            query_img = self.synthesizer(query_lab, table, rng)
        return self._episode(ref_img, ref_masks, query_img, query_masks, keys, rng)

    def _invented(self, rng: np.random.Generator) -> Episode | None:
        """A random label map, imaged SynthSeg-style; the query views it smoothly deformed."""
        classes = int(rng.integers(1, self.max_invented + 1))
        canvas = (self.canvas,) * 3
        base = random_label_map(canvas, classes, rng)
        grid = aligned_grid(np.zeros(3), 1.0, canvas)
        if rng.random() < self.identical:
            query_base = base
        else:
            query_base = warp_labels(base, smooth_displacement(canvas, rng, float(rng.uniform(0.0, 4.0))))
        jitter = 0.1 * self.patch
        ref_case = Case("invented", "", None, torch.from_numpy(base)[None], grid.affine, 1.0, {})
        query_case = Case("invented", "", None, torch.from_numpy(query_base)[None], grid.affine, 1.0, {})
        ref_spacing = rng.uniform(0.9, 1.1)
        _, ref_lab = self._crop(ref_case, rng.normal(0, jitter, 3), ref_spacing, rng)
        if query_base is base:  # self-segmentation: the reference's own crop
            query_lab = ref_lab
        else:
            _, query_lab = self._crop(query_case, rng.normal(0, jitter, 3), ref_spacing * self._scale(rng), rng)
        values = torch.arange(1, classes + 1, dtype=torch.int16)[:, None, None, None]
        ref_masks, query_masks, _ = self._visible((ref_lab == values).float(), (query_lab == values).float())
        if ref_masks is None:
            return None
        table = self.synthesizer.draw_table(rng)
        ref_img = self.synthesizer(ref_lab, table, rng)
        # self-segmentation sees the very same image half the time, a second synthetic imaging otherwise
        query_img = ref_img.clone() if query_base is base and rng.random() < 0.5 else self.synthesizer(query_lab, table, rng)
        return self._episode(ref_img, ref_masks, query_img, query_masks, [None] * len(ref_masks), rng)

    def _agnostic(self, rng: np.random.Generator) -> Episode | None:
        """Nameless regions of one real scan; reference and query are two views of it (or the same)."""
        tset = self.image_sets[rng.choice(len(self.image_sets), p=self.image_set_probs)]
        case = tset.cases[rng.integers(len(tset.cases))]
        spacing = case.base_spacing * rng.uniform(0.5, 1.15)
        if case.class_voxels and rng.random() < 0.5:
            center = self._center(case, [sorted(case.class_voxels)[rng.integers(len(case.class_voxels))]], rng, spread=0.35)
        else:
            corner = np.array(case.labels.shape[1:]) - 1
            index = rng.uniform(0.2, 0.8, 3) * corner
            center = case.affine[:3, :3] @ index + case.affine[:3, 3]
        canvas = aligned_grid(center, spacing, (self.canvas,) * 3)
        image = resample(case.image.float(), case.affine, canvas, padding="border")
        labels = resample(case.labels, case.affine, canvas, mode="nearest")[0].round().numpy().astype(np.int32)
        regions = agnostic_regions(image[0].numpy(), rng, labels)
        start = (self.canvas - self.patch) // 2
        inner = regions[tuple(slice(start, start + self.patch) for _ in range(3))]
        candidates = [v for v in np.unique(inner).tolist() if v != 0]
        if not candidates:
            return None
        count = min(len(candidates), int(rng.integers(1, self.max_invented + 1)))
        chosen = rng.choice(candidates, size=count, replace=False)
        # The chosen regions as 1..count, the rest 0: a noisy scan can have more regions than int16 holds.
        lookup = np.zeros(int(regions.max()) + 1, np.int16)
        lookup[chosen] = np.arange(1, count + 1)
        views = Case("agnostic", "", image.to(torch.float16), torch.from_numpy(lookup[regions])[None], canvas.affine, spacing, {})
        jitter = 0.1 * self.patch * spacing
        ref_spacing = spacing * rng.uniform(0.9, 1.1)
        ref_img, ref_lab = self._crop(views, center + rng.normal(0, jitter, 3), ref_spacing, rng)
        if rng.random() < self.identical:
            query_img, query_lab = ref_img.clone(), ref_lab
        else:
            query_img, query_lab = self._crop(views, center + rng.normal(0, jitter, 3), ref_spacing * self._scale(rng), rng)
        values = torch.arange(1, count + 1, dtype=torch.int16)[:, None, None, None]
        ref_masks, query_masks, _ = self._visible((ref_lab == values).float(), (query_lab == values).float())
        if ref_masks is None:
            return None
        return self._episode(ref_img, ref_masks, query_img, query_masks, [None] * len(ref_masks), rng)

    # ------------------------------------------------------------------ shared steps
    def _scale(self, rng: np.random.Generator) -> float:
        """A query spacing's ratio to its reference's, log-uniform in [1 / query_scale, query_scale]."""
        return float(np.exp(rng.uniform(-1, 1) * np.log(self.query_scale)))

    @staticmethod
    def _visible(ref_masks: torch.Tensor, query_masks: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, list[bool]]:
        """Only the classes the reference shows (at least MIN_REFERENCE_VOXELS voxels); None if none."""
        keep = (ref_masks.flatten(1).sum(1) >= MIN_REFERENCE_VOXELS).tolist()
        if not any(keep):
            return None, None, keep
        index = torch.tensor(keep)
        return ref_masks[index], query_masks[index], keep

    def _episode(
        self, ref_img: torch.Tensor, ref_masks: torch.Tensor, query_img: torch.Tensor, query_masks: torch.Tensor,
        keys: list[str | None], rng: np.random.Generator,
    ) -> Episode:
        seed = int(rng.integers(2**31))
        ref_img = self.augment(self.slices(ref_img, seed), seed)
        query_img = self.augment(self.slices(query_img, seed + 1), seed + 1)
        return Episode(ref_img[None], ref_masks[None], query_img[None], query_masks[None], keys)

    def _center(self, case: Case, values: list[int], rng: np.random.Generator, spread: float) -> np.ndarray:
        """A world point near the chosen classes: a random voxel of one (query) or their joint centre (reference)."""
        pts = np.concatenate([case.class_voxels[v] for v in values]).astype(np.float64)
        point = pts[rng.integers(len(pts))] if len(values) == 1 else (pts.min(0) + pts.max(0)) / 2
        world = case.affine[:3, :3] @ point + case.affine[:3, 3]
        return world + rng.normal(0, spread * self.patch * case.base_spacing / 2, 3)

    def _crop(self, case: Case, center: np.ndarray, spacing: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        grid = aligned_grid(center, spacing, (self.patch,) * 3)
        transform = random_world_transform(center, rng)
        labels = resample(case.labels, case.affine, grid, mode="nearest", world_transform=transform).to(torch.int16)
        if case.image is None:
            return torch.zeros((1, *grid.shape)), labels
        image = resample(case.image.float(), case.affine, grid, world_transform=transform, padding="border")
        return image, labels


@dataclass
class EpisodeBatch:
    """Episodes stacked into one batch, their class axes padded to the largest K."""
    reference: torch.Tensor        # (B, 1, P, P, P)
    reference_masks: torch.Tensor  # (B, K, P, P, P), zero for padded classes
    query: torch.Tensor            # (B, 1, P, P, P)
    query_masks: torch.Tensor      # (B, K, P, P, P)
    classes: torch.Tensor          # (B, K) bool: True for real classes
    class_keys: list[list[str | None]]  # per episode, its real classes in order (None: nameless)


def stack_episodes(episodes: list[Episode]) -> EpisodeBatch:
    k = max(len(ep.class_keys) for ep in episodes)

    def pad(masks: torch.Tensor) -> torch.Tensor:
        return torch.cat([masks, masks.new_zeros((1, k - masks.shape[1], *masks.shape[2:]))], 1)

    classes = torch.tensor([[i < len(ep.class_keys) for i in range(k)] for ep in episodes])
    return EpisodeBatch(
        torch.cat([ep.reference for ep in episodes]), torch.cat([pad(ep.reference_masks) for ep in episodes]),
        torch.cat([ep.query for ep in episodes]), torch.cat([pad(ep.query_masks) for ep in episodes]),
        classes, [ep.class_keys for ep in episodes],
    )


class EpisodeStream(torch.utils.data.IterableDataset):
    """One batch of episodes per step, start..stop in order, each episode drawn from its own (seed, rank, step, micro) RNG.

    Served by a DataLoader worker so sampling overlaps the optimiser step; the order, and so the
    run, stays a pure function of the step number.
    """

    def __init__(self, sampler: EpisodeSampler, seed: int, rank: int, start: int, stop: int, per_step: int) -> None:
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.start, self.stop, self.per_step = start, stop, per_step

    def __iter__(self):
        torch.set_num_threads(1)
        for step in range(self.start, self.stop):
            yield stack_episodes([self.sampler.sample(np.random.default_rng([self.seed, self.rank, step, micro])) for micro in range(self.per_step)])
