"""`iris-segment` end to end on small real cases with a small random model: every command writes what it says,
outputs keep the reference's label values and names and lie on the target's exact grid, and every user
error exits 2 with one `error:` line and no output file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import AFFINES, CLASS_NAMES, case, image_path, labels_path, quick_reference_fit, require_data, weights_file  # noqa: F401
from support import read_only_folder
from IrisSegmentLib.cli import main
from IrisSegmentLib.embeddings import TaskEmbedding
from IrisSegmentLib.io import read_image, read_label_map, write_image, write_label_map
from IrisSegmentLib.model.weights import load_model
from IrisSegmentLib.volume import Volume

REPO = Path(__file__).resolve().parents[1]
NAMES = {3: "front part", 8: "back part"}  # non-consecutive values and names with spaces, unlike the dataset's

pytestmark = pytest.mark.usefixtures("quick_reference_fit")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """References and targets as files: the dataset's own NIfTI files, a .seg.nrrd reference with values 3 and 8,
    and an oblique NRRD target."""
    require_data()
    folder = tmp_path_factory.mktemp("cli_inputs")
    _, labels = case("004")
    relabeled = np.select([labels.array == 1, labels.array == 2], [3, 8], 0).astype(np.uint8)
    named = Volume(relabeled, labels.affine, "named", {v: {"name": n, "color": (0.2, 0.4, 0.6 + v / 100)} for v, n in NAMES.items()})
    write_label_map(named, folder / "named.seg.nrrd")
    image, _ = case("007")
    write_image(Volume(image.array, AFFINES["oblique_anisotropic_mirrored"], "oblique"), folder / "oblique.nrrd")
    return {
        "image1": image_path("001"), "labels1": labels_path("001"),
        "image3": image_path("003"), "labels3": labels_path("003"),
        "image4": image_path("004"), "named4": folder / "named.seg.nrrd",
        "target": image_path("007"), "oblique": folder / "oblique.nrrd",
    }


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def ok(capsys, *argv) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    assert "error:" not in err
    return out


def fails(capsys, *argv, output: Path | None = None, words=()) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for word in words:
        assert word.lower() in errors[0].lower(), f"{word!r} not in {errors[0]}"
    if output is not None:
        assert not output.exists(), f"{output} was written although the command failed"
        leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(".") or p.name.endswith(".part")]
        assert not leftovers, f"temporary files left behind: {leftovers}"
    return errors[0]


def check_output(path: Path, target: Path, names: dict[int, str]) -> Volume:
    """The written label map: on the target's exact grid, with only the reference's values and names."""
    result = read_label_map(path)
    grid = read_image(target)
    assert result.shape == grid.shape
    np.testing.assert_allclose(result.affine, grid.affine, atol=1e-5)
    present = set(np.unique(result.array)) - {0}
    assert present, "nothing segmented: the value and name checks would be empty"
    assert present <= set(names), f"unexpected label values {present - set(names)}"
    written = {v: result.segments[v]["name"] for v in present}
    assert written == {v: names[v] for v in present}  # exactly, from a .seg.nrrd and from a .ctbl sidecar alike
    return result


# ---------------------------------------------------------------- encode once, then segment with the task file
def test_encode_then_segment_with_the_task(capsys, tmp_path, files, weights_file):
    task_path = tmp_path / "hippocampus.safetensors"
    out = ok(capsys, "encode", "--reference", files["image1"], files["labels1"], "--output", task_path, "--weights", weights_file)
    assert "2 classes" in out and str(task_path) in out
    task = TaskEmbedding.load(task_path)
    assert task.label_values == [1, 2] and task.class_names == [CLASS_NAMES[1], CLASS_NAMES[2]]
    assert task.model_id == load_model(weights_file, "cpu").model_id

    for target, output in [(files["target"], tmp_path / "seg.nii.gz"), (files["oblique"], tmp_path / "oblique_seg.nrrd")]:
        ok(capsys, "segment", "--task", task_path, "--target", target, "--output", output, "--weights", weights_file)
        check_output(output, target, CLASS_NAMES)

    # --classes picks from the task, keeping the label value.
    only = tmp_path / "posterior.nii.gz"
    ok(capsys, "segment", "--task", task_path, "--classes", CLASS_NAMES[2], "--target", files["target"], "--output", only, "--weights", weights_file)
    assert set(np.unique(check_output(only, files["target"], {2: CLASS_NAMES[2]}).array)) <= {0, 2}


def test_one_shot_keeps_the_reference_values_names_and_colors(capsys, tmp_path, files, weights_file):
    output = tmp_path / "seg.seg.nrrd"
    ok(capsys, "segment", "--reference", files["image4"], files["named4"], "--target", files["oblique"], "--output", output, "--weights", weights_file)
    result = check_output(output, files["oblique"], NAMES)
    assert set(result.segments) <= {3, 8} and result.segments
    reference = read_label_map(files["named4"])
    for value, segment in result.segments.items():
        np.testing.assert_allclose(segment["color"], reference.segments[value]["color"], atol=1 / 255)


def test_ensemble_of_two_references(capsys, tmp_path, files, weights_file):
    output = tmp_path / "ensemble.nii.gz"
    ok(capsys, "segment", "--strategy", "ensemble", "--reference", files["image1"], files["labels1"], "--reference", files["image3"], files["labels3"],
       "--target", files["target"], "--output", output, "--weights", weights_file)
    check_output(output, files["target"], CLASS_NAMES)
    # The same two references without --strategy default to the ensemble; one-shot refuses two.
    default = tmp_path / "default.nii.gz"
    ok(capsys, "segment", "--reference", files["image1"], files["labels1"], "--reference", files["image3"], files["labels3"],
       "--target", files["target"], "--output", default, "--weights", weights_file)
    assert np.array_equal(read_label_map(default).array, read_label_map(output).array)
    refused = tmp_path / "one_shot.nii.gz"
    fails(capsys, "segment", "--strategy", "one-shot", "--reference", files["image1"], files["labels1"], "--reference", files["image3"], files["labels3"],
          "--target", files["target"], "--output", refused, "--weights", weights_file, output=refused, words=("one-shot", "ensemble"))


def test_retrieval_from_references_and_task_files(capsys, tmp_path, files, weights_file):
    task_path = tmp_path / "task4.safetensors"
    ok(capsys, "encode", "--reference", files["image3"], files["labels3"], "--output", task_path, "--weights", weights_file)
    output = tmp_path / "retrieval.nii.gz"
    ok(capsys, "segment", "--strategy", "retrieval", "--reference", files["image1"], files["labels1"], "--task", task_path,
       "--target", files["target"], "--output", output, "--weights", weights_file)
    check_output(output, files["target"], CLASS_NAMES)


def test_a_task_can_be_fitted_to_its_reference_when_encoded(capsys, tmp_path, files, weights_file):
    plain, fitted = tmp_path / "plain.safetensors", tmp_path / "fitted.safetensors"
    reference = ["--reference", files["image1"], files["labels1"], "--weights", weights_file, "--no-matching"]  # fitting is the network's
    ok(capsys, "encode", *reference, "--fit-reference", "0", "--output", plain)
    ok(capsys, "encode", *reference, "--fit-reference", "3", "--output", fitted)
    assert not torch.equal(TaskEmbedding.load(plain).tokens, TaskEmbedding.load(fitted).tokens)
    assert TaskEmbedding.load(plain).class_names == TaskEmbedding.load(fitted).class_names
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--task", plain, "--target", files["target"], "--fit-reference", "3", "--output", output,
          "--weights", weights_file, output=output, words=("--reference",))
    fails(capsys, "segment", "--task", plain, "--target", files["target"], "--no-matching", "--output", output,
          "--weights", weights_file, output=output, words=("--no-matching", "--reference"))
    fails(capsys, "encode", *reference, "--fit-reference", "-1", "--output", tmp_path / "x.safetensors", words=("steps",))


def test_tune_writes_a_tuned_task(capsys, tmp_path, files, weights_file, monkeypatch):
    from IrisSegmentLib.inference import predictor

    monkeypatch.setattr(predictor, "TUNING_STEPS", 3)  # the engine's default, made quick to run
    task_path = tmp_path / "task.safetensors"
    ok(capsys, "encode", "--reference", files["image1"], files["labels1"], "--output", task_path, "--weights", weights_file)
    tuned_path = tmp_path / "tuned.safetensors"
    out = ok(capsys, "tune", "--task", task_path, "--image", files["image3"], "--labels", files["labels3"],
             "--reference", files["image1"], files["labels1"], "--output", tuned_path, "--weights", weights_file)
    assert "over 3 steps" in out  # without --steps, the engine's default
    out = ok(capsys, "tune", "--task", task_path, "--image", files["image3"], "--labels", files["labels3"], "--steps", 2,
             "--output", tmp_path / "tuned2.safetensors", "--weights", weights_file)
    assert "over 2 steps" in out
    task, tuned = TaskEmbedding.load(task_path), TaskEmbedding.load(tuned_path)
    assert tuned.label_values == task.label_values and tuned.class_names == task.class_names and tuned.model_id == task.model_id
    assert not torch.equal(tuned.tokens, task.tokens)
    output = tmp_path / "seg.nii.gz"
    ok(capsys, "segment", "--task", tuned_path, "--target", files["target"], "--output", output, "--weights", weights_file)
    check_output(output, files["target"], CLASS_NAMES)


def test_pool_pairs_several_reports_against_one_shot(capsys, tmp_path):
    from IrisSegmentLib.evaluation.metrics import ClassScore
    from IrisSegmentLib.evaluation.report import result_rows, write_report

    folders = []
    for dataset, cases, gain in (("SetA", 3, 0.05), ("SetB", 1, -0.01)):
        rows = [row for n in range(cases) for method, dice in (("one-shot", 0.7), ("ensemble-3", 0.7 + gain))
                for row in result_rows(dataset, f"{dataset}{n}", method, {1: ClassScore(dice, 2.0)}, {1: "organ"}, 1.0)]
        write_report(rows, tmp_path / dataset)
        folders.append(tmp_path / dataset)
    output = tmp_path / "pooled.md"
    out = ok(capsys, "pool", "--reports", *folders, "--output", output)
    assert output.read_text() in out
    # over cases (3 x 0.05 - 0.01) / 4, over datasets (0.05 - 0.01) / 2
    assert "| ensemble-3 | 2 | 4 | +0.035 | +0.035 to +0.035 | +0.020 | +0.020 to +0.020 | 3 / 1 |" in output.read_text()
    fails(capsys, "pool", "--reports", *folders, "--output", output, words=["exists", "--overwrite"])
    results = folders[0] / "results.csv"
    before = results.read_bytes()
    fails(capsys, "pool", "--reports", *folders, "--output", results, "--overwrite", words=["is one of the inputs"])
    assert results.read_bytes() == before
    new = tmp_path / "new.md"
    fails(capsys, "pool", "--reports", folders[0], tmp_path / "nowhere", "--output", new, output=new, words=["nowhere", "not found"])
    fails(capsys, "pool", "--reports", folders[0], folders[0], "--output", new, output=new, words=["dataset SetA is in", "one report per dataset"])
    fails(capsys, "pool", "--reports", *folders, "--output", new, "--against", "retrieval-3", output=new, words=["'retrieval-3' is not in the reports"])


def test_info(capsys, weights_file):
    out = ok(capsys, "info", "--weights", weights_file, "--device", "cpu")
    model = load_model(weights_file, "cpu")
    assert f"model id: {model.model_id}" in out
    assert str(weights_file) in out
    assert "purpose: tests" in out  # provenance
    assert "memory bank: 0 classes" in out


# ---------------------------------------------------------------- errors
def test_missing_class(capsys, tmp_path, files, weights_file):
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--classes", "9", "--target", files["target"],
          "--output", output, "--weights", weights_file, output=output, words=("class '9'", CLASS_NAMES[1]))
    task_path = tmp_path / "task.safetensors"
    ok(capsys, "encode", "--reference", files["image1"], files["labels1"], "--output", task_path, "--weights", weights_file)
    fails(capsys, "segment", "--task", task_path, "--classes", "liver", "--target", files["target"],
          "--output", output, "--weights", weights_file, output=output, words=("no class 'liver'",))
    encoded = tmp_path / "never.safetensors"
    fails(capsys, "encode", "--reference", files["image1"], files["labels1"], "--classes", "liver", "--output", encoded,
          "--weights", weights_file, output=encoded, words=("liver",))


def test_existing_output_needs_overwrite(capsys, tmp_path, files, weights_file):
    output = tmp_path / "seg.nii.gz"
    output.write_bytes(b"precious")
    args = ["segment", "--reference", files["image1"], files["labels1"], "--target", files["target"], "--output", output, "--weights", weights_file]
    fails(capsys, *args, words=("exists", "--overwrite"))
    assert output.read_bytes() == b"precious"
    ok(capsys, *args, "--overwrite")
    check_output(output, files["target"], CLASS_NAMES)


def test_output_may_not_be_an_input(capsys, tmp_path, files, weights_file):
    target = tmp_path / "target.nii.gz"
    target.write_bytes(files["target"].read_bytes())
    before = target.read_bytes()
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", target, "--output", target,
          "--overwrite", "--weights", weights_file, words=("one of the inputs",))
    assert target.read_bytes() == before
    task_path = tmp_path / "task.safetensors"
    ok(capsys, "encode", "--reference", files["image1"], files["labels1"], "--output", task_path, "--weights", weights_file)
    task_bytes = task_path.read_bytes()
    fails(capsys, "tune", "--task", task_path, "--image", files["image3"], "--labels", files["labels3"], "--output", task_path,
          "--overwrite", "--weights", weights_file, words=("one of the inputs",))
    assert task_path.read_bytes() == task_bytes


def test_unsupported_output_extension(capsys, tmp_path, files, weights_file):
    for name in ("seg.png", "seg.mha", "seg"):
        output = tmp_path / name
        fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", files["target"], "--output", output,
              "--weights", weights_file, output=output, words=("supported",))


def test_nonexistent_files(capsys, tmp_path, files, weights_file):
    output = tmp_path / "seg.nii.gz"
    missing = tmp_path / "nowhere.nii.gz"
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", missing, "--output", output,
          "--weights", weights_file, output=output, words=("nowhere.nii.gz", "not found"))
    fails(capsys, "segment", "--reference", missing, files["labels1"], "--target", files["target"], "--output", output,
          "--weights", weights_file, output=output, words=("nowhere.nii.gz", "not found"))
    fails(capsys, "segment", "--task", tmp_path / "nowhere.safetensors", "--target", files["target"], "--output", output,
          "--weights", weights_file, output=output, words=("nowhere.safetensors",))
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", files["target"], "--output", output,
          "--weights", tmp_path / "no_weights.safetensors", output=output, words=("no_weights.safetensors", "not found"))
    deep = tmp_path / "no" / "such" / "folder" / "seg.nii.gz"
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", files["target"], "--output", deep,
          "--weights", weights_file, words=("does not exist",))
    assert not (tmp_path / "no").exists()


def test_usage_errors(capsys, tmp_path, files, weights_file):
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--target", files["target"], "--output", output, "--weights", weights_file, output=output, words=("--reference",))
    fails(capsys, "segment", "--strategy", "memory", "--target", files["target"], "--output", output, "--weights", weights_file,
          output=output, words=("--classes",))
    fails(capsys, "segment", "--strategy", "memory", "--classes", "liver", "--target", files["target"], "--output", output,
          "--weights", weights_file, output=output, words=("no memory bank",))


def test_module_entry_point_exit_code(tmp_path, files, weights_file):
    """`python -m IrisSegmentLib` passes the exit status to the shell."""
    output = tmp_path / "seg.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "IrisSegmentLib", "segment", "--reference", str(files["image1"]), str(files["labels1"]), "--classes", "9",
         "--target", str(files["target"]), "--output", str(output), "--weights", str(weights_file)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error: class '9'" in proc.stderr and "Traceback" not in proc.stderr
    assert not output.exists()


# ---------------------------------------------------------------- bad inputs found before the work, with one clear line
def _save(array: np.ndarray, path: Path, affine=None) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _no_work(err: str) -> None:
    """The model was never loaded: the problem was found before any work (loading prints 'model ... on ...')."""
    assert "model " not in err, err


def _read_only_folder(tmp_path: Path) -> Path:
    folder = read_only_folder(tmp_path)
    if folder is None:
        pytest.skip("no read-only folder available here")
    return folder


@pytest.mark.parametrize("command", ["encode", "tune", "segment"])
def test_output_in_a_read_only_folder_is_refused_before_the_work(capsys, tmp_path, files, weights_file, command):
    folder = _read_only_folder(tmp_path)
    task_path = tmp_path / "task.safetensors"
    ok(capsys, "encode", "--reference", files["image1"], files["labels1"], "--output", task_path, "--weights", weights_file)
    output = folder / ("seg.nii.gz" if command == "segment" else "out.safetensors")
    argv = {
        "encode": ["encode", "--reference", files["image1"], files["labels1"]],
        "tune": ["tune", "--task", task_path, "--image", files["image3"], "--labels", files["labels3"]],
        "segment": ["segment", "--task", task_path, "--target", files["target"]],
    }[command]
    rc, _, err = run(capsys, *argv, "--output", output, "--weights", weights_file)
    assert rc == 2 and "error: cannot write" in err and "not writable" in err and "Traceback" not in err, err
    _no_work(err)
    assert not output.exists()


@pytest.mark.parametrize("command", ["encode", "tune"])
def test_a_task_is_written_as_safetensors_only(capsys, tmp_path, files, weights_file, command):
    task_path = tmp_path / "task.safetensors"
    ok(capsys, "encode", "--reference", files["image1"], files["labels1"], "--output", task_path, "--weights", weights_file)
    output = tmp_path / "task.nii.gz"
    argv = ["encode", "--reference", files["image1"], files["labels1"]] if command == "encode" else \
        ["tune", "--task", task_path, "--image", files["image3"], "--labels", files["labels3"]]
    fails(capsys, *argv, "--output", output, "--weights", weights_file, output=output, words=(".safetensors",))


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_top_k_below_one_is_refused_before_the_work(capsys, tmp_path, files, weights_file, value):
    output = tmp_path / "seg.nii.gz"
    error = fails(capsys, "segment", "--strategy", "retrieval", "--top-k", value, "--reference", files["image1"], files["labels1"],
                  "--reference", files["image3"], files["labels3"], "--target", files["target"], "--output", output,
                  "--weights", weights_file, output=output, words=("--top-k",))
    assert "at least 1" in error or "not a number of references" in error


def test_top_k_without_retrieval_is_refused(capsys, tmp_path, files, weights_file):
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--top-k", "2", "--reference", files["image1"], files["labels1"], "--reference", files["image3"], files["labels3"],
          "--target", files["target"], "--output", output, "--weights", weights_file, output=output, words=("--top-k", "retrieval", "ensemble"))


@pytest.mark.parametrize("steps", ["99999999999999999999", "1001", "0", "-3"])
def test_tune_steps_are_bounded(capsys, tmp_path, files, weights_file, steps):
    """Checked when parsing: the task file does not even exist here."""
    output = tmp_path / "tuned.safetensors"
    fails(capsys, "tune", "--task", tmp_path / "nowhere.safetensors", "--image", files["image3"], "--labels", files["labels3"],
          "--steps", steps, "--output", output, "--weights", weights_file, output=output, words=("--steps", "from 1 to 1000"))


@pytest.mark.parametrize("option, value, words", [
    ("--device", "tpu", ("--device", "unknown device 'tpu'")),
    ("--device", "cuda:x", ("--device", "unknown device")),
    ("--modality", "PET", ("--modality", "unknown modality 'PET'")),
])
def test_bad_option_values_are_refused_when_parsing(capsys, tmp_path, files, weights_file, option, value, words):
    output = tmp_path / "seg.nii.gz"
    rc, _, err = run(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", tmp_path / "missing.nii.gz",
                     "--output", output, "--weights", weights_file, option, value)
    assert rc == 2 and "missing.nii.gz" not in err, err  # found before any file is read
    assert all(word in err for word in words) and "Traceback" not in err, err


def test_evaluate_counts_are_checked_when_parsing(capsys, tmp_path):
    for option in ("--cases", "--references", "--tuning-cases", "--tune-steps"):
        fails(capsys, "evaluate", "--data", tmp_path / "nowhere", "--output", tmp_path / "report", option, "0", words=(option,))
    assert not (tmp_path / "report").exists()


def test_usage_errors_are_one_error_line(capsys, tmp_path):
    fails(capsys, "segment", "--target", tmp_path / "t.nii.gz", words=("--output",))
    fails(capsys, "segmnt", words=("invalid choice",))
    rc, out, _ = run(capsys, "--version")
    assert rc == 0 and "IrisSegment" in out


def test_complex_and_color_targets_are_refused(capsys, tmp_path, files, weights_file):
    image = read_image(files["target"])
    rgb = np.zeros(image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["G"] = image.array.astype(np.uint8)
    for name, array, words in [("complex.nii", image.array.astype(np.complex64), ("complex-valued",)),
                               ("color.nii.gz", rgb, ("color or vector", "grayscale"))]:
        target = _save(array, tmp_path / name, image.affine)
        output = tmp_path / "seg.nii.gz"
        rc, _, err = run(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", target, "--output", output,
                         "--weights", weights_file)
        assert rc == 2 and name in err and all(w in err for w in words) and "Traceback" not in err, err
        _no_work(err)
        assert not output.exists()


def test_a_header_claiming_4000_cubed_voxels_is_refused(capsys, tmp_path, files, weights_file):
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4000, 4000, 4000))
    header["vox_offset"] = 352
    target = tmp_path / "huge.nii.gz"
    target.write_bytes(gzip.compress(header.binaryblock + bytes(4) + bytes(256)))
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", target, "--output", output,
          "--weights", weights_file, output=output, words=("4000 x 4000 x 4000", "more than IrisSegment can load"))


def test_a_single_slice_target_is_refused(capsys, tmp_path, files, weights_file):
    image = read_image(files["target"])
    target = _save(np.ascontiguousarray(image.array[:, :, 17:18]), tmp_path / "slice.nii.gz", image.affine)
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", target, "--output", output,
          "--weights", weights_file, output=output, words=("1.0 mm long", "needs at least", "more slices"))


def test_classes_found_nowhere_are_named_in_a_warning(capsys):
    """An all-background class is written (the file keeps every class) and said on stderr, never passed over."""
    from IrisSegmentLib.cli import _warn_missing

    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:4, 2:4, 2:4] = 1
    _warn_missing(Volume(labels, np.eye(4), "seg", {1: {"name": "liver"}, 2: {"name": "gallbladder"}, 3: {"name": "pancreas"}}))
    err = capsys.readouterr().err
    assert err.startswith("warning: nothing found in the target for gallbladder, pancreas:") and "liver" not in err
    _warn_missing(Volume(labels, np.eye(4), "seg", {1: {"name": "liver"}}))
    assert capsys.readouterr().err == ""


def test_a_target_at_1e18_segments_as_the_scan_itself(capsys, tmp_path, files, weights_file):
    image = read_image(files["target"])
    scaled = _save(image.array.astype(np.float32) * np.float32(1e18), tmp_path / "scaled.nii.gz", image.affine)
    plain, big = tmp_path / "plain.nii.gz", tmp_path / "big.nii.gz"
    for target, output in ((files["target"], plain), (scaled, big)):
        ok(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", target, "--output", output, "--weights", weights_file)
    assert read_label_map(plain).array.any()
    np.testing.assert_array_equal(read_label_map(big).array, read_label_map(plain).array)


def test_a_label_map_as_the_target_or_swapped_reference_is_refused(capsys, tmp_path, files, weights_file):
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--reference", files["image1"], files["labels1"], "--target", files["labels3"], "--output", output,
          "--weights", weights_file, output=output, words=("--target", "looks like a label map", "swap"))
    fails(capsys, "segment", "--reference", files["labels1"], files["image1"], "--target", files["target"], "--output", output,
          "--weights", weights_file, output=output, words=("--reference image", "looks like a label map"))


def test_tune_with_image_and_labels_swapped_is_refused(capsys, tmp_path, files, weights_file):
    """The uint8 scan read as a label map was tuned on as a 100-odd class segmentation."""
    task_path = tmp_path / "task.safetensors"
    ok(capsys, "encode", "--reference", files["image1"], files["labels1"], "--output", task_path, "--weights", weights_file)
    scan = tmp_path / "scan_as_labels.nii.gz"  # the hippocampus scans are uint8 or float: this one as uint8, as a label map reads
    image = read_image(files["image3"])
    _save(np.clip(image.array, 0, 255).astype(np.uint8), scan, image.affine)
    output = tmp_path / "tuned.safetensors"
    rc, _, err = run(capsys, "tune", "--task", task_path, "--image", files["image3"], "--labels", scan, "--output", output, "--weights", weights_file)
    assert rc == 2 and "--labels" in err and "looks like a scan" in err and "swap" in err, err
    _no_work(err)
    fails(capsys, "tune", "--task", task_path, "--image", files["labels3"], "--labels", scan, "--output", output,
          "--weights", weights_file, output=output, words=("--image", "looks like a label map"))


def test_a_one_voxel_reference_class_is_refused(capsys, tmp_path, files, weights_file):
    labels = read_label_map(files["labels1"])
    array = np.where(labels.array == 1, 1, 0).astype(np.uint8)
    array[tuple(np.argwhere(labels.array == 2)[0])] = 2
    reference = tmp_path / "dot.nii.gz"
    write_label_map(Volume(array, labels.affine, segments={1: {"name": "anterior"}, 2: {"name": "dot"}}), reference)
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--reference", files["image1"], reference, "--target", files["target"], "--output", output,
          "--weights", weights_file, output=output, words=("'dot' covers", "fewer than 8"))
    ok(capsys, "segment", "--reference", files["image1"], reference, "--classes", "anterior", "--target", files["target"],
       "--output", output, "--weights", weights_file)


def test_memory_strategy_refuses_classes_the_bank_never_learned(capsys, tmp_path):
    """The shipped model's TotalSeg_CT_example rows gave all background on their own training scan."""
    from IrisSegmentLib.model.weights import default_weights_path
    from support import DATA

    target = DATA / "TotalSeg_CT_example" / "imagesTr" / "case_001_0000.nii.gz"
    if not (default_weights_path().is_file() and target.is_file()):
        pytest.skip("needs the shipped weights and TotalSeg_CT_example")
    output = tmp_path / "seg.nii.gz"
    fails(capsys, "segment", "--strategy", "memory", "--classes", "TotalSeg_CT_example/liver", "TotalSeg_CT_example/spleen",
          "--target", target, "--output", output, "--device", "cpu", output=output,
          words=("TotalSeg_CT_example/liver", "TotalSeg_CT_example/spleen", "seen too rarely", "--reference"))


def test_modality_mismatch_names_the_flag_and_is_found_before_the_work(capsys, tmp_path, files, weights_file):
    image = read_image(files["target"])
    ct = _save(image.array.astype(np.float32) / image.array.max() * 1400.0 - 1000.0, tmp_path / "ct_like.nii.gz", image.affine)
    output = tmp_path / "seg.nii.gz"
    args = ["segment", "--reference", files["image1"], files["labels1"], "--target", ct, "--output", output, "--weights", weights_file]
    rc, _, err = run(capsys, *args)
    assert rc == 2 and "--allow-modality-mismatch" in err and "reference is MR but the target looks like CT" in err, err
    _no_work(err)
    ok(capsys, *args, "--allow-modality-mismatch")
    assert output.exists()


# ---------------------------------------------------------------- sidecars: the .ctbl obeys its file's rules
def test_an_existing_color_table_beside_the_output_needs_overwrite(capsys, tmp_path, files, weights_file):
    table = tmp_path / "out.ctbl"
    table.write_text("0 Background 0 0 0 0\n1 my_own_names 255 0 0 255\n")
    before = table.read_bytes()
    for name in ("out.nii.gz", "out.nrrd"):
        output = tmp_path / name
        args = ["segment", "--reference", files["image1"], files["labels1"], "--target", files["target"], "--output", output, "--weights", weights_file]
        rc, _, err = run(capsys, *args)
        assert rc == 2 and "out.ctbl exists" in err and "--overwrite" in err, err
        _no_work(err)
        assert table.read_bytes() == before and not output.exists()
    ok(capsys, *args, "--overwrite")
    assert table.read_bytes() != before
    check_output(tmp_path / "out.nrrd", files["target"], CLASS_NAMES)


def test_the_color_table_of_an_input_is_never_replaced(capsys, tmp_path, files, weights_file):
    """A reference label map `ref.nii.gz` named by `ref.ctbl`: writing `ref.nrrd` would replace the reference's names."""
    reference = tmp_path / "ref.nii.gz"
    write_label_map(read_label_map(files["labels1"]), reference)
    table = tmp_path / "ref.ctbl"
    before = table.read_bytes()
    output = tmp_path / "ref.nrrd"
    fails(capsys, "segment", "--reference", files["image1"], reference, "--target", files["target"], "--output", output, "--overwrite",
          "--weights", weights_file, output=output, words=("would replace", "ref.ctbl", "the color table that names the labels of the input"))
    assert table.read_bytes() == before
    ok(capsys, "segment", "--reference", files["image1"], reference, "--target", files["target"], "--output", tmp_path / "ref_seg.seg.nrrd",
       "--weights", weights_file)
    assert table.read_bytes() == before


def test_names_round_trip_through_a_written_color_table_into_an_ensemble(capsys, tmp_path, files, weights_file):
    """A task named from dataset.json and one named from a .ctbl IrisSegment wrote ('hippocampus_anterior' came back as
    'hippocampus anterior') made an ensemble fail with 'label value 1 names two different classes'."""
    written = tmp_path / "written.nii.gz"
    write_label_map(read_label_map(files["labels3"]), written)
    assert {v: s["name"] for v, s in read_label_map(written).segments.items()} == CLASS_NAMES
    output = tmp_path / "ensemble.nii.gz"
    ok(capsys, "segment", "--reference", files["image1"], files["labels1"], "--reference", files["image3"], written,
       "--target", files["target"], "--output", output, "--weights", weights_file)
    check_output(output, files["target"], CLASS_NAMES)


def test_the_command_lines_step_limit_is_the_engines(monkeypatch):
    """The CLI keeps its own copy (options are parsed without importing torch); it must not drift."""
    from IrisSegmentLib import cli
    from IrisSegmentLib.inference import predictor

    monkeypatch.undo()  # the shipped values, not quick_reference_fit's

    assert cli.MAX_TUNING_STEPS == predictor.MAX_TUNING_STEPS
    assert (cli.REFERENCE_FIT_STEPS, cli.FIT_BELOW) == (predictor.REFERENCE_FIT_STEPS, predictor.FIT_BELOW)
