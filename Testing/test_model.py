"""The network and its files: all classes in one decoder pass, the exact high-resolution foreground pooling,
the pixel (un)shuffle, the loss against MONAI, bit-exact weight files, safetensors compatibility both ways,
and the config identity that decides which task files fit which weights."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_fixtures import CallCounter, random_model, small_config
from IrisSegmentLib.embeddings import TaskEmbedding
from IrisSegmentLib.inference.predictor import IrisPredictor
from IrisSegmentLib.model.config import IrisConfig
from IrisSegmentLib.model.loss import dice_bce_loss
from IrisSegmentLib.model.serialization import load_tensors, save_tensors
from IrisSegmentLib.model.task_encoder import LevelTaskEncoder, pixel_shuffle_3d, pixel_unshuffle_3d, upsampling_adjoint
from IrisSegmentLib.model.weights import load_model, save_model
from IrisSegmentLib.training.data import Episode, stack_episodes
from IrisSegmentLib.volume import Volume


def _blobby_image(shape=(32, 32, 32), seed=0) -> np.ndarray:
    """A smooth synthetic scan (no shared data needed): a few bright blobs on a dark background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    image = np.zeros(shape, np.float32)
    for _ in range(4):
        center = rng.uniform(6, np.array(shape) - 6)
        image += 100 * np.exp(-((grid - center) ** 2).sum(-1) / (2 * rng.uniform(2, 5) ** 2))
    return image + rng.normal(0, 2, shape).astype(np.float32)


# ---------------------------------------------------------------- one decoder pass for K classes
def test_all_classes_come_out_of_one_decoder_pass():
    model = random_model(0)
    config = model.config
    k = 3
    image = torch.randn(1, 1, 32, 32, 32)
    tokens = torch.randn(1, k, config.tokens_per_class, config.token_dim)
    with CallCounter(model.decoder) as decoder, torch.no_grad():
        logits = model.segment(image, tokens)
    assert decoder.calls == 1
    assert tuple(logits.shape) == (1, k, 32, 32, 32)
    # The K maps are different classes, not one map repeated.
    assert not torch.allclose(logits[0, 0], logits[0, 1])


def test_predictor_segments_every_class_of_a_task_in_one_decoder_pass():
    model = random_model(0)
    predictor = IrisPredictor(model)
    config = model.config
    k = 3
    torch.manual_seed(1)
    task = TaskEmbedding(
        torch.randn(k, config.tokens_per_class, config.token_dim), [1, 4, 9], {}, "MR", 0.0, predictor.model_id
    )
    target = Volume(_blobby_image(), np.diag([1.0, 1.0, 1.0, 1.0]), name="blobs")
    with CallCounter(model.decoder) as decoder:
        result = predictor.segment(target, task)
    assert decoder.calls == 1 and predictor.decoder_passes == 1
    (features, tokens, _size) = decoder.inputs[0]
    assert tuple(tokens.shape) == (1, k, config.tokens_per_class, config.token_dim)
    assert tuple(decoder.outputs[0].shape[:2]) == (1, k)
    assert result.shape == target.shape
    assert set(np.unique(result.array)) <= {0, 1, 4, 9}


def test_task_tokens_have_one_row_per_class():
    model = random_model(0)
    config = model.config
    image = torch.randn(1, 1, 32, 32, 32)
    masks = (torch.rand(1, 2, 32, 32, 32) > 0.8).float()
    with torch.no_grad():
        tokens = model.encode_task(image, masks)
    assert tuple(tokens.shape) == (1, 2, config.tokens_per_class, config.token_dim)


def test_many_classes_are_encoded_in_chunks_with_the_same_tokens_and_one_encoder_pass():
    """encode_task runs the task encoder on TASK_CLASSES_PER_PASS classes at a time (memory), which must
    not change any class's tokens: the task encoder treats every class on its own."""
    from IrisSegmentLib.model.iris import TASK_CLASSES_PER_PASS

    model = random_model(0)
    k = 2 * TASK_CLASSES_PER_PASS + 3
    torch.manual_seed(2)
    image = torch.randn(1, 1, 32, 32, 32)
    masks = (torch.rand(1, k, 32, 32, 32) > 0.7).float()
    with CallCounter(model.encoder) as encoder, CallCounter(model.task_encoder) as task_encoder, torch.no_grad():
        chunked = model.encode_task(image, masks)
    assert encoder.calls == 1 and task_encoder.calls == 3
    with torch.no_grad():
        whole = model.task_encoder(model.encoder(image), masks)
        alone = model.task_encoder(model.encoder(image), masks[:, -1:])
    assert chunked.shape == whole.shape
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked[:, -1:], alone, rtol=1e-5, atol=1e-5)


def test_a_training_batch_pads_classes_without_changing_any_episode():
    """Episodes of different K are stacked and padded to one K for batched (oneDNN) convolutions;
    each episode's logits and tokens must equal what it gives alone, unpadded."""
    model = random_model(0)
    g = torch.Generator().manual_seed(3)

    def episode(k: int, keys: list[str]) -> Episode:
        image, query = torch.randn(2, 1, 1, 32, 32, 32, generator=g)
        masks = (torch.rand(2, 1, k, 32, 32, 32, generator=g) > 0.85).float()
        return Episode(image, masks[0], query, masks[1], keys)

    episodes = [episode(3, ["a", "b", "c"]), episode(1, ["d"])]
    batch = stack_episodes(episodes)
    assert batch.classes.tolist() == [[True, True, True], [True, False, False]]
    assert batch.class_keys == [["a", "b", "c"], ["d"]]
    with torch.no_grad():
        logits, tokens = model(batch.reference, batch.reference_masks, batch.query, batch.classes)
        for b, ep in enumerate(episodes):
            alone_logits, alone_tokens = model(ep.reference, ep.reference_masks, ep.query)
            k = len(ep.class_keys)
            torch.testing.assert_close(logits[b : b + 1, :k], alone_logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(tokens[b : b + 1, :k], alone_tokens, rtol=1e-4, atol=1e-4)
    # Padded classes carry no loss: a loss weighted by the class mask ignores whatever they predict.
    target = batch.query_masks
    scrambled = logits.clone()
    scrambled[1, 1:] = 100.0
    weight = batch.classes.float()
    assert float(dice_bce_loss(scrambled, target, weight)) == pytest.approx(float(dice_bce_loss(logits, target, weight)), abs=1e-6)


# ---------------------------------------------------------------- high-resolution foreground pooling
@pytest.mark.parametrize(
    "feature_size, mask_size",
    [((2, 3, 4), (8, 12, 16)), ((3, 4, 5), (10, 13, 17)), ((4, 4, 4), (4, 4, 4)), ((2, 2, 2), (32, 32, 32))],
)
def test_upsampling_adjoint_equals_pooling_upsampled_features(feature_size, mask_size):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 5, *feature_size, generator=g, dtype=torch.float64)
    masks = (torch.rand(2, 3, *mask_size, generator=g, dtype=torch.float64) > 0.6).double()
    upsampled = F.interpolate(features, size=mask_size, mode="trilinear", align_corners=False)
    explicit = torch.einsum("bcdhw,bkdhw->bkc", upsampled, masks)
    weights = upsampling_adjoint(masks, feature_size)
    assert tuple(weights.shape) == (2, 3, *feature_size)
    pooled = torch.einsum("bcdhw,bkdhw->bkc", features, weights)
    torch.testing.assert_close(pooled, explicit, rtol=1e-10, atol=1e-10)


def test_foreground_token_is_the_mean_of_upsampled_features_inside_the_mask():
    config = small_config()
    torch.manual_seed(0)
    encoder = LevelTaskEncoder(64, config).eval()
    features = torch.randn(1, 64, 2, 3, 2)
    masks = torch.zeros(1, 2, 32, 48, 32)
    masks[0, 0, 3:9, 20:30, 5:12] = 1
    masks[0, 1, 17, 40, 30] = 1  # a single voxel: exactly what coarse pooling would blur away
    with torch.no_grad():
        tokens = encoder(features, masks)
        upsampled = F.interpolate(features, size=masks.shape[2:], mode="trilinear", align_corners=False)
        mean = torch.einsum("bcdhw,bkdhw->bkc", upsampled, masks) / masks.flatten(2).sum(-1)[..., None]
        expected = encoder.to_fg(mean)
    assert tuple(tokens.shape) == (1, 2, 1 + config.context_tokens, config.token_dim)
    torch.testing.assert_close(tokens[:, :, 0], expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- pixel (un)shuffle
@pytest.mark.parametrize("r", [2, 3])
def test_pixel_shuffle_and_unshuffle_are_inverses(r):
    x = torch.randn(2, 2 * r**3, 3, 4, 5)
    y = pixel_shuffle_3d(x, r)
    assert tuple(y.shape) == (2, 2, 3 * r, 4 * r, 5 * r)
    assert torch.equal(pixel_unshuffle_3d(y, r), x)
    z = torch.randn(2, 3, 2 * r, 3 * r, 4 * r)
    assert torch.equal(pixel_shuffle_3d(pixel_unshuffle_3d(z, r), r), z)
    # Layout: channel c*r^3 + i*r^2 + j*r + k goes to the sub-voxel (i, j, k) of each coarse voxel,
    # the 3D form of torch's pixel_shuffle convention (so neighbours stay neighbours).
    for i in range(r):
        for j in range(r):
            for k in range(r):
                assert torch.equal(y[:, :, i::r, j::r, k::r], x[:, i * r * r + j * r + k :: r**3])


# ---------------------------------------------------------------- loss
def _monai_dice_bce(logits, target):
    monai_losses = pytest.importorskip("monai.losses")
    dice = monai_losses.DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, reduction="mean", batch=False)
    return dice(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dice_bce_loss_matches_monai_dice_plus_torch_bce(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 3, 6, 7, 8, generator=g, dtype=torch.float64)).to(dtype)
    target = (torch.rand(2, 3, 6, 7, 8, generator=g, dtype=torch.float64) > 0.7).to(dtype)
    target[1, 2] = 0  # an empty (case, class): the smoothing terms decide its Dice
    target[0, 1] = 1  # a full one
    ours_logits = logits.clone().requires_grad_(True)
    ref_logits = logits.clone().requires_grad_(True)
    ours = dice_bce_loss(ours_logits, target)
    ref = _monai_dice_bce(ref_logits, target)
    assert abs(ours.item() - ref.item()) < 1e-5
    ours.backward()
    ref.backward()
    # Tuning follows this gradient: it must be MONAI's too.
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-4, atol=1e-7)


def test_dice_bce_loss_is_per_case_and_class_then_averaged():
    """Not a Dice over the whole batch: a perfect case does not hide a failed one."""
    g = torch.Generator().manual_seed(1)
    target = (torch.rand(2, 1, 8, 8, 8, generator=g) > 0.5).float()
    perfect = 20 * (2 * target[:1] - 1)
    wrong = -20 * (2 * target[1:] - 1)
    both = dice_bce_loss(torch.cat([perfect, wrong]), target)
    assert float(dice_bce_loss(perfect, target[:1])) < 1e-3
    expected = (dice_bce_loss(perfect, target[:1]) + dice_bce_loss(wrong, target[1:])) / 2
    assert abs(float(both) - float(expected)) < 1e-5


def test_dice_bce_loss_class_weights_per_case_and_class():
    monai_losses = pytest.importorskip("monai.losses")
    g = torch.Generator().manual_seed(2)
    logits = 2 * torch.randn(2, 3, 5, 6, 7, generator=g, dtype=torch.float64)
    target = (torch.rand(2, 3, 5, 6, 7, generator=g, dtype=torch.float64) > 0.6).double()
    weight = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    dice = monai_losses.DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, reduction="none")(logits, target).reshape(2, 3)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((2, 3, 4))
    expected = ((dice + bce) * weight).sum() / weight.sum()
    assert abs(float(dice_bce_loss(logits, target, weight)) - float(expected)) < 1e-6


# ---------------------------------------------------------------- weights files
def _round_to_float16(model) -> None:
    """save_model stores float16; a model already at float16 precision must come back bit-exact."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())


def test_weights_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = random_model(3, memory_classes=("SetA/x", "SetB/y"))
    with torch.no_grad():
        model.memory_bank.normal_()
    _round_to_float16(model)
    path = tmp_path / "w.safetensors"
    save_model(model, path, provenance={"data": "unit test", "steps": 0})
    loaded = load_model(path, "cpu")
    assert loaded.config == model.config
    assert not loaded.training
    assert loaded.provenance == {"data": "unit test", "steps": 0}
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(original_state) == set(loaded_state)
    for name, tensor in original_state.items():
        assert loaded_state[name].dtype == tensor.dtype, name
        assert torch.equal(loaded_state[name], tensor), name
    torch.manual_seed(0)
    image = torch.randn(1, 1, 32, 32, 32)
    masks = (torch.rand(1, 2, 32, 32, 32) > 0.7).float()
    with torch.no_grad():
        a = model.segment(image, model.encode_task(image, masks))
        b = loaded.segment(image, loaded.encode_task(image, masks))
    assert torch.equal(a, b)
    # Same file, same id; saving the loaded model again changes nothing that identifies it.
    assert load_model(path, "cpu").model_id == loaded.model_id
    assert loaded.model_id.startswith(model.config.architecture_id())
    save_model(loaded, tmp_path / "again.safetensors", provenance=loaded.provenance)
    assert load_model(tmp_path / "again.safetensors", "cpu").model_id == loaded.model_id


def test_float16_weights_barely_change_the_output(tmp_path):
    """save_model halves the file by storing float16 and promises no measurable change in output."""
    model = random_model(4)
    save_model(model, tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", "cpu")
    torch.manual_seed(0)
    image = torch.randn(1, 1, 32, 32, 32)
    masks = (torch.rand(1, 2, 32, 32, 32) > 0.7).float()
    with torch.no_grad():
        a = torch.sigmoid(model.segment(image, model.encode_task(image, masks)))
        b = torch.sigmoid(loaded.segment(image, loaded.encode_task(image, masks)))
    assert float((a - b).abs().max()) < 1e-2


def test_different_weights_get_different_model_ids(tmp_path):
    save_model(random_model(0), tmp_path / "a.safetensors")
    save_model(random_model(1), tmp_path / "b.safetensors")
    a, b = load_model(tmp_path / "a.safetensors", "cpu"), load_model(tmp_path / "b.safetensors", "cpu")
    assert a.config.architecture_id() == b.config.architecture_id()
    assert a.model_id != b.model_id


# ---------------------------------------------------------------- safetensors compatibility
def _arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "f64": rng.standard_normal(5),
        "i64": rng.integers(-(2**40), 2**40, (4, 2)),
        "i32": rng.integers(-1000, 1000, 7).astype(np.int32),
        "i16": rng.integers(-1000, 1000, (2, 2)).astype(np.int16),
        "u8": rng.integers(0, 255, (3, 3, 3)).astype(np.uint8),
        "bool": rng.random((4, 5)) > 0.5,
        "scalar": np.array(3.25, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    }


METADATA = {"format": "something", "note": "unicode µm ✓", "json": json.dumps({"a": [1, 2]})}


def test_our_safetensors_files_are_read_by_the_safetensors_package(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    arrays = _arrays()
    path = tmp_path / "ours.safetensors"
    save_tensors(path, arrays, METADATA)
    loaded = st_numpy.load_file(str(path))
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert np.array_equal(loaded[name], array), name
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == METADATA
    # Torch tensors (what save_model passes) too.
    save_tensors(tmp_path / "torch.safetensors", {"w": torch.arange(6.0).reshape(2, 3).half()}, {})
    assert np.array_equal(st_numpy.load_file(str(tmp_path / "torch.safetensors"))["w"], np.arange(6.0, dtype=np.float16).reshape(2, 3))


def test_safetensors_package_files_are_read_by_us(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {k: np.ascontiguousarray(v) for k, v in _arrays().items()}
    path = tmp_path / "theirs.safetensors"
    st_numpy.save_file(arrays, str(path), metadata=METADATA)
    tensors, metadata = load_tensors(path)
    assert metadata == METADATA
    assert set(tensors) == set(arrays)
    for name, array in arrays.items():
        assert isinstance(tensors[name], torch.Tensor)
        assert tensors[name].numpy().dtype == array.dtype, name
        assert np.array_equal(tensors[name].numpy(), array), name


def test_task_file_is_a_plain_safetensors_file(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    tokens = torch.randn(2, 3, 4)
    task = TaskEmbedding(tokens, [1, 5], {1: {"name": "liver"}, 5: {"name": "spleen"}}, "CT", 1.5, "arch-weights")
    task.save(tmp_path / "task.safetensors")
    assert np.array_equal(st_numpy.load_file(str(tmp_path / "task.safetensors"))["tokens"], tokens.numpy())


# ---------------------------------------------------------------- config identity
def test_config_json_round_trip():
    config = small_config(memory_classes=("Abdomen_MRI/liver", "Brain_T1/hippocampus"), blocks_per_stage=2)
    again = IrisConfig.from_json(config.to_json())
    assert again == config
    assert isinstance(again.channels, tuple) and isinstance(again.memory_classes, tuple)
    assert hash(again) == hash(config)
    assert again.architecture_id() == config.architecture_id()


def test_architecture_id_follows_the_weights_shape_only():
    base = small_config()
    assert base.architecture_id() == small_config().architecture_id()
    assert replace(base, channels=(8, 16, 32, 128)).architecture_id() != base.architecture_id()
    assert replace(base, token_dim=64).architecture_id() != base.architecture_id()
    # Inference settings that leave the weights' shapes alone keep the id (task files stay valid).
    assert replace(base, working_size=128).architecture_id() == base.architecture_id()
    assert replace(base, memory_classes=("A/x",)).architecture_id() == base.architecture_id()


def test_config_with_unknown_settings_is_refused():
    raw = json.loads(small_config().to_json())
    raw["mystery"] = 1
    with pytest.raises(ValueError, match="mystery"):
        IrisConfig.from_json(json.dumps(raw))
