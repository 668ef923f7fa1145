"""The Slicer panel's session on a real MRML scene (slicer-core) with the bundled sample pair.

What a user meets across actions, not within one: the sample data the module registers with Sample
Data; switching the device keeps the segmented task; exports never load the model (nor torch); Tune
keeps segments the user added; IrisSegment's writes and the Segment Editor's undo history (Slicer's own
vtkSegmentationHistory, which the editor's Undo uses) keep each other's work; closing the scene resets
the session; saving a task where it cannot be written is a message.

The sample pair is tiny (35 x 51 x 35 voxels) and the model a small random one, so these run in seconds;
what they check is the session's bookkeeping, not segmentation quality.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (Slicer's Qt-free libraries, the 'test' extra) is not installed")
import torch  # noqa: E402
from slicer_scene import mrml_scene  # noqa: E402,F401  (fixture)

from IrisSegmentLib.errors import Cancelled, InputError  # noqa: E402
from IrisSegmentLib.inference.predictor import IrisPredictor  # noqa: E402
from IrisSegmentLib.io import read_label_map  # noqa: E402
from IrisSegmentLib.model.config import IrisConfig  # noqa: E402
from IrisSegmentLib.model.iris import IrisModel  # noqa: E402
from IrisSegmentLib.model.weights import save_model  # noqa: E402
from IrisSegmentLib.slicer_logic import IrisSceneLogic, Reference, sample_data, scene_bridge  # noqa: E402

TESTING = Path(__file__).resolve().parent
ROOT = TESTING.parent
SAMPLE_CLASSES = ["hippocampus anterior", "hippocampus posterior"]


def _small_model(seed: int = 0) -> IrisModel:
    torch.manual_seed(seed)
    return IrisModel(IrisConfig(channels=(8, 16, 32, 64), token_dim=32, context_tokens=4, working_size=64))


def _run(job, timeout: float = 300.0):
    """Collect a job as the panel does (Job.tick: wait on it, then progress and poll)."""
    deadline = time.monotonic() + timeout
    while not job.tick(wait=0.02)[1]:
        assert time.monotonic() < deadline, f"{job.title} did not finish within {timeout} s"
    return job.result()


def _masks(node, geometry) -> dict[str, np.ndarray]:
    return {
        node.GetSegmentation().GetSegment(i).GetName(): slicer.util.arrayFromSegmentBinaryLabelmap(node, i, geometry) > 0
        for i in scene_bridge.segment_ids(node)
    }


def _names(node) -> list[str]:
    return [node.GetSegmentation().GetSegment(i).GetName() for i in scene_bridge.segment_ids(node)]


def _paint(node, name: str, mask: np.ndarray, geometry) -> None:
    """Redraw one segment (adding it if it is new) with the Segment Editor's default masking: it
    overwrites the other segments."""
    segmentation = node.GetSegmentation()
    if not segmentation.GetSegmentIdBySegmentName(name):
        segmentation.AddEmptySegment("", name, [1.0, 1.0, 0.0])
    for segment_id in scene_bridge.segment_ids(node):
        if segmentation.GetSegment(segment_id).GetName() == name:
            voxels = mask
        else:
            voxels = (slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, geometry) > 0) & ~mask
        slicer.util.updateSegmentBinaryLabelmapFromArray(voxels.astype(np.uint8), node, segment_id, geometry)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture
def sample(mrml_scene):
    loaded = sample_data.load_sample()
    truth = _masks(sample_data.load_target_truth(), loaded.target)
    return SimpleNamespace(**vars(loaded), truth=truth, reference_source=Reference(loaded.reference, loaded.reference_segmentation))


@pytest.fixture
def logic():
    logic = IrisSceneLogic(predictor=IrisPredictor(_small_model()))
    yield logic
    logic.shutdown()


# ---------------------------------------------------------------------------------------- sample data


def test_sample_data_registration_points_at_the_bundled_files_with_their_checksums(tmp_path: Path) -> None:
    """What the module hands to SampleDataLogic.registerCustomSampleDataSource: local URLs that Sample
    Data's own download call (urllib's urlretrieve) copies, with SHA256 checksums that match."""
    source = sample_data.sample_data_source(thumbnail="icon.png")
    count = len(source["uris"])
    assert count == 3 and all(len(source[k]) == count for k in ("fileNames", "nodeNames", "loadFileTypes", "checksums"))
    assert source["loadFileTypes"] == ["VolumeFile", "SegmentationFile", "VolumeFile"]
    for uri, name, checksum in zip(source["uris"], source["fileNames"], source["checksums"]):
        copy = tmp_path / name
        urllib.request.urlretrieve(uri, copy)
        assert checksum == "SHA256:" + hashlib.sha256(copy.read_bytes()).hexdigest()
        assert copy.read_bytes() == (ROOT / "Resources" / "SampleData" / name).read_bytes()


def test_the_sample_loads_as_a_user_would_have_it(sample) -> None:
    """Named, colored segments from the color table, on the reference's grid, voxel for voxel the label file."""
    assert _names(sample.reference_segmentation) == SAMPLE_CLASSES
    colors = [tuple(round(c * 255) for c in sample.reference_segmentation.GetSegmentation().GetSegment(i).GetColor())
              for i in scene_bridge.segment_ids(sample.reference_segmentation)]
    assert colors == [(230, 120, 80), (90, 160, 230)]
    labels = read_label_map(ROOT / "Resources" / "SampleData" / "reference_labels.nii.gz").array.transpose(2, 1, 0)
    masks = _masks(sample.reference_segmentation, sample.reference)
    assert np.array_equal(masks["hippocampus anterior"], labels == 1) and np.array_equal(masks["hippocampus posterior"], labels == 2)
    assert sum(m.sum() for m in sample.truth.values()) > 0
    assert not any(node.IsA("vtkMRMLColorTableNode") and not node.GetSingletonTag() for node in _user_nodes())  # no helper left


def _user_nodes():
    scene = slicer.mrmlScene
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]


# ---------------------------------------------------------------------------------------- device, export


def test_switching_the_device_keeps_the_segmented_task(sample, tmp_path: Path) -> None:
    """Segment, change Device, Tune: the task is still there (the same weights, reloaded on the new
    device). Other weights do drop it: its embeddings fit only the model that made them."""
    weights = tmp_path / "small.safetensors"
    save_model(_small_model(), weights)
    logic = IrisSceneLogic(weights=weights, device="auto")
    try:
        output = _run(logic.start_segment(sample.target, [sample.reference_source]))
        task, first_model = logic.task, logic.predictor
        logic.set_model(weights, "cpu")
        assert logic.task is task and logic.predictor is None  # reloaded by the next job, on the CPU
        _paint(output, "hippocampus posterior", sample.truth["hippocampus posterior"], sample.target)
        _run(logic.start_tune(sample.target, output, steps=1))
        assert logic.predictor is not first_model and logic.on_cpu and logic.task is not task

        other = tmp_path / "other.safetensors"
        save_model(_small_model(seed=1), other)
        logic.set_model(other, "cpu")
        assert logic.task is None
        with pytest.raises(InputError, match="Segment first"):
            logic.start_tune(sample.target, output, steps=1)
    finally:
        logic.shutdown()


def test_exports_need_neither_the_model_nor_torch(sample, logic, tmp_path: Path) -> None:
    """The panel exports through scene_bridge, which imports no torch: a fresh Python exports the
    sample's segmentation without torch ever being imported (so without the PyTorch install prompt)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTING)!r})
        import slicer
        from slicer_scene import scene_context
        from IrisSegmentLib.slicer_logic import sample_data, scene_bridge
        with scene_context():
            sample = sample_data.load_sample()
            labelmap = scene_bridge.export_labelmap(sample.reference_segmentation, sample.reference)
            written = scene_bridge.export_file(sample.reference_segmentation, sample.reference, {str(tmp_path / "out.nii.gz")!r})
            values = sorted(set(slicer.util.arrayFromVolume(labelmap).ravel().tolist()))
        print(values, len(written), "torch" in sys.modules)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[-2] == "[0, 1, 2] 2 False"
    assert read_label_map(tmp_path / "out.nii.gz").segments[1]["name"] in ("hippocampus anterior", "hippocampus_anterior")

    # The logic's own export methods are the same functions: no model is loaded for them either.
    fresh = IrisSceneLogic(weights=tmp_path / "never-loaded.safetensors")
    try:
        fresh.export_file(sample.reference_segmentation, tmp_path / "again.seg.nrrd", sample.reference)
        assert fresh.predictor is None
    finally:
        fresh.shutdown()


def test_the_out_of_memory_error_comes_from_what_torch_has() -> None:
    """torch < 2.5 (the last torch for Intel Macs is 2.2) has no torch.OutOfMemoryError: the logic then
    catches torch.cuda.OutOfMemoryError, and still imports."""
    script = textwrap.dedent("""
        import torch
        del torch.OutOfMemoryError
        from IrisSegmentLib.slicer_logic import logic
        print(logic.OutOfMemoryError is torch.cuda.OutOfMemoryError)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0 and run.stdout.split() == ["True"], run.stderr[-3000:]


# ---------------------------------------------------------------------------------------- tune and undo


def test_tune_keeps_the_segments_the_user_added(sample, logic) -> None:
    """A segment the user painted into the output that is none of the task's classes survives Tune,
    unchanged, after the classes; the logic names it for the panel's status line; Undo restores all."""
    output = _run(logic.start_segment(sample.target, [sample.reference_source]))
    _paint(output, "hippocampus posterior", sample.truth["hippocampus posterior"], sample.target)
    lesion = np.zeros_like(sample.truth["hippocampus anterior"])
    lesion[10:14, 20:26, 12:16] = True
    _paint(output, "lesion", lesion, sample.target)
    before = _masks(output, sample.target)

    _run(logic.start_tune(sample.target, output, steps=1))

    assert _names(output) == [*SAMPLE_CLASSES, "lesion"]
    assert np.array_equal(_masks(output, sample.target)["lesion"], lesion)
    assert logic.kept_segments == ["lesion"]
    logic.undo()
    assert _same(_masks(output, sample.target), before)


def _editor_history(output):
    """The Segment Editor's undo history on `output` (qMRMLSegmentEditorWidget keeps one of these)."""
    history = slicer.vtkSegmentationHistory()
    history.SetMaximumNumberOfStates(10)
    history.SetSegmentation(output.GetSegmentation())
    return history


def _editor_paint(history, output, name: str, mask: np.ndarray, geometry) -> None:
    """An edit made in the Segment Editor: it saves its undo state, then changes the segment."""
    history.SaveState()
    _paint(output, name, mask, geometry)


def test_segment_editor_undo_and_irissegment_undo_keep_each_others_work(sample, logic) -> None:
    """With `before_change` saving the editor's state (the panel does it when the editor shows the
    output): the editor's Undo after Tune gives back the user's corrections, not the state before them;
    IrisSegment's Undo after more editor edits can be undone in the editor, bringing those edits back."""
    output = _run(logic.start_segment(sample.target, [sample.reference_source]))
    history = _editor_history(output)
    _editor_paint(history, output, "hippocampus posterior", sample.truth["hippocampus posterior"], sample.target)
    corrected = _masks(output, sample.target)
    logic.before_change = lambda node: history.SaveState() if node is output else None

    _run(logic.start_tune(sample.target, output, steps=1))
    tuned = _masks(output, sample.target)
    assert history.RestorePreviousState()  # the editor's Undo
    assert _same(_masks(output, sample.target), corrected)
    assert history.RestoreNextState()  # and its Redo
    assert _same(_masks(output, sample.target), tuned)

    more = sample.truth["hippocampus anterior"]
    _editor_paint(history, output, "hippocampus anterior", more, sample.target)
    edited = _masks(output, sample.target)
    logic.undo()  # IrisSegment's Undo: back to the corrected segmentation it tuned on...
    assert _same(_masks(output, sample.target), corrected)
    assert history.RestorePreviousState()  # ...and the editor's Undo brings the later edit back
    assert _same(_masks(output, sample.target), edited)


def test_without_saving_the_editor_state_its_undo_loses_the_users_correction(sample, logic) -> None:
    """Why `before_change` exists: written past the editor, Tune's result makes the editor's Undo go back
    to before the user's correction (what the panel did before it saved the editor's state)."""
    output = _run(logic.start_segment(sample.target, [sample.reference_source]))
    history = _editor_history(output)
    _editor_paint(history, output, "hippocampus posterior", sample.truth["hippocampus posterior"], sample.target)
    corrected = _masks(output, sample.target)
    _run(logic.start_tune(sample.target, output, steps=1))
    assert history.RestorePreviousState()
    assert not _same(_masks(output, sample.target), corrected)


# ---------------------------------------------------------------------------------------- scene close


def test_closing_the_scene_resets_the_session(mrml_scene, logic, request) -> None:
    """After File > Close Scene (the panel calls reset() on EndCloseEvent) nothing of the old scene is
    left: no Undo, no task, no Tune history, although the new scene's nodes reuse the old node IDs. A job
    running at the close is cancelled and changes nothing."""
    observer = mrml_scene.AddObserver(mrml_scene.EndCloseEvent, lambda *args: logic.reset())  # as IrisSegmentWidget.onSceneEndClose
    # Removed before the logic shuts down and the scene goes: a close event fired later (the scene's own
    # teardown, or its destruction whenever the garbage collector runs) must not call into a dead logic.
    request.addfinalizer(lambda: mrml_scene.RemoveObserver(observer))
    first = sample_data.load_sample()
    source = Reference(first.reference, first.reference_segmentation)
    output = _run(logic.start_segment(first.target, [source]))
    encoded = logic.task.counts  # the reference as encoded, before any Tune
    _run(logic.start_segment(first.target, [source], output=output))
    _run(logic.start_tune(first.target, output, steps=1))
    ids = (first.target.GetID(), output.GetID())
    assert logic.can_undo and logic.task is not None
    running = logic.start_segment(first.target, [source], output=output)

    mrml_scene.Clear(0)

    with pytest.raises(Cancelled):
        _run(running)
    assert not logic.can_undo and logic.task is None and not logic.busy
    second = sample_data.load_sample()
    source = Reference(second.reference, second.reference_segmentation)
    with pytest.raises(InputError, match="Segment first"):
        logic.start_tune(second.target, second.reference_segmentation)
    new_output = _run(logic.start_segment(second.target, [source]))
    assert (second.target.GetID(), new_output.GetID()) == ids  # the new scene reuses the IDs
    untuned = logic.task
    assert untuned.counts == encoded  # the reference as encoded, not the old scene's tuned task
    truth = _masks(sample_data.load_target_truth(), second.target)
    _paint(new_output, "hippocampus posterior", truth["hippocampus posterior"], second.target)
    _run(logic.start_tune(second.target, new_output, steps=1))
    posterior = untuned.class_names.index("hippocampus posterior")
    assert logic.task.counts[posterior] == untuned.counts[posterior] + 1  # the scan joins: no stale history says it already had


# ---------------------------------------------------------------------------------------- save task


def test_saving_a_task_where_it_cannot_be_written_is_a_message(sample, logic, tmp_path: Path) -> None:
    _run(logic.start_segment(sample.target, [sample.reference_source]))
    taken = tmp_path / "task.safetensors"
    taken.mkdir()  # a folder where the file should go (permissions do not stop root)
    with pytest.raises(InputError, match="could not write"):
        logic.save_task(taken)
    with pytest.raises(InputError, match="does not exist"):
        logic.save_task(tmp_path / "missing" / "task.safetensors")
    assert logic.save_task(tmp_path / "ok.safetensors").is_file()
