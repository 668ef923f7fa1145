"""Reference matching (IrisSegmentLib/inference/matching.py): the reference's labels follow its voxels'
features onto the target, survive ensembles, task files and Tune, and make the engine follow a reference of
a structure the network never trained on."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine_fixtures import case, model, predictor, require_data  # noqa: F401
from IrisSegmentLib.embeddings import TaskEmbedding
from IrisSegmentLib.errors import WeightsError
from IrisSegmentLib.evaluation.metrics import dice
from IrisSegmentLib.inference.matching import ClassMap, MatchingMemory, descriptors, drawn_at_stride, matching_loss, pack_cells, spread_cells, unpack_cells
from IrisSegmentLib.model.serialization import load_tensors, save_tensors
from IrisSegmentLib.volume import Volume
from support import DATA, require_paths


def _features(seed: int, flat_coarse: bool = False) -> list[torch.Tensor]:
    """Encoder-like maps of a 16^3 working grid (strides 2, 4, 8, 16), random; with `flat_coarse` the
    stride-8 and -16 maps are zero, so a voxel is described by its stride-4 features alone."""
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(1, c, s, s, s, generator=generator) for c, s in ((4, 8), (8, 4), (16, 2), (32, 1))]
    if flat_coarse:
        maps[2], maps[3] = torch.zeros_like(maps[2]), torch.zeros_like(maps[3])
    return maps


def _masks(seed: int) -> torch.Tensor:
    """Two classes on the 16^3 grid, constant within each 4^3 block (so pooling to stride 4 keeps them)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = (torch.rand(2, 4, 4, 4, generator=generator) > 0.5).float()
    return blocks.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)


def test_descriptors_are_unit_vectors_of_every_stage_at_stride_4() -> None:
    found = descriptors(_features(0))
    assert found.shape == (1, 8 + 16 + 32, 4, 4, 4)
    assert torch.allclose(found.norm(dim=1), torch.ones(1, 4, 4, 4))


def test_a_reference_matched_onto_itself_gets_its_own_masks_back() -> None:
    features, masks = _features(0), _masks(0)
    memory = MatchingMemory.of_reference(features, masks)
    prior = memory.prior(features, (4, 4, 4))
    expected = torch.nn.functional.avg_pool3d(masks[None], 4)[0]
    assert torch.equal(prior > 0.5, expected > 0.5) and (prior - expected).abs().max() < 0.02  # sharp votes, float16 keys
    assert memory.keys.dtype == torch.float16 and memory.masks.shape == (2, memory.keys.shape[0])


def test_labels_move_with_the_features() -> None:
    """A target whose features are the reference's shifted by two stride-4 voxels (four stride-2 voxels of
    the stem) gets the masks shifted alike."""
    features, masks = _features(1, flat_coarse=True), _masks(1)
    memory = MatchingMemory.of_reference(features, masks)
    shifted = [torch.roll(f, (4, 2)[n], dims=2) if n < 2 else f for n, f in enumerate(features)]
    expected = torch.roll(torch.nn.functional.avg_pool3d(masks[None], 4)[0], 2, dims=1)
    prior = memory.prior(shifted, (4, 4, 4))
    assert torch.equal(prior > 0.5, expected > 0.5) and (prior - expected).abs().max() < 0.02


def test_the_band_redraws_a_thin_structure_only_where_the_target_finds_the_reference_exactly() -> None:
    """A slab two voxels thick is half of its stride-4 voxels, which the stride-4 vote never puts above a
    half; the band's stride-2 vote gives it back on the reference itself, and leaves the prior of a
    target with other features (no voxel EXACT_MATCH-similar) as the stride-4 vote made it."""
    features = _features(4)
    masks = torch.zeros(1, 16, 16, 16)
    masks[0, 4:6] = 1
    memory = MatchingMemory.of_reference(features, masks)
    assert memory.band is not None and 0 < memory.band.keys.shape[0] < 8**3
    stride4 = replace(memory, band=None)
    assert dice(stride4.prior(features, (16, 16, 16))[0] > 0.5, masks[0] > 0) == 0
    assert dice(memory.prior(features, (16, 16, 16))[0] > 0.5, masks[0] > 0) > 0.8
    as_new_patient, seen = memory.match(features, (16, 16, 16), exact=False)  # how an ensemble calibrates on its references
    assert torch.equal(as_new_patient, stride4.prior(features, (16, 16, 16))) and not seen.any()
    other = _features(5)
    assert torch.allclose(memory.prior(other, (16, 16, 16)), stride4.prior(other, (16, 16, 16)))


def test_the_band_redraws_a_structure_thinner_than_its_own_voxels_at_the_working_voxels() -> None:
    """A slab one working voxel thick is half of each stride-2 voxel it crosses: band shares of a half
    would lose it or double it. The band keys' 2x2x2 bits put it back voxel for voxel on the reference."""
    features = _features(6)
    masks = torch.zeros(1, 16, 16, 16)
    masks[0, :, 7] = 1
    memory = MatchingMemory.of_reference(features, masks)
    assert memory.band.detail is not None and torch.equal(spread_cells(unpack_cells(pack_cells(masks).flatten(1)).reshape(1, 8, 8, 8, 8)).float(), masks)
    assert dice(memory.prior(features, (16, 16, 16))[0] > 0.5, masks[0] > 0) > 0.95
    shares = replace(memory, band=replace(memory.band, detail=None))  # a band without detail: format 2 task files
    assert dice(shares.prior(features, (16, 16, 16))[0] > 0.5, masks[0] > 0) < 0.8


def test_far_background_is_kept_coarser_than_the_voxels_near_a_class() -> None:
    """Stride-8 blocks out of reach of every class keep one averaged descriptor instead of eight."""
    features = [torch.randn(1, c, s, s, s) for c, s in ((4, 16), (8, 8), (16, 4), (32, 2))]  # a 32^3 working grid
    masks = torch.zeros(1, 32, 32, 32)
    masks[0, :4, :4, :4] = 1  # one stride-8 block in a corner: it and its neighbours (2^3 blocks) stay fine
    memory = MatchingMemory.of_reference(features, masks)
    assert memory.keys.shape[0] == 8 * 8 + (64 - 8)


def _noisy(maps: list[torch.Tensor], amount: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Another scan of the same anatomy: the stride-2 and -4 maps a little off, the flat coarse ones as they are."""
    return [f + amount * torch.randn(f.shape, generator=generator) for f in maps[:2]] + maps[2:]


def _scene_with_a_look_alike() -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Generator]:
    """Reference maps of a 64^3 grid described at stride 4 alone, a target that is another scan of them
    (about 0.93 similar) and, in the target at stride-4 voxels (12..13, 10..11, 10..11), a noisier copy of
    the reference's voxels (2..3, 2..3, 2..3) (about 0.86): a look-alike. The generator goes on from there."""
    generator = torch.Generator().manual_seed(7)
    features = [torch.randn(1, c, s, s, s, generator=generator) for c, s in ((4, 32), (32, 16), (16, 8), (32, 4))]
    features[2], features[3] = torch.zeros_like(features[2]), torch.zeros_like(features[3])
    target = _noisy(features, 0.4, generator)
    target[1][..., 12:14, 10:12, 10:12] = features[1][..., 2:4, 2:4, 2:4] + 0.6 * torch.randn(1, 32, 2, 2, 2, generator=generator)
    return features, target, generator


def test_a_look_alike_away_from_where_the_matched_pairs_place_a_class_gets_no_vote() -> None:
    """The target is another scan of the reference's anatomy (its features a little off, never an exact match)
    lying 20 mm further along x in the scanner, plus a noisier copy of the class's features far from it (a
    look-alike elsewhere in a new patient). Unplaced, the look-alike takes the class; placed, the mutual
    nearest pairs around the class agree on the 20 mm shift, and only the class keeps its vote."""
    features, target, _ = _scene_with_a_look_alike()
    masks = torch.zeros(1, 64, 64, 64)
    masks[0, 8:16, 8:16, 8:16] = 1  # stride-4 voxels 2..3 on each axis
    reference_affine, target_affine = np.eye(4), np.eye(4)
    target_affine[0, 3] = 20.0
    memory = MatchingMemory.of_reference(features, masks, reference_affine)
    inside = memory.masks[0] > 0.5  # every key keeps its own voxel's centre
    assert ((memory.positions[inside] > 8) & (memory.positions[inside] < 16)).all() and int(inside.sum()) == 8
    pool = torch.nn.functional.avg_pool3d
    unplaced = pool(memory.prior(target, (64, 64, 64)), 4)[0]  # on the stride-4 grid
    placed = pool(memory.prior(target, (64, 64, 64), affine=target_affine), 4)[0]
    elsewhere = pool(memory.prior(target, (64, 64, 64), affine=reference_affine), 4)[0]  # the target placed 20 mm off
    assert not memory.match(target, (64, 64, 64))[1].any()  # no exact match anywhere: every vote is cast again
    klass = torch.zeros(16, 16, 16, dtype=torch.bool)
    klass[2:4, 2:4, 2:4] = True
    look_alike = torch.zeros(16, 16, 16, dtype=torch.bool)
    look_alike[12:14, 10:12, 10:12] = True
    assert (unplaced[klass] > 0.5).all() and (unplaced[look_alike] > 0.5).all()
    assert (placed[klass] > 0.5).all() and (placed[look_alike] < 0.01).all()
    assert (elsewhere[look_alike] < 0.01).all()  # the pairs agree on no shift there: the class is still placed ...
    assert float(elsewhere[klass].mean()) == pytest.approx(float(placed[klass].mean()), abs=0.05)  # ... by its pairs, not the scanner


def test_an_ensemble_drops_the_reference_whose_map_puts_the_class_where_the_others_do_not() -> None:
    """Three references of one class. Two show it where it is; the third (a scan of the target's own anatomy)
    has it drawn on the look-alike instead, so its pairs agree on a right map that sends the class there.
    Each alone places the class where its own label says; the ensemble keeps the two whose maps agree on
    where the class lies in the target, and the look-alike gets no vote."""
    features, target, generator = _scene_with_a_look_alike()

    def moved(x: float, y: float) -> np.ndarray:
        affine = np.eye(4)
        affine[:2, 3] = x, y
        return affine

    klass, look_alike = torch.zeros(1, 64, 64, 64), torch.zeros(1, 64, 64, 64)
    klass[0, 8:16, 8:16, 8:16] = 1
    look_alike[0, 48:56, 40:48, 40:48] = 1
    right = MatchingMemory.of_reference(features, klass, moved(0.0, 0.0))
    also_right = MatchingMemory.of_reference(_noisy(features, 0.2, generator), klass, moved(0.0, -10.0))
    stray = MatchingMemory.of_reference(_noisy(target, 0.4, generator), look_alike, moved(-30.0, 0.0))
    ensemble = MatchingMemory.combine([(right, [0]), (also_right, [0]), (stray, [0])])
    target_affine = moved(20.0, 0.0)
    pool = torch.nn.functional.avg_pool3d
    at_class, at_look_alike = (slice(2, 4), slice(2, 4), slice(2, 4)), (slice(12, 14), slice(10, 12), slice(10, 12))  # stride-4 voxels
    stray_alone = pool(stray.prior(target, (64, 64, 64), affine=target_affine), 4)[0]
    assert (stray_alone[at_look_alike] > 0.5).all() and (stray_alone[at_class] < 0.01).all()
    placed = pool(ensemble.prior(target, (64, 64, 64), affine=target_affine), 4)[0]
    assert (placed[at_class] > 0.5).all() and (placed[at_look_alike] < 0.01).all()


def test_an_ensemble_seeks_the_map_at_a_references_own_spacing_only_where_its_pairs_here_agree_on_none() -> None:
    """Two references of one class: one another scan of the target's anatomy, whose pairs agree on a map, and one
    whose features match nothing in the target window (as a reference of another scale can). Only the second is
    sought again at its own spacing (`own_scale`: an encoder pass of the whole target, so never when not needed),
    and the map found there places its votes: the class keeps its vote where it lies and the look-alike gets none."""
    features, target, generator = _scene_with_a_look_alike()
    klass = torch.zeros(1, 64, 64, 64)
    klass[0, 8:16, 8:16, 8:16] = 1
    right = MatchingMemory.of_reference(features, klass, np.eye(4))
    unlike = MatchingMemory.of_reference([torch.randn(f.shape, generator=generator) for f in features], klass, np.diag([1.25, 1.25, 1.25, 1.0]))
    ensemble = MatchingMemory.combine([(right, [0]), (unlike, [0])])
    assert ensemble.spacings.tolist() == [1.0, 1.25]
    target_affine = np.eye(4)
    target_affine[0, 3] = 20.0
    own_map = right.maps_of_reference(target, (64, 64, 64), target_affine, 0)[0]
    asked = []

    def own_scale(reference: int) -> dict[int, ClassMap]:
        asked.append(reference)
        return {0: replace(own_map, reference=reference)}

    placed = torch.nn.functional.avg_pool3d(ensemble.match(target, (64, 64, 64), affine=target_affine, own_scale=own_scale)[0], 4)[0]
    assert asked == [1]
    assert (placed[2:4, 2:4, 2:4] > 0.5).all() and (placed[12:14, 10:12, 10:12] < 0.01).all()
    assert own_map.inliers >= 8 and np.allclose(own_map.centre_in_target(), [31.5, 11.5, 11.5], atol=2.0)  # the class 20 mm on along x


def test_an_ensemble_matches_each_class_only_against_the_references_that_hold_it() -> None:
    """Reference b lacks class 1: its voxels must not vote class 1 absent where they look like a's."""
    features = _features(2)
    a_masks, b_masks = _masks(2), _masks(3)
    a, b = MatchingMemory.of_reference(features, a_masks), MatchingMemory.of_reference(features, b_masks[1:])
    both = MatchingMemory.combine([(a, [0, 1]), (b, [None, 0])])
    assert both.holds.tolist() == [[True, False], [True, True]]
    prior = both.prior(features, (4, 4, 4))
    assert torch.allclose(prior[0], a.prior(features, (4, 4, 4))[0], atol=1e-5)
    assert torch.equal(both.select([1]).holds, torch.tensor([[True, True]]))


def test_the_matching_loss_teaches_features_whose_nearest_reference_voxels_carry_the_label() -> None:
    """Training's matching loss (train.py --matching-weight): optimising the target's features alone
    against it makes the matched prior reproduce most of the target's masks (the votes' gradient reaches
    only the 8 nearest reference voxels, so a few voxels stay where none of those is right: 84 % here,
    from 52 %); a padded class does not count."""
    reference = _features(4)
    target = [f.clone().requires_grad_(True) for f in _features(5)]
    ref_masks, target_masks = _masks(4)[None], _masks(6)[None]
    classes = torch.tensor([[1.0, 1.0]])
    optimizer = torch.optim.Adam(target, lr=0.05)
    first = float(matching_loss(reference, target, ref_masks, target_masks, classes).detach())
    for _ in range(60):
        optimizer.zero_grad()
        matching_loss(reference, target, ref_masks, target_masks, classes).backward()
        optimizer.step()
    last = float(matching_loss(reference, target, ref_masks, target_masks, classes).detach())
    assert last < first / 2, (first, last)
    prior = MatchingMemory.of_reference(reference, ref_masks[0]).prior([f.detach() for f in target], (4, 4, 4))
    assert float(((prior > 0.5) == (torch.nn.functional.avg_pool3d(target_masks, 4)[0] > 0.5)).float().mean()) > 0.8
    padded = matching_loss(reference, target, ref_masks, torch.cat([target_masks[:, :1], 1 - target_masks[:, 1:]], 1), torch.tensor([[1.0, 0.0]]))
    assert torch.isclose(padded, matching_loss(reference, target, ref_masks, target_masks, torch.tensor([[1.0, 0.0]])))


def _task(memory: MatchingMemory | None, shares: list[float]) -> TaskEmbedding:
    return TaskEmbedding(torch.zeros(2, 3, 4), [1, 2], {1: {"name": "a"}, 2: {"name": "b"}}, "MR", 1.0, "m", memory=memory, match_weights=shares)


def test_a_task_file_keeps_its_matching_memory_and_older_files_load_without_one(tmp_path) -> None:
    task = _task(MatchingMemory.of_reference(_features(0), _masks(0), np.diag([2.0, 2.0, 2.0, 1.0])), [1.0, 0.5])
    path = tmp_path / "task.safetensors"
    task.save(path)
    loaded = TaskEmbedding.load(path)
    assert loaded.match_weights == [1.0, 0.5] and torch.equal(loaded.memory.keys, task.memory.keys)
    assert torch.equal(loaded.memory.positions, task.memory.positions) and loaded.memory.band.positions is None
    assert loaded.memory.spacings.tolist() == [2.0] and loaded.memory.band.spacings is None
    assert torch.equal(loaded.memory.holds, task.memory.holds) and torch.equal(loaded.memory.reference, task.memory.reference)
    assert torch.equal(loaded.memory.band.keys, task.memory.band.keys) and torch.equal(loaded.memory.band.masks, task.memory.band.masks)
    assert torch.equal(loaded.memory.band.detail, task.memory.band.detail)

    tensors, meta = load_tensors(path)
    assert "memory_band_masks" not in tensors  # the band's shares are its detail's bits counted
    unplaced = tmp_path / "unplaced.safetensors"  # format 3, written before the keys' positions
    save_tensors(unplaced, {k: v for k, v in tensors.items() if k != "memory_positions"}, {**meta, "format_version": "3"})
    assert TaskEmbedding.load(unplaced).memory.positions is None
    unspaced = tmp_path / "unspaced.safetensors"  # format 4, written before each reference's spacing
    save_tensors(unspaced, {k: v for k, v in tensors.items() if k != "memory_spacings"}, meta)
    assert TaskEmbedding.load(unspaced).memory.spacings is None
    unbanded = tmp_path / "unbanded.safetensors"  # format 2 as written before the boundary band
    save_tensors(unbanded, {k: v for k, v in tensors.items() if not k.startswith("memory_band_")}, {**meta, "format_version": "2"})
    assert TaskEmbedding.load(unbanded).memory.band is None
    shares_only = tmp_path / "shares.safetensors"  # format 2 with the band as stride-2 shares, before its detail
    save_tensors(shares_only, {**{k: v for k, v in tensors.items() if k != "memory_band_detail"},
                               "memory_band_masks": task.memory.band.masks}, {**meta, "format_version": "2"})
    band = TaskEmbedding.load(shares_only).memory.band
    assert band.detail is None and torch.equal(band.masks, task.memory.band.masks)
    older = tmp_path / "older.safetensors"  # format 1, written before matching existed
    save_tensors(older, {"tokens": tensors["tokens"], "fine_tokens": tensors["fine_tokens"]},
                 {**{k: v for k, v in meta.items() if k != "match_weights"}, "format_version": "1"})
    plain = TaskEmbedding.load(older)
    assert plain.memory is None and plain.match_weights == [0.0, 0.0]

    for name, broken in {"nan": {**tensors, "memory_keys": torch.full_like(tensors["memory_keys"], float("nan"))},
                         "band nan": {**tensors, "memory_band_keys": torch.full_like(tensors["memory_band_keys"], float("nan"))},
                         "band of other classes": {**tensors, "memory_band_detail": tensors["memory_band_detail"][:1]},
                         "band detail not bits": {**tensors, "memory_band_detail": tensors["memory_band_detail"].float()},
                         "positions nan": {**tensors, "memory_positions": torch.full_like(tensors["memory_positions"], float("nan"))},
                         "positions of other keys": {**tensors, "memory_positions": tensors["memory_positions"][:3]},
                         "positions not coordinates": {**tensors, "memory_positions": tensors["memory_positions"].to(torch.int32)},
                         "spacings of other references": {**tensors, "memory_spacings": torch.tensor([2.0, 2.0])},
                         "spacings not millimetres": {**tensors, "memory_spacings": tensors["memory_spacings"].to(torch.int32)},
                         "spacing zero": {**tensors, "memory_spacings": torch.zeros(1)},
                         "lost": {k: v for k, v in tensors.items() if not k.startswith("memory_")}}.items():
        save_tensors(tmp_path / f"{name}.safetensors", broken, meta)
        with pytest.raises(WeightsError, match="corrupt"):
            TaskEmbedding.load(tmp_path / f"{name}.safetensors")


def test_an_ensemble_averages_the_matching_shares_of_references_that_have_a_memory() -> None:
    memory = MatchingMemory.of_reference(_features(0), _masks(0), np.eye(4))
    moved = MatchingMemory.of_reference(_features(0), _masks(0), np.diag([2.0, 2.0, 2.0, 1.0]))
    both = TaskEmbedding.ensemble([_task(memory, [1.0, 0.5]), _task(moved, [0.5, 0.5]), _task(None, [0.0, 0.0])])
    assert both.match_weights == [0.75, 0.5]
    assert both.memory.keys.shape[0] == 2 * memory.keys.shape[0] and both.memory.holds.shape == (2, 2)
    assert torch.equal(both.memory.positions, torch.cat([memory.positions, moved.positions]))  # each key its own reference's place
    assert both.memory.spacings.tolist() == [1.0, 2.0]  # each reference's own working spacing
    assert both.memory.band.keys.shape[0] == 2 * memory.band.keys.shape[0] and torch.equal(both.memory.band.holds, both.memory.holds)


def test_matching_makes_the_engine_follow_a_reference_the_network_cannot_segment(predictor) -> None:
    """The small random network knows nothing: alone it misses the hippocampus even on its own scan (Dice
    0.09); the matching, judged necessary for every class, copies the reference back onto itself (0.51 with
    this network's random features, on a stride-4 grid of 3.2 mm voxels). Random features say nothing of
    another patient: the next case is the shipped model's test below."""
    require_data()
    image, labels = case("001")
    alone = predictor.encode_reference(image, labels, matching=False)
    matched = predictor.encode_reference(image, labels)
    assert alone.memory is None and matched.memory is not None and matched.match_weights == [1.0, 1.0]
    assert matched.matching_note().endswith("hippocampus_anterior, hippocampus_posterior") and alone.matching_note() == ""
    truth = labels.array > 0
    network = dice(predictor.segment(image, alone).array > 0, truth)
    own = dice(predictor.segment(image, matched).array > 0, truth)
    assert own > 0.4 and own > network + 0.3, (own, network)


def test_what_the_stride_4_vote_can_draw_of_a_class() -> None:
    block, slab, nothing = torch.zeros(3, 16, 16, 16)
    block[4:12, 4:12, 4:12] = 1  # two stride-4 voxels a side: drawn but for its edges, rounded by the upsampling
    slab[:, :, 7] = 1  # a quarter of the stride-4 voxels it crosses: never above a half
    drawn = drawn_at_stride(torch.stack([block, slab, nothing]), 4)
    assert 0.85 < drawn[0] < 0.9 and drawn[1:] == [0.0, 0.0]


def test_a_known_class_the_matching_cannot_draw_keeps_the_network_but_for_exact_matches(predictor, monkeypatch) -> None:
    """A class the network knows takes a quarter of the matching's vote only where the stride-4 vote can draw
    it well (DRAWN_FOR_KNOWN): the hippocampus, a few stride-4 voxels across, gets none. Where the target is
    the reference itself the exact matches still copy its labels."""
    from IrisSegmentLib.inference import predictor as engine

    require_data()
    image, labels = case("001")
    monkeypatch.setattr(engine, "FIT_BELOW", 0.0)  # the random network "knows" both classes
    task = predictor.encode_reference(image, labels)
    drawn = predictor._drawn_by_matching(task, labels)
    assert all(0.3 < d < engine.DRAWN_FOR_KNOWN for d in drawn), drawn
    assert task.match_weights == [0.0, 0.0]
    monkeypatch.setattr(engine, "DRAWN_FOR_KNOWN", 0.0)
    assert predictor.encode_reference(image, labels).match_weights == [engine.KNOWN_MATCH_WEIGHT] * 2
    truth = labels.array > 0
    network = dice(predictor.segment(image, replace(task, memory=None, match_weights=[0.0, 0.0])).array > 0, truth)
    own = dice(predictor.segment(image, task).array > 0, truth)
    assert own > network + 0.2, (own, network)  # 0.33 against 0.09: fewer voxels match exactly than share 1 takes (0.51 above)


def test_the_reference_is_also_remembered_as_a_target_would_be_seen(predictor) -> None:
    """The tokens come from the crop around the classes; the matching memory holds the reference on that
    crop and on the grid the same scan gets as a target, voxel for voxel, so that segmenting the reference
    itself finds each voxel's own features."""
    require_data()
    image, labels = case("001")
    task = predictor.encode_reference(image, labels)
    _, spacing, views = predictor.reference_on_grid(image, labels, task.label_values, task.segments, task.modality)
    assert len(views) == 2 and spacing == task.spacing
    _, target_grid = predictor._working_target(image, task.modality, task.spacing)
    assert views[1][0].shape == target_grid.shape and np.allclose(views[1][0].affine, target_grid.affine)
    alone = [MatchingMemory.of_reference(predictor.model.encoder(pixels[None]), masks) for _, pixels, masks in views]
    assert task.memory.keys.shape[0] == sum(m.keys.shape[0] for m in alone) and task.memory.holds.shape == (2, 1)


def test_tune_adds_the_corrected_scan_to_the_matching_memory(predictor) -> None:
    require_data()
    task = predictor.encode_reference(*case("001"))
    image, corrected = case("003")
    tuned = predictor.tune(task, image, corrected, steps=1, views=0)
    assert predictor.tuning_joined and tuned.memory.holds.shape == (2, 2) and tuned.memory.holds.all()
    assert tuned.memory.keys.shape[0] > task.memory.keys.shape[0]


def test_the_shipped_model_follows_a_reference_of_a_structure_it_never_trained_on() -> None:
    """Prostate_MR is held out of training (Resources/splits.json): with the reference as the target the
    engine must give the reference back (the network alone scored 0.19 here, the matching 0.97), and on the
    next case the matching must beat the network alone (0.56 against 0.47 for prostate_000 -> prostate_005)."""
    from IrisSegmentLib.evaluation.dataset import load_dataset, read_case
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import default_weights_path, load_model

    require_paths(DATA / "Prostate_MR")
    if not default_weights_path().is_file():
        pytest.skip(f"the shipped weights are not at {default_weights_path()}")
    dataset = load_dataset(DATA / "Prostate_MR")
    image, labels = read_case(dataset.case(sorted(dataset.case_ids)[0]))
    predictor = IrisPredictor(load_model(None, "cpu"))
    task = predictor.encode_reference(image, labels)
    result = predictor.segment(image, task)
    assert dice(result.array > 0, np.asarray(labels.array) > 0) > 0.9
    assert isinstance(result, Volume) and result.shape == image.shape
    target, truth = read_case(dataset.case(sorted(dataset.case_ids)[5]))
    matched = dice(predictor.segment(target, task).array > 0, np.asarray(truth.array) > 0)
    alone = dice(predictor.segment(target, predictor.encode_reference(image, labels, matching=False)).array > 0, np.asarray(truth.array) > 0)
    assert matched > alone + 0.05, (matched, alone)


def test_a_context_ensemble_keeps_the_reference_whose_map_only_its_own_spacing_finds() -> None:
    """Fetal_Brain_MRI is held out of training. fetal_t30_axial1 is an older fetus (a 324 cm3 brain) than
    fetal_run6, run4 and run3 (150 cm3): run6 alone segments it with 0.69 Dice. With the three as an ensemble
    every map was sought at their median spacing, 3.26 mm, where run6's pairs agree on none (23 do at its own
    3.52 mm) and run3's wrong map placed the brain elsewhere: 0.000. Sought again at run6's own spacing, the
    ensemble must keep the brain."""
    from IrisSegmentLib.evaluation.dataset import load_dataset, read_case
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.model.weights import default_weights_path, load_model

    require_paths(DATA / "Fetal_Brain_MRI")
    if not default_weights_path().is_file():
        pytest.skip(f"the shipped weights are not at {default_weights_path()}")
    dataset = load_dataset(DATA / "Fetal_Brain_MRI")
    predictor = IrisPredictor(load_model(None, "cpu"))
    tasks = [predictor.encode_reference(*read_case(dataset.case(c)), skip_small=True) for c in ("fetal_run6", "fetal_run4", "fetal_run3")]
    target, truth = read_case(dataset.case("fetal_t30_axial1"))
    assert dice(predictor.segment(target, TaskEmbedding.ensemble(tasks)).array > 0, np.asarray(truth.array) > 0) > 0.6


def test_a_thin_class_the_network_does_not_know_is_found_in_the_band_and_matched_again_at_the_finer_spacing(predictor, tmp_path) -> None:
    """A rod 10 mm across is 4 voxels of the small network's 2.5 mm working grid, one voxel of the
    matching's stride-4 grid, where the stride-4 vote alone loses it (Dice 0); the boundary band's
    stride-2 vote finds it (0.93). Its second pass, in a crop at 1.25 mm seeded from there, is the
    matching's against the reference's own crop (the network knows nothing): from the stride-4 seed alone
    it gets 0.84. The crop's memory travels with the task file."""
    rng = np.random.default_rng(0)
    i, j, k = np.indices((160,) * 3)
    rod = ((j - 130) ** 2 + (k - 120) ** 2 <= 5**2) & (i > 40) & (i < 120)
    ball = (i - 60) ** 2 + (j - 80) ** 2 + (k - 80) ** 2 <= 40**2
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    image = Volume((rng.normal(100, 10, rod.shape) + 200 * ball + 300 * rod).astype(np.float32), affine, "rod")
    labels = Volume(np.where(rod, 2, np.where(ball, 1, 0)).astype(np.uint8), affine.copy(), "rod labels", {1: {"name": "ball"}, 2: {"name": "rod"}})
    task = predictor.encode_reference(image, labels)
    assert task.match_weights == [1.0, 1.0] and task.refined == [1] and task.fine_memory is not None
    assert task.fine_memory.holds[:, 0].tolist() == [False, True]  # one crop, holding the rod only
    passes = predictor.decoder_passes
    assert dice(predictor.segment(image, task).array == 2, rod) > 0.9
    assert predictor.decoder_passes > passes + 1  # the first pass and the rod's crop
    assert dice(predictor.segment(image, task, refine=False).array == 2, rod) > 0.85
    unbanded = replace(task, memory=replace(task.memory, band=None), fine_memory=replace(task.fine_memory, band=None))
    assert dice(predictor.segment(image, unbanded, refine=False).array == 2, rod) < 0.1
    assert dice(predictor.segment(image, unbanded).array == 2, rod) > 0.8
    task.save(tmp_path / "rod.safetensors")
    loaded = TaskEmbedding.load(tmp_path / "rod.safetensors")
    assert torch.equal(loaded.fine_memory.keys, task.fine_memory.keys) and torch.equal(loaded.fine_memory.holds, task.fine_memory.holds)
    assert loaded.select(["rod"]).fine_memory.masks.shape[0] == 1
