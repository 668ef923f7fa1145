"""Episodic training: what a resumed or distributed run depends on.

Runs on two tiny data sets written to a temporary folder (one with images, one label-map-only for
synthetic images), so it needs no shared data and takes seconds.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from IrisSegmentLib.model.iris import IrisModel
from IrisSegmentLib.training.augment import SliceThickness, thick_slices
from IrisSegmentLib.training.data import (
    MIN_REFERENCE_VOXELS, UNSEEN_SYNTH_OFFSET, EpisodeSampler, EpisodeStream, load_all, load_set, stack_episodes,
)
from IrisSegmentLib.training.tasks import agnostic_regions, merged, merged_supervoxels, random_label_map, touching_pair
from IrisSegmentLib.training.train import _mix, main as train_main

PATCH = 32
NAMES = {"background": 0, "left_blob": 1, "right_blob": 2}


def _write_set(root: Path, name: str, cases: int, with_images: bool) -> None:
    folder = root / name
    (folder / "labelsTr").mkdir(parents=True)
    if with_images:
        (folder / "imagesTr").mkdir()
    rng = np.random.default_rng(len(name))
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for i in range(cases):
        labels = np.zeros((40, 44, 36), np.uint8)
        shift = int(rng.integers(-2, 3))
        labels[8 + shift : 18 + shift, 10:22, 10:20] = 1
        labels[24:34, 20 + shift : 32 + shift, 14:26] = 2
        nib.save(nib.Nifti1Image(labels, affine), folder / "labelsTr" / f"{name.lower()}_{i:03d}.nii.gz")
        if with_images:
            image = 100 + 300 * (labels == 1) + 600 * (labels == 2) + rng.normal(0, 20, labels.shape)
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / "imagesTr" / f"{name.lower()}_{i:03d}_0000.nii.gz")
    meta = {"name": name, "channel_names": {"0": "MR"}, "labels": NAMES}
    (folder / "dataset.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training_data")
    _write_set(root, "Toy_MRI", 4, with_images=True)
    _write_set(root, "Toy_Labels", 2, with_images=False)
    return root


@pytest.fixture(scope="module")
def sampler(data_root: Path) -> EpisodeSampler:
    return EpisodeSampler(load_all(data_root, 128), PATCH)


def test_held_out_cases_are_never_loaded(data_root: Path) -> None:
    tset = load_set(data_root / "Toy_MRI", 128, {"toy_mri_001"}, 1.0)
    assert [c.case_id for c in tset.cases] == ["toy_mri_000", "toy_mri_002", "toy_mri_003"]
    assert tset.kind == "paired"  # three subjects: reference and query come from different ones
    assert load_set(data_root / "Toy_Labels", 128, set(), 1.0).kind == "synthetic"


def test_every_episode_class_is_visible_in_the_reference(sampler: EpisodeSampler) -> None:
    """Of every kind: a class the reference does not show cannot be asked for, and only labelled
    episodes name their classes (the others' structures have no meaning beyond the reference)."""
    seen_sets, kinds = set(), set()
    for seed in range(24):
        ep = sampler.sample(np.random.default_rng(seed))
        k = len(ep.class_keys)
        assert tuple(ep.reference.shape) == tuple(ep.query.shape) == (1, 1, PATCH, PATCH, PATCH)
        assert tuple(ep.reference_masks.shape) == tuple(ep.query_masks.shape) == (1, k, PATCH, PATCH, PATCH)
        assert torch.isfinite(ep.reference).all() and torch.isfinite(ep.query).all()
        assert set(ep.reference_masks.unique().tolist()) <= {0.0, 1.0}
        assert (ep.reference_masks.flatten(2).sum(-1) >= MIN_REFERENCE_VOXELS).all()
        named = [key for key in ep.class_keys if key is not None]
        kinds.add("named" if named else "nameless")
        for key in named:
            dataset, name = key.split("/")
            assert name in ("left_blob", "right_blob")
            seen_sets.add(dataset)
    assert seen_sets == {"Toy_MRI", "Toy_Labels"}
    assert kinds == {"named", "nameless"}


@pytest.mark.parametrize("kind", ["labelled", "invented", "agnostic"])
def test_each_episode_kind_alone_draws_visible_classes_from_its_seed(data_root: Path, kind: str) -> None:
    only = EpisodeSampler(load_all(data_root, 128), PATCH, mix={kind: 1.0}, max_invented=10)
    sizes = []
    for seed in range(6):
        ep = only.sample(np.random.default_rng(seed))
        again = only.sample(np.random.default_rng(seed))
        for field in ("reference", "reference_masks", "query", "query_masks"):
            assert torch.equal(getattr(ep, field), getattr(again, field)), f"{kind} episodes must be a pure function of the seed"
        assert (ep.reference_masks.flatten(2).sum(-1) >= MIN_REFERENCE_VOXELS).all()
        assert ep.reference_masks.std() > 0 and ep.reference.std() > 0
        assert all(key is None for key in ep.class_keys) == (kind != "labelled")
        sizes.append(len(ep.class_keys))
    if kind != "labelled":
        assert max(sizes) > 2, "invented and agnostic episodes reach beyond the two classes of the toy sets"


def test_agnostic_episodes_survive_more_regions_than_int16_holds(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A noisy scan cut into bands and cells can have tens of thousands of regions (a training run
    died on it): the chosen ones must still come out as whole, disjoint masks."""
    from IrisSegmentLib.training import data as data_module

    real = data_module.agnostic_regions
    monkeypatch.setattr(data_module, "agnostic_regions", lambda image, rng, labels=None: np.where(r := real(image, rng, labels), r + 40000, 0))
    sampler = EpisodeSampler(load_all(data_root, 128), PATCH, mix={"agnostic": 1.0}, identical=1.0)
    for seed in range(6):
        ep = sampler.sample(np.random.default_rng(seed))
        assert torch.equal(ep.reference_masks, ep.query_masks), "self-segmentation: the query is the reference's own crop"
        assert (ep.reference_masks.flatten(2).sum(-1) >= MIN_REFERENCE_VOXELS).all()
        assert ep.reference_masks.sum(1).max() <= 1, "each voxel is in one region at most"


def test_invented_self_segmentation_episodes_ask_for_the_references_own_masks(data_root: Path) -> None:
    sampler = EpisodeSampler(load_all(data_root, 128), PATCH, mix={"invented": 1.0}, identical=1.0)
    for seed in range(6):
        ep = sampler.sample(np.random.default_rng(seed))
        assert torch.equal(ep.reference_masks, ep.query_masks)


@pytest.mark.parametrize("kind", ["invented", "agnostic"])
def test_nameless_episodes_show_the_query_larger_or_smaller_than_the_reference(data_root: Path, kind: str) -> None:
    """A new patient's structure is not the reference's size: the query's regions must come out larger
    in some episodes and smaller in others than the same regions of the reference, well past what two
    crops at the same scale give (the shipped model paired by look at scanner size)."""
    def size_ratios(query_scale: float) -> np.ndarray:
        only = EpisodeSampler(load_all(data_root, 128), PATCH, mix={kind: 1.0}, identical=0.0, query_scale=query_scale)
        ratios = []
        for seed in range(40):
            ep = only.sample(np.random.default_rng(seed))
            # regions whole in both crops (not touching the border): their voxel counts scale with 1 / spacing^3
            inside = [c for c in range(ep.reference_masks.shape[1])
                      if all(not m[0, c][[0, -1]].any() and not m[0, c][:, [0, -1]].any() and not m[0, c][:, :, [0, -1]].any()
                             and m[0, c].sum() > 0 for m in (ep.reference_masks, ep.query_masks))]
            if inside:
                ratios.append(float(ep.query_masks[0, inside].sum() / ep.reference_masks[0, inside].sum()))
        return np.log(np.array(ratios))

    same, varied = size_ratios(1.0), size_ratios(1.5)
    assert len(varied) >= 6
    assert varied.min() < np.log(0.6) and varied.max() > np.log(1.6), "query regions both much smaller and much larger"
    assert np.abs(varied).mean() > 2 * np.abs(same).mean()
    with pytest.raises(ValueError, match="at least 1"):
        EpisodeSampler(load_all(data_root, 128), PATCH, query_scale=0.8)


def test_invented_label_maps_keep_every_class_and_often_small_ones() -> None:
    smallest = []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        labels = random_label_map((40, 40, 40), 8, rng, context_labels=3)
        values, counts = np.unique(labels, return_counts=True)
        assert set(range(1, 9)) <= set(values.tolist()), "every invented class keeps at least one voxel"
        assert values.max() <= 8 + 3, "context labels sit above the classes and are never asked for"
        assert np.array_equal(labels, random_label_map((40, 40, 40), 8, np.random.default_rng(seed), context_labels=3))
        smallest.append(counts[(values >= 1) & (values <= 8)].min())
    assert min(smallest) < 200, "small structures (a few hundred voxels at most) are part of the invented tasks"


def test_the_same_voxel_is_foreground_in_one_agnostic_task_and_background_in_another() -> None:
    """Agnostic regions are cut differently per episode: two voxels that form one structure in one
    episode are different structures in another, so no voxel's meaning can be memorised."""
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.normal(size=(32, 32, 32)), 3).astype(np.float32)
    labels = np.zeros((32, 32, 32), np.int32)
    labels[8:24, 8:24, 8:24] = 1
    center, corner = (16, 16, 16), (9, 9, 9)  # both inside label 1
    together, apart = 0, 0
    for seed in range(16):
        regions = agnostic_regions(image, np.random.default_rng(seed), labels)
        assert np.array_equal(regions, agnostic_regions(image, np.random.default_rng(seed), labels))
        if regions[center] == 0:  # in a piece smaller than min_voxels, dropped this time
            continue
        if regions[center] == regions[corner]:
            together += 1
        else:
            apart += 1
    assert together and apart, (together, apart)


def test_thick_slices_blur_across_one_axis_only() -> None:
    """A stack acquired with thick slices along one axis: stripes across that axis are averaged away,
    stripes along the others stay as sharp as they were."""
    stripes = torch.zeros((1, 24, 24, 24))
    stripes[:, ::2] = 1.0  # alternating along axis 0
    assert torch.equal(thick_slices(stripes, 1, 3), stripes) and torch.equal(thick_slices(stripes, 2, 4), stripes)
    across = thick_slices(stripes, 0, 2)
    assert across.shape == stripes.shape
    assert float(across.std()) < 0.1 * float(stripes.std()), "slabs of 2 average the stripes to a flat 0.5"


def test_slice_thickness_is_drawn_from_the_seed_along_every_axis() -> None:
    augment = SliceThickness(probability=0.5)
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 20, 20, 20)).astype(np.float32))
    axes, untouched = set(), 0
    for seed in range(40):
        out = augment(image, seed)
        assert torch.equal(out, augment(image, seed)), "the same seed gives the same image (exact resume)"
        if torch.equal(out, image):
            untouched += 1
            continue
        # the blurred axis is the one along which neighbouring voxels became most alike
        roughness = [float(out.diff(dim=axis + 1).abs().mean()) for axis in range(3)]
        axes.add(int(np.argmin(roughness)))
    assert 5 < untouched < 35 and axes == {0, 1, 2}


def test_merged_supervoxels_follow_the_scans_edges_and_vary_with_the_seed() -> None:
    """Nameless regions shaped like structures: no region straddles the border of a bright box, and
    how many supervoxels merge into one region changes from seed to seed."""
    rng = np.random.default_rng(0)
    image = np.zeros((48, 48, 48), np.float32)
    image[10:30, 14:34, 12:32] = 2.0
    image += rng.normal(0, 0.3, image.shape).astype(np.float32)
    inside = image > 1.0
    counts = set()
    for seed in range(4):
        regions = merged_supervoxels(image, np.random.default_rng(seed))
        assert regions.shape == image.shape and regions.min() >= 1
        assert np.array_equal(regions, merged_supervoxels(image, np.random.default_rng(seed)))
        # each voxel's region lies mostly on the voxel's own side of the border (a few small
        # supervoxels along it are cut at half resolution)
        share_inside = ndimage.mean(inside, regions, index=np.arange(1, regions.max() + 1))[regions - 1]
        wrong_side = np.where(inside, share_inside < 0.5, share_inside > 0.5).mean()
        assert wrong_side < 0.01, f"seed {seed}: {wrong_side:.1%} of voxels in a region mostly across the border"
        counts.add(len(np.unique(regions)))
    assert len(counts) > 1, counts


def test_touching_classes_merge_into_one_and_distant_ones_do_not() -> None:
    masks = torch.zeros((3, 16, 16, 16))
    masks[0, 2:6, 2:6, 2:6] = 1
    masks[1, 7:10, 2:6, 2:6] = 1  # one voxel of gap from class 0
    masks[2, 12:15, 12:15, 12:15] = 1
    assert touching_pair(masks, np.random.default_rng(0)) == (0, 1)
    union = merged(masks, (0, 1))
    assert union.shape[0] == 2
    assert torch.equal(union[0], torch.maximum(masks[0], masks[1])) and torch.equal(union[1], masks[2])
    assert touching_pair(masks[[0, 2]], np.random.default_rng(0)) is None


def test_unseen_classes_are_never_asked_for(data_root: Path) -> None:
    """Classes kept for the generalization benchmark: gone from image sets, moved out of the named
    range (still shaping the synthetic image) in label-map sets."""
    images = load_set(data_root / "Toy_MRI", 128, set(), 1.0, unseen_classes={"right_blob"})
    maps = load_set(data_root / "Toy_Labels", 128, set(), 1.0, unseen_classes={"right_blob"})
    assert images.label_names == maps.label_names == {1: "left_blob"}
    assert set(torch.unique(images.cases[0].labels).tolist()) == {0, 1}
    assert set(torch.unique(maps.cases[0].labels).tolist()) == {0, 1, 2 + UNSEEN_SYNTH_OFFSET}
    sampler = EpisodeSampler([images, maps], PATCH, mix={"labelled": 1.0})
    for seed in range(8):
        assert all(key.endswith("/left_blob") for key in sampler.sample(np.random.default_rng(seed)).class_keys)


def test_the_mix_option_names_the_episode_kinds() -> None:
    assert _mix("labelled=0.5, invented=0.5") == {"labelled": 0.5, "invented": 0.5}
    for bad in ("labelled", "labeled=1", "invented=-1,agnostic=1", "invented=0", "invented=x"):
        with pytest.raises(argparse.ArgumentTypeError, match="--mix"):
            _mix(bad)


def test_episodes_are_a_pure_function_of_their_seed(sampler: EpisodeSampler) -> None:
    """Exact resume and DDP ranks rely on it: the same (seed, rank, step) draws the same episode."""
    a = sampler.sample(np.random.default_rng([0, 0, 7, 1]))
    b = sampler.sample(np.random.default_rng([0, 0, 7, 1]))
    c = sampler.sample(np.random.default_rng([0, 0, 8, 1]))
    assert a.class_keys == b.class_keys
    for field in ("reference", "reference_masks", "query", "query_masks"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.query, c.query)


def test_stream_yields_one_batch_per_step_from_the_start_step(sampler: EpisodeSampler) -> None:
    batches = list(EpisodeStream(sampler, seed=3, rank=0, start=5, stop=7, per_step=2))
    assert len(batches) == 2
    expected = stack_episodes([sampler.sample(np.random.default_rng([3, 0, 6, m])) for m in range(2)])
    assert torch.equal(batches[1].query, expected.query)
    assert batches[1].class_keys == expected.class_keys


def test_an_interrupted_run_resumes_exactly(data_root: Path, tmp_path: Path) -> None:
    """Stopping after a step and resuming gives the same weights, optimiser state and memory bank
    as running straight through."""
    common = ["--data", str(data_root), "--patch", str(PATCH), "--steps", "3", "--warmup", "1",
              "--episodes-per-step", "2", "--checkpoint-every", "100"]
    train_main([*common, "--output", str(tmp_path / "straight")])
    train_main([*common, "--output", str(tmp_path / "resumed"), "--stop-after", "1e-9"])
    stopped = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert stopped["step"] == 1
    train_main([*common, "--output", str(tmp_path / "resumed")])
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 3
    assert straight["model"]["memory_bank"].abs().sum() > 0
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "straight" / "iris_step000003.safetensors").is_file()


def test_a_run_resumes_from_the_committed_float16_state_alone(data_root: Path, tmp_path: Path) -> None:
    """Without the local `last.pt` (never committed), `resume.json` + float16 weights carry the run
    on at its step and schedule position: what the model card tells a contributor to do."""
    from IrisSegmentLib.model.serialization import load_tensors

    run = tmp_path / "run"
    common = ["--data", str(data_root), "--patch", str(PATCH), "--steps", "3", "--warmup", "1",
              "--episodes-per-step", "1", "--checkpoint-every", "1", "--output", str(run)]
    train_main([*common, "--stop-after", "1e-9"])
    state = json.loads((run / "resume.json").read_text())
    assert state["step"] == 1 and state["schedule"]["steps"] == 3
    tensors, _ = load_tensors(run / state["weights"])
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    (run / "last.pt").unlink()
    train_main([*common[:-2], "--output", str(run), "--steps", "4"])  # a longer schedule than recorded: said, not silent
    assert json.loads((run / "resume.json").read_text())["step"] == 4
    log = (run / "train.log").read_text()
    assert "resumed at step 1 from resume.safetensors" in log
    assert "where the run recorded" in log
    assert "step 1 " not in log.split("resumed at step 1")[1], "the resumed run goes on after step 1, it does not redo it"


def test_a_new_run_starts_from_given_weights_keeping_memory_rows_by_class_name(tmp_path: Path) -> None:
    from engine_fixtures import random_model

    from IrisSegmentLib.model.weights import load_model, save_model
    from IrisSegmentLib.training.train import init_from

    source = random_model(memory_classes=("Toy/a", "Toy/b"))
    with torch.no_grad():
        source.memory_bank.normal_()
    target_config = replace(source.config, memory_classes=("New/thing", "Toy/b", "Toy/a"))
    target = IrisModel(target_config)
    save_model(source, tmp_path / "init.safetensors")
    init_from(target, load_model(tmp_path / "init.safetensors", device="cpu"))
    loaded = load_model(tmp_path / "init.safetensors", device="cpu")
    assert torch.equal(target.memory_bank[0], torch.zeros_like(target.memory_bank[0])), "an unknown class starts empty"
    torch.testing.assert_close(target.memory_bank[1], loaded.memory_bank[1])
    torch.testing.assert_close(target.memory_bank[2], loaded.memory_bank[0])
    key = next(k for k in loaded.state_dict() if k != "memory_bank")
    torch.testing.assert_close(target.state_dict()[key], loaded.state_dict()[key])


def test_checkpoint_selection_never_validates_on_held_out_cases_or_references(tmp_path: Path) -> None:
    """Choosing the shipped checkpoint must not peek at the cases the final evaluation scores."""
    from IrisSegmentLib.evaluation.dataset import load_dataset
    from IrisSegmentLib.evaluation.evaluate import heldout_and_training, pick_references
    from IrisSegmentLib.model.config import IrisConfig
    from IrisSegmentLib.model.iris import IrisModel
    from IrisSegmentLib.model.weights import save_model
    from IrisSegmentLib.training.select import main as select_main, validation_cases

    _write_set(tmp_path, "Toy_Select", 10, with_images=True)
    dataset = load_dataset(tmp_path / "Toy_Select")
    heldout, training = heldout_and_training(dataset)
    reference, everything = validation_cases(tmp_path / "Toy_Select", 100)
    assert heldout and sorted(everything) == sorted(set(training) - set(pick_references(dataset, training, 4)))
    assert reference == pick_references(dataset, training, 1)[0]
    _, validation = validation_cases(tmp_path / "Toy_Select", 3)
    assert validation == everything[-3:]

    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2):
        torch.manual_seed(step)
        save_model(IrisModel(IrisConfig()), run / f"iris_step{step:06d}.safetensors", {"steps": step})
    select_main(["--run", str(run), "--data", str(tmp_path), "--sets", "Toy_Select", "--cases", "3", "--threads", "1"])
    report = json.loads((run / "validation.json").read_text())
    assert [r["checkpoint"] for r in report["rows"]] == ["iris_step000001.safetensors", "iris_step000002.safetensors"]
    assert report["sets"]["Toy_Select"]["cases"] == validation
    assert all(0 <= r["Toy_Select"] <= 1 for r in report["rows"])
    assert report["best"] == max(report["rows"], key=lambda r: r["mean"])["checkpoint"]


def _two_rank_bank_update(rank: int, init_file: str, out_dir: str) -> None:
    """One DDP rank (gloo, CPU): rank 0 sees classes 0 and 1, rank 1 sees class 2 and class 0 again."""
    import torch.distributed as dist

    from IrisSegmentLib.training.train import update_memory_bank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    bank = torch.zeros(4, 3, 2)
    bank[0] = 1.0  # class 0 already has an embedding; the others are unseen
    rows = [[0, 1]] if rank == 0 else [[2], [0]]
    tokens = torch.full((len(rows), 2, 3, 2), 10.0 * (rank + 1))  # padded classes beyond rows[e] ride along
    update_memory_bank(bank, rows, tokens, momentum=0.5, capacity=4)
    torch.save(bank, f"{out_dir}/bank{rank}.pt")
    dist.destroy_process_group()


def test_under_ddp_every_rank_keeps_the_same_memory_bank_with_every_class_seen(tmp_path: Path) -> None:
    """Rank 0 saves the checkpoint, so its bank must hold the classes only other ranks saw."""
    torch.multiprocessing.spawn(_two_rank_bank_update, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    banks = [torch.load(tmp_path / f"bank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(banks[0], banks[1])
    expected = torch.zeros(4, 3, 2)
    expected[0] = 0.5 * (0.5 * 1.0 + 0.5 * 10.0) + 0.5 * 20.0  # rank 0's update, then rank 1's
    expected[1], expected[2] = 10.0, 20.0  # first sight: the embedding itself
    torch.testing.assert_close(banks[0], expected)


def test_averaged_checkpoints_are_the_mean_of_their_weights(tmp_path: Path) -> None:
    from engine_fixtures import random_model

    from IrisSegmentLib.errors import WeightsError
    from IrisSegmentLib.model.weights import load_model, save_model
    from IrisSegmentLib.training.average import main as average_main

    a, b = random_model(seed=0), random_model(seed=1)
    save_model(a, tmp_path / "iris_step000010.safetensors", {"steps": 10})
    save_model(b, tmp_path / "iris_step000020.safetensors", {"steps": 20})
    average_main(["--run", str(tmp_path), "--steps", "10", "20", "--output", str(tmp_path / "avg.safetensors")])
    averaged = load_model(tmp_path / "avg.safetensors", "cpu")
    saved = [load_model(tmp_path / f"iris_step0000{s}.safetensors", "cpu") for s in (10, 20)]
    for name, tensor in averaged.state_dict().items():
        torch.testing.assert_close(tensor, (saved[0].state_dict()[name] + saved[1].state_dict()[name]) / 2, rtol=0, atol=2e-3, msg=name)  # float16 storage
    assert averaged.provenance == {"steps": 20, "averaged": ["iris_step000010.safetensors", "iris_step000020.safetensors"]}
    assert averaged.model_id not in (saved[0].model_id, saved[1].model_id)  # tasks of either checkpoint are refused

    save_model(random_model(seed=2, channels=(8, 16, 32, 32)), tmp_path / "iris_step000030.safetensors")
    with pytest.raises(WeightsError, match="other model settings"):
        average_main(["--run", str(tmp_path), "--steps", "10", "30", "--output", str(tmp_path / "bad.safetensors")])


def test_the_matching_loss_joins_training_when_weighted(data_root: Path, tmp_path: Path) -> None:
    """--matching-weight adds the matching loss (inference/matching.py) to the network's: the weights
    record it, and the encoder moves differently from a run without it on the same episodes."""
    from IrisSegmentLib.model.weights import load_model

    common = ["--data", str(data_root), "--patch", str(PATCH), "--steps", "2", "--warmup", "1", "--episodes-per-step", "1",
              "--checkpoint-every", "100"]
    train_main([*common, "--output", str(tmp_path / "plain")])
    train_main([*common, "--output", str(tmp_path / "matched"), "--matching-weight", "0.5"])
    plain = load_model(tmp_path / "plain" / "iris_step000002.safetensors", "cpu")
    matched = load_model(tmp_path / "matched" / "iris_step000002.safetensors", "cpu")
    assert matched.provenance["matching_weight"] == 0.5 and plain.provenance["matching_weight"] == 0.0
    encoder = "encoder.stages.1.0.conv1.0.weight"
    assert not torch.equal(plain.state_dict()[encoder], matched.state_dict()[encoder])
