"""Fuzz `iris-segment` with bad inputs: every one must get a clear error or a meaningful result.

    python Testing/fuzz_bad_inputs.py --count 150        # the first 150 cases; without --count all (247)

Not a pytest module (pytest collects test_*.py only): a few minutes of cases a developer runs after touching
input handling. It builds small synthetic scans and label maps (no shared data needed), a small random network
(Testing/engine_fixtures.py), and runs the CLI in-process (`IrisSegmentLib.cli.main(argv)`) on each case, in a
folder of its own holding copies of the inputs (and, for NIfTI label maps, their .ctbl color tables).

Each case states what it expects:
- "fail": a problem the user must fix: exit code 2, exactly one `error: ...` line, no output.
- "ok": usable input: exit code 0 and a meaningful output (below).
- "either": input a reader may accept (exit 0 with a meaningful output) or refuse (exit 2 as "fail").

For every case, whatever it expects:
- no traceback: main() returns 0 or 2 (an exception escaping it, or "Traceback" on stderr, is a bug);
- no file of the user changed: every file in the case's folder (inputs, color tables, pre-existing outputs)
  and the weights file hash the same after the run; a failed run leaves no new file (no partial output, no
  temporary file), a successful one only its output and the output's color table.

A meaningful output:
- segment: a label map that reads back, on the target's exact grid (shape, and affine to 1e-4 mm), holding
  only label values of the task's classes, with the task's names; where the case is a rescaled or retyped copy
  of the baseline target (intensities x 1e18, as float64...), the same voxels as the baseline's segmentation;
- encode / tune: a task file that loads, with the expected classes, finite tokens, made by the weights given;
- score / info / pool: exit 0 with the expected report on stdout.

Exit 0 where "fail" was expected is silent garbage; exit 2 where "ok" was expected is a wrong refusal. Both
are reported with the case's stderr. The script exits 1 if any case broke a rule.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import os
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import nibabel as nib  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from IrisSegmentLib.cli import main  # noqa: E402
from support import read_only_folder  # noqa: E402
from IrisSegmentLib.embeddings import TaskEmbedding  # noqa: E402
from IrisSegmentLib.io import read_image, read_label_map, write_image, write_label_map  # noqa: E402
from IrisSegmentLib.volume import Volume  # noqa: E402

SHAPE = (40, 48, 40)
NAMES = {1: "kidney_left", 2: "front part"}  # an underscore and a space: both must come back exactly


# ---------------------------------------------------------------------------------------------- data
def scan_and_labels(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A smooth, noisy MR-like scan (float32, positive) with two brighter ellipsoids, and their label map."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    centre = np.array(shape, np.float32)[:, None, None, None] / 2

    def ellipsoid(offset, radii):
        d = (grid - centre - np.array(offset, np.float32)[:, None, None, None]) / np.array(radii, np.float32)[:, None, None, None]
        return (d**2).sum(0) <= 1

    labels = np.zeros(shape, np.uint8)
    labels[ellipsoid((-6 + seed % 3, -5, 0), (6, 8, 7))] = 1
    labels[ellipsoid((6, 6 - seed % 2, 1), (5, 6, 6))] = 2
    body = ellipsoid((0, 0, 0), (18, 22, 18))
    image = 40 + 160 * body + 120 * (labels == 1) + 220 * (labels == 2)
    image = gaussian_filter(image.astype(np.float32), 1.0) + rng.normal(0, 12, shape).astype(np.float32)
    return np.clip(image, 0, None).astype(np.float32), labels


AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])
AFFINE[:3, 3] = (-20.0, 10.0, 5.0)


def save_nifti(path: Path, array: np.ndarray, affine=AFFINE, dtype=None) -> Path:
    image = nib.Nifti1Image(array, affine, dtype=dtype if dtype is not None else array.dtype)
    nib.save(image, str(path))
    return path


def nifti_bytes(array: np.ndarray, affine=AFFINE, edit: Callable | None = None) -> bytes:
    """An uncompressed single-file NIfTI, its header optionally edited (edit(header) -> None) after the data is set."""
    header = nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_data_shape(array.shape)
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["vox_offset"] = 352
    if edit is not None:
        edit(header)
    return header.binaryblock + bytes(4) + np.asarray(array, order="F").tobytes(order="F")


def nrrd_text(fields: dict[str, str], data: bytes = b"", gz: bool = True) -> bytes:
    head = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n"
    return head.encode() + (gzip.compress(data) if gz else data)


NRRD_OK = {
    "type": "float", "dimension": "3", "sizes": " ".join(map(str, SHAPE)), "encoding": "gzip", "endian": "little",
    "space": "right-anterior-superior", "space directions": "(1,0,0) (0,1,0) (0,0,1)", "space origin": "(-20,10,5)",  # AFFINE
}


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    expect: str  # "fail", "ok" or "either"
    argv: list  # strings; "{w}" is the case folder, "{weights}" the weights file
    setup: Callable[[Path], None] = lambda folder: None
    output: str | None = None  # the file the command writes, relative to the case folder
    check: str = ""  # how to judge an exit 0: segment, encode, tune, score, info, pool
    classes: dict = field(default_factory=lambda: dict(NAMES))  # label value -> name the output may hold
    same_as_baseline: bool = False  # a segmentation that must equal the baseline target's
    words: tuple = ()  # words the error line must hold (any case)


class Fuzz:
    def __init__(self, root: Path, weights: Path) -> None:
        self.root, self.weights = root, weights
        self.base = root / "base"
        self.base.mkdir()
        ref_image, ref_labels = scan_and_labels(0)
        tgt_image, tgt_labels = scan_and_labels(1)
        self.arrays = {"ref_image": ref_image, "ref_labels": ref_labels, "target": tgt_image, "target_labels": tgt_labels}
        save_nifti(self.base / "ref.nii.gz", ref_image)
        write_label_map(Volume(ref_labels, AFFINE, segments={v: {"name": n} for v, n in NAMES.items()}), self.base / "ref_labels.nii.gz")
        save_nifti(self.base / "ref2.nii.gz", scan_and_labels(2)[0])
        write_label_map(Volume(scan_and_labels(2)[1], AFFINE, segments={v: {"name": n} for v, n in NAMES.items()}), self.base / "ref2_labels.nii.gz")
        save_nifti(self.base / "target.nii.gz", tgt_image)
        write_label_map(Volume(tgt_labels, AFFINE, segments={v: {"name": n} for v, n in NAMES.items()}), self.base / "target_labels.nii.gz")
        write_image(Volume(tgt_image, AFFINE), self.base / "target.nrrd")
        # A task file and the baseline segmentation, made through the CLI itself.
        assert self._quiet(["encode", "--reference", str(self.base / "ref.nii.gz"), str(self.base / "ref_labels.nii.gz"),
                            "--output", str(self.base / "task.safetensors"), "--weights", str(weights)])[0] == 0
        assert self._quiet(["segment", "--task", str(self.base / "task.safetensors"), "--target", str(self.base / "target.nii.gz"),
                            "--output", str(root / "baseline.nii.gz"), "--weights", str(weights)])[0] == 0
        self.baseline = read_label_map(root / "baseline.nii.gz").array
        self.task = TaskEmbedding.load(self.base / "task.safetensors")

    @staticmethod
    def _quiet(argv: list[str]) -> tuple[object, str, str]:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(argv)
        except BaseException as exc:  # noqa: BLE001 - anything escaping main is what the fuzz looks for
            import traceback

            rc = f"exception {type(exc).__name__}"
            err.write("Traceback (escaped main):\n" + traceback.format_exc())
        return rc, out.getvalue(), err.getvalue()

    # -------------------------------------------------------------------------------------- running
    def run(self, case: Case, index: int) -> tuple[object, list[str]]:
        """(exit code, problems) of one case."""
        folder = self.root / f"case{index:03d}"
        shutil.copytree(self.base, folder)
        case.setup(folder)
        argv = [str(a).replace("{w}", str(folder)).replace("{weights}", str(self.weights)) for a in case.argv]
        before = self._hashes(folder)
        weights_before = self._hash(self.weights)
        rc, out, err = self._quiet(argv)
        self.last_error = next((line for line in err.splitlines() if line.startswith("error: ")), "")
        after = self._hashes(folder)
        problems = []
        if rc not in (0, 2) or "Traceback" in err:
            problems.append(f"traceback / exit {rc}:\n{err[-2500:]}")
        written = self._written(case) if rc == 0 else set()  # a successful run replaces its own output (--overwrite)
        changed = sorted(p for p in before if after.get(p) != before[p] and p not in written)
        if changed:
            problems.append(f"user files changed or removed: {changed}")
        if self._hash(self.weights) != weights_before:
            problems.append("the weights file changed")
        new = sorted(set(after) - set(before))
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        if rc == 2:
            if case.expect == "ok":
                problems.append(f"refused usable input: {errors}")
            if len(errors) != 1:
                problems.append(f"expected one 'error:' line, got: {err[-800:]}")
            elif not all(w.lower() in errors[0].lower() for w in case.words):
                problems.append(f"error line lacks {case.words}: {errors[0]}")
            if new:
                problems.append(f"failed run left files: {new}")
        elif rc == 0:
            if case.expect == "fail":
                problems.append(f"silent garbage: exit 0 where an error was expected (wrote {new})")
            else:
                problems += self._judge(case, folder, new, out, err)
        return rc, problems

    @staticmethod
    def _written(case: Case) -> set[str]:
        """The files a successful run of `case` may write: its output and, for NIfTI / NRRD, the output's .ctbl."""
        allowed = set()
        if case.output:
            allowed.add(case.output)
            if not case.output.endswith(".seg.nrrd") and case.output.endswith((".nii.gz", ".nii", ".nrrd")):
                stem = case.output[: -len(next(s for s in (".nii.gz", ".nii", ".nrrd") if case.output.endswith(s)))]
                allowed.add(stem + ".ctbl")
        return allowed

    def _judge(self, case: Case, folder: Path, new: list[str], out: str, err: str) -> list[str]:
        extra = sorted(set(new) - self._written(case))
        problems = [f"wrote files it should not: {extra}"] if extra else []
        if case.check in ("segment", "encode", "tune") and not (case.output and (folder / case.output).is_file()):
            return problems + [f"exit 0 but no output {case.output}"]
        try:
            if case.check == "segment":
                result = read_label_map(folder / case.output)
                target = read_image(Path(case.argv[case.argv.index("--target") + 1].replace("{w}", str(folder))))
                if result.shape != target.shape or not np.allclose(result.affine, target.affine, atol=1e-4):
                    problems.append(f"output not on the target's grid: {result.shape} vs {target.shape}")
                present = set(np.unique(result.array).tolist()) - {0}
                if not present <= set(case.classes):
                    problems.append(f"label values {present} not among the task's {sorted(case.classes)}")
                names = {v: result.segments[v]["name"] for v in present}
                if names != {v: case.classes[v] for v in present}:
                    problems.append(f"names {names} are not the task's {case.classes}")
                empty = [seg["name"] for v, seg in result.segments.items() if v not in present]
                warned = next((line for line in err.splitlines() if line.startswith("warning: nothing found")), "")
                if empty and not all(name in warned for name in empty):
                    problems.append(f"silent: {empty} came out empty with no warning naming them")
                differing = int((result.array != self.baseline).sum()) if case.same_as_baseline else 0
                if differing > 1e-3 * self.baseline.size:  # float rounding may move a voxel on a boundary, not more
                    problems.append(f"differs from the baseline segmentation in {differing} voxels")
            elif case.check in ("encode", "tune"):
                task = TaskEmbedding.load(folder / case.output)
                if task.label_values != sorted(case.classes) or task.class_names != [case.classes[v] for v in sorted(case.classes)]:
                    problems.append(f"task classes {task.label_values} {task.class_names}, expected {case.classes}")
                if task.model_id != self.task.model_id or not bool(np.isfinite(task.tokens.numpy()).all()):
                    problems.append("task from another model or with non-finite tokens")
            elif case.check == "score" and "mean" not in out:
                problems.append(f"score printed no mean: {out[-300:]}")
            elif case.check == "info" and "model id:" not in out:
                problems.append(f"info printed no model id: {out[-300:]}")
        except Exception as exc:  # noqa: BLE001
            problems.append(f"output unreadable: {type(exc).__name__}: {exc}")
        return problems

    @staticmethod
    def _hash(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    def _hashes(self, folder: Path) -> dict[str, str]:
        found = {}
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(folder))] = self._hash(path)
        return found


# ---------------------------------------------------------------------------------------------- case list
def cases(fz: Fuzz, read_only: Path | None) -> list[Case]:
    W = "{w}"
    weights = ["--weights", "{weights}"]
    ref = ["--reference", f"{W}/ref.nii.gz", f"{W}/ref_labels.nii.gz"]
    ref2 = ["--reference", f"{W}/ref2.nii.gz", f"{W}/ref2_labels.nii.gz"]
    out = ["--output", f"{W}/out.nii.gz"]
    target_array, ref_image, ref_labels = fz.arrays["target"], fz.arrays["ref_image"], fz.arrays["ref_labels"]
    good_nifti = nifti_bytes(target_array)
    found: list[Case] = []

    def seg_target(name, expect, write, suffix=".nii.gz", words=(), same=False, extra=()):
        """segment with the good reference on a target file made by write(path)."""
        target = f"bad_target{suffix}"
        found.append(Case(f"target: {name}", expect, ["segment", *ref, "--target", f"{W}/{target}", *out, *weights, *extra],
                          lambda folder: write(folder / target), "out.nii.gz", "segment", words=words, same_as_baseline=same))

    def raw(data: bytes):
        return lambda path: path.write_bytes(data)

    # --- the baseline and usable variants of it (ok) ---
    found.append(Case("baseline one-shot", "ok", ["segment", *ref, "--target", f"{W}/target.nii.gz", *out, *weights], output="out.nii.gz", check="segment"))
    found.append(Case("baseline from the task file", "ok", ["segment", "--task", f"{W}/task.safetensors", "--target", f"{W}/target.nii.gz", *out, *weights],
                      output="out.nii.gz", check="segment", same_as_baseline=True))
    found.append(Case("NRRD target", "ok", ["segment", "--task", f"{W}/task.safetensors", "--target", f"{W}/target.nrrd", "--output", f"{W}/out.seg.nrrd", *weights],
                      output="out.seg.nrrd", check="segment", same_as_baseline=True))
    found.append(Case("ensemble of two", "ok", ["segment", *ref, *ref2, "--target", f"{W}/target.nii.gz", *out, *weights], output="out.nii.gz", check="segment"))
    found.append(Case("retrieval top-k 2", "ok", ["segment", "--strategy", "retrieval", "--top-k", "2", *ref, *ref2, "--target", f"{W}/target.nii.gz", *out, *weights],
                      output="out.nii.gz", check="segment"))
    found.append(Case("retrieval top-k 50 (more than the pool)", "ok", ["segment", "--strategy", "retrieval", "--top-k", "50", *ref, *ref2,
                      "--target", f"{W}/target.nii.gz", *out, *weights], output="out.nii.gz", check="segment"))
    found.append(Case("encode", "ok", ["encode", *ref, "--output", f"{W}/new.safetensors", *weights], output="new.safetensors", check="encode"))
    found.append(Case("tune 1 step", "ok", ["tune", "--task", f"{W}/task.safetensors", "--image", f"{W}/target.nii.gz", "--labels", f"{W}/target_labels.nii.gz",
                      "--steps", "1", "--output", f"{W}/tuned.safetensors", *weights], output="tuned.safetensors", check="tune"))
    found.append(Case("score", "ok", ["score", "--prediction", f"{W}/target_labels.nii.gz", "--truth", f"{W}/target_labels.nii.gz"], check="score"))
    found.append(Case("info", "ok", ["info", *weights, "--device", "cpu"], check="info"))
    found.append(Case("existing output replaced with --overwrite", "ok", ["segment", *ref, "--target", f"{W}/target.nii.gz", *out, "--overwrite", *weights],
                      setup=lambda f: (f / "out.nii.gz").write_bytes(b"old"), output="out.nii.gz", check="segment"))
    for scale in ("1e18", "1e30", "1e-30"):
        found.append(Case(f"target intensities x {scale} (float64)", "ok",
                          ["segment", "--task", f"{W}/task.safetensors", "--target", f"{W}/scaled.nii.gz", *out, *weights],
                          lambda f, s=float(scale): save_nifti(f / "scaled.nii.gz", target_array.astype(np.float64) * s), "out.nii.gz", "segment",
                          same_as_baseline=True))
    found.append(Case("reference intensities x 1e25", "ok", ["segment", "--reference", f"{W}/big_ref.nii.gz", f"{W}/ref_labels.nii.gz",
                      "--target", f"{W}/target.nii.gz", *out, *weights], lambda f: save_nifti(f / "big_ref.nii.gz", ref_image * np.float32(1e25)),
                      "out.nii.gz", "segment", same_as_baseline=True))
    found.append(Case("target as big-endian float64", "ok", ["segment", "--task", f"{W}/task.safetensors", "--target", f"{W}/be.nii", *out, *weights],
                      lambda f: save_nifti(f / "be.nii", target_array.astype(">f8")), "out.nii.gz", "segment", same_as_baseline=True))
    for geometry, affine in {
        "oblique": np.array([[0.866, -0.5, 0, 3], [0.5, 0.866, 0, -4], [0, 0, 1, 7], [0, 0, 0, 1.0]]),
        "mirrored": np.diag([-1.0, 1.0, 1.0, 1.0]),
        "anisotropic": np.diag([0.8, 1.0, 2.0, 1.0]),
        "permuted": np.array([[0, 0, -1.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]),
    }.items():
        found.append(Case(f"{geometry} target", "ok", ["segment", "--task", f"{W}/task.safetensors", "--target", f"{W}/geo.nii.gz", *out, *weights],
                          lambda f, a=affine: save_nifti(f / "geo.nii.gz", target_array, a), "out.nii.gz", "segment"))
    found.append(Case("float label map of whole numbers", "ok", ["segment", "--reference", f"{W}/ref.nii.gz", f"{W}/float_labels.nii.gz",
                      "--target", f"{W}/target.nii.gz", *out, *weights],
                      lambda f: save_nifti(f / "float_labels.nii.gz", ref_labels.astype(np.float32)), "out.nii.gz", "segment",
                      classes={1: "Segment_1", 2: "Segment_2"}))
    found.append(Case("reference from a .seg.nrrd", "ok", ["segment", "--reference", f"{W}/ref.nii.gz", f"{W}/ref.seg.nrrd", "--target", f"{W}/target.nii.gz",
                      *out, *weights], lambda f: write_label_map(read_label_map(f / "ref_labels.nii.gz"), f / "ref.seg.nrrd"), "out.nii.gz", "segment"))
    found.append(Case("one class by name", "ok", ["segment", *ref, "--classes", "front part", "--target", f"{W}/target.nii.gz", *out, *weights],
                      output="out.nii.gz", check="segment", classes={2: "front part"}))

    # --- target files that cannot be read ---
    for cut in (0, 10, 100, 348, 400, len(good_nifti) // 2, len(good_nifti) - 7):
        seg_target(f".nii truncated at {cut} bytes", "fail", raw(good_nifti[:cut]), ".nii")
    gz = gzip.compress(good_nifti)
    for cut in (1, 10, 50, len(gz) // 3, len(gz) - 200):
        seg_target(f".nii.gz truncated at {cut} bytes", "fail", raw(gz[:cut]), ".nii.gz")
    # Only the gzip trailer (checksum and size) lost: every voxel is still there, and readers take it.
    seg_target(".nii.gz without its last 9 bytes", "either", raw(gz[:-9]), ".nii.gz", same=True)
    rng = np.random.default_rng(7)
    for suffix in (".nii", ".nii.gz", ".nrrd", ".nhdr"):
        seg_target(f"random bytes as {suffix}", "fail", lambda p: p.write_bytes(rng.bytes(3000)), suffix)
        seg_target(f"empty file as {suffix}", "fail", lambda p: p.write_bytes(b""), suffix)
        seg_target(f"text as {suffix}", "fail", lambda p: p.write_text("hello\nworld\n"), suffix)
    for suffix in (".mha", ".png", ".dcm", ".txt", "", ".seg.nrrd", ".NII.GZ.bak"):
        seg_target(f"unsupported name {suffix or '(no extension)'}", "fail", lambda p: p.write_bytes(good_nifti), suffix, words=("supported",))
    seg_target("NIfTI content named .nrrd", "fail", raw(good_nifti), ".nrrd")
    seg_target("NRRD content named .nii.gz", "fail", lambda p: p.write_bytes(nrrd_text(NRRD_OK, target_array.tobytes(order="F"))), ".nii.gz")
    seg_target("uncompressed NIfTI named .nii.gz", "either", lambda p: p.write_bytes(good_nifti), ".nii.gz", same=True)
    found.append(Case("target is a folder", "fail", ["segment", *ref, "--target", f"{W}/folder.nii.gz", *out, *weights],
                      lambda f: (f / "folder.nii.gz").mkdir(), words=("folder",)))
    found.append(Case("target missing", "fail", ["segment", *ref, "--target", f"{W}/nowhere.nii.gz", *out, *weights], words=("not found",)))

    # --- NIfTI headers that lie ---
    def dims(values):
        def edit(h):
            h["dim"] = [len(values), *values, *([1] * (7 - len(values)))]
        return edit

    header_cases = {
        "4000^3 voxels": dims([4000, 4000, 4000]),
        "32767^3 voxels": dims([32767, 32767, 32767]),
        "a negative size": dims([-40, 48, 40]),
        "a zero size": dims([0, 48, 40]),
        "7 dimensions": dims([40, 48, 40, 2, 2, 2, 2]),
        "2 dimensions": dims([40, 48]),
        "NaN voxel size": lambda h: (h.__setitem__("pixdim", [1, np.nan, 1, 1, 1, 1, 1, 1]), h.set_sform(None, code=0), h.set_qform(None, code=0)),
        "zero voxel size": lambda h: (h.__setitem__("pixdim", [1, 0, 1, 1, 1, 1, 1, 1]), h.set_sform(None, code=0), h.set_qform(None, code=0)),
        "unknown data type code": lambda h: h.__setitem__("datatype", 9999),
        "NaN in the sform": lambda h: (h.__setitem__("srow_x", [np.nan, 0, 0, 0]), h.set_qform(None, code=0)),
        "singular sform": lambda h: (h.__setitem__("srow_x", [0, 0, 0, 0]), h.set_qform(None, code=0)),
        "vox_offset past the end": lambda h: h.__setitem__("vox_offset", 10_000_000),
        "bad magic": lambda h: h.__setitem__("magic", b"xx1"),
        "sizeof_hdr wrong": lambda h: h.__setitem__("sizeof_hdr", 12),
    }
    # Defects nibabel (like ITK) repairs on reading, with a message: a zero voxel size read as 1 mm, sizeof_hdr reset.
    repaired = {"zero voxel size", "sizeof_hdr wrong"}
    for name, edit in header_cases.items():
        data = nifti_bytes(target_array, edit=edit)
        expect = "either" if name in repaired else "fail"
        seg_target(f"NIfTI header with {name} (.nii)", expect, raw(data), ".nii")
        seg_target(f"NIfTI header with {name} (.nii.gz)", expect, raw(gzip.compress(data)), ".nii.gz")

    # --- NRRD headers that lie ---
    payload = target_array.astype(np.float32).tobytes(order="F")
    nrrd_cases = {
        "sizes 4000^3": {**NRRD_OK, "sizes": "4000 4000 4000"},
        "sizes missing": {k: v for k, v in NRRD_OK.items() if k != "sizes"},
        "unknown type": {**NRRD_OK, "type": "quaternion"},
        "unknown encoding": {**NRRD_OK, "encoding": "zstd-magic"},
        "unknown space": {**NRRD_OK, "space": "scanner-xyz"},
        "dimension 2": {**NRRD_OK, "dimension": "2", "sizes": "40 48", "space directions": "(1,0,0) (0,1,0)"},
        "too few sizes": {**NRRD_OK, "sizes": "40 48"},
        "negative size": {**NRRD_OK, "sizes": "-40 48 40"},
        "NaN direction": {**NRRD_OK, "space directions": "(nan,0,0) (0,1,0) (0,0,1)"},
        "singular directions": {**NRRD_OK, "space directions": "(0,0,0) (0,1,0) (0,0,1)"},
        "an origin of words": {**NRRD_OK, "space origin": "(a,b,c)"},
    }
    for name, fields in nrrd_cases.items():
        seg_target(f"NRRD header with {name}", "fail", lambda p, f=fields: p.write_bytes(nrrd_text(f, payload)), ".nrrd")
    # NRRD allows fields a reader does not know (pynrrd keeps them as text): the voxels and geometry are intact.
    seg_target("NRRD header with an unknown field", "either", lambda p: p.write_bytes(nrrd_text({**NRRD_OK, "my field": "some value"}, payload)),
               ".nrrd", same=True)
    seg_target("a well-formed NRRD (control)", "ok", lambda p: p.write_bytes(nrrd_text(NRRD_OK, payload)), ".nrrd", same=True)
    seg_target("NRRD data shorter than its sizes", "fail", lambda p: p.write_bytes(nrrd_text(NRRD_OK, payload[:1000])), ".nrrd")
    seg_target("detached header without its data file", "fail",
               lambda p: p.write_bytes(nrrd_text({**NRRD_OK, "data file": "missing.raw.gz"}, b"", gz=False)), ".nhdr")

    # --- target voxels that cannot be segmented ---
    def with_voxels(array, affine=AFFINE, dtype=None):
        return lambda p: save_nifti(p, array, affine, dtype)

    nan = target_array.copy()
    nan[3, 4, 5] = np.nan
    inf = target_array.copy()
    inf[0, 0, 0] = np.inf
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.clip(target_array, 0, 255).astype(np.uint8)
    voxel_cases = {
        "a NaN voxel": (nan, AFFINE, ("NaN",)),
        "an infinite voxel": (inf, AFFINE, ("NaN or infinite",)),
        "all NaN": (np.full(SHAPE, np.nan, np.float32), AFFINE, ("NaN",)),
        "all zero": (np.zeros(SHAPE, np.float32), AFFINE, ("constant",)),
        "constant 500": (np.full(SHAPE, 500, np.int16), AFFINE, ("constant",)),
        "complex voxels": (target_array.astype(np.complex64), AFFINE, ("complex",)),
        "RGB voxels": (rgb, AFFINE, ("color",)),
        "2D": (target_array[:, :, 0], AFFINE, ("2D",)),
        "4D, 3 volumes": (np.stack([target_array] * 3, -1), AFFINE, ("3 volumes",)),
        "1 slice": (target_array[:, :, 20:21], AFFINE, ("mm long", "more slices")),
        "2 slices": (target_array[:, :, 20:22], AFFINE, ("mm long",)),
        "8^3 crop": (target_array[10:18, 10:18, 10:18], AFFINE, ("mm long",)),
        "a label map": (fz.arrays["target_labels"], AFFINE, ("looks like a label map",)),
        "a label map of 30 classes": ((fz.arrays["target_labels"].astype(np.uint8) * 15), AFFINE, ("looks like a label map",)),
    }
    for name, (array, affine, words) in voxel_cases.items():
        seg_target(f"target with {name}", "fail", with_voxels(array, affine), words=words)
    # 40 mm of thick slices: more than one voxel of the network's coarsest features, as fetal MR stacks
    # (22 slices of 3.3 mm) are. Segmented, or refused; a class found nowhere is named in a warning.
    seg_target("target with 4 slices of 0.5 x 0.5 x 10 mm", "either", with_voxels(target_array[:, :, 18:22], np.diag([0.5, 0.5, 10.0, 1.0])), words=("mm long",))
    seg_target("target as int64 x 1e15", "either", with_voxels((target_array.astype(np.float64) * 1e15).astype(np.int64)), same=True)
    seg_target("target as a 0-1 mask", "fail", with_voxels((target_array > 150).astype(np.uint8)), words=("label map",))
    seg_target("target negative (MR shifted)", "either", with_voxels(target_array - 300.0))
    seg_target("target of 1e300", "ok", with_voxels(target_array.astype(np.float64) * 1e300), same=True)

    # --- references that cannot be used ---
    def seg_ref(name, expect, image, labels, setup, words=(), classes=None, extra=()):
        found.append(Case(f"reference: {name}", expect, ["segment", "--reference", f"{W}/{image}", f"{W}/{labels}", *extra,
                                                           "--target", f"{W}/target.nii.gz", *out, *weights],
                          setup, "out.nii.gz", "segment", classes=classes or dict(NAMES), words=words))

    lab = ref_labels
    one = np.where(lab == 1, 1, 0).astype(np.uint8)
    one[tuple(np.argwhere(lab == 2)[0])] = 2
    many = (np.arange(np.prod(SHAPE)) % 300).reshape(SHAPE).astype(np.uint16)
    label_cases = {
        "empty label map": (np.zeros(SHAPE, np.uint8), ("no labelled voxels",)),
        "negative labels": (lab.astype(np.int16) - 1, ("negative",)),
        "fractional labels": (lab.astype(np.float32) * 0.5, ("non-integer",)),
        "NaN labels": (np.where(lab > 0, np.nan, 0).astype(np.float32), ("non-integer",)),
        "labels of another shape": (lab[:-1], ("shape",)),
        "a one-voxel class": (one, ("fewer than 8",)),
        "300 distinct labels": (many, ("looks like a scan",)),
        "the scan as labels (uint8)": (np.clip(ref_image, 0, 255).astype(np.uint8), ("looks like a scan",)),
        "2D labels": (lab[:, :, 0], ("2D",)),
        "complex labels": (lab.astype(np.complex64), ("voxel type",)),
    }
    for name, (array, words) in label_cases.items():
        seg_ref(name, "fail", "ref.nii.gz", "bad_labels.nii.gz", lambda f, a=array: save_nifti(f / "bad_labels.nii.gz", a), words)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    seg_ref("labels on a shifted grid", "fail", "ref.nii.gz", "bad_labels.nii.gz", lambda f: save_nifti(f / "bad_labels.nii.gz", lab, shifted),
            ("different geometry",))
    seg_ref("image and labels swapped", "fail", "ref_labels.nii.gz", "ref.nii.gz", lambda f: None, ("looks like a label map",))
    seg_ref("a one-voxel class left out with --classes", "ok", "ref.nii.gz", "dot.nii.gz", lambda f: save_nifti(f / "dot.nii.gz", one),
            classes={1: "Segment_1"}, extra=("--classes", "1"))
    seg_ref("label values up to 70000", "ok", "ref.nii.gz", "big_values.nii.gz",
            lambda f: save_nifti(f / "big_values.nii.gz", np.where(lab == 2, np.uint32(70000), lab.astype(np.uint32))), classes={1: "Segment_1", 70000: "Segment_70000"})
    seg_ref("a broken .ctbl beside the labels", "fail", "ref.nii.gz", "ref_labels.nii.gz",
            lambda f: (f / "ref_labels.ctbl").write_text("1 liver 300 0 0 255\n"), ("ref_labels.ctbl",))
    seg_ref("a .ctbl of binary junk", "fail", "ref.nii.gz", "ref_labels.nii.gz", lambda f: (f / "ref_labels.ctbl").write_bytes(b"\xff\xfe\x00junk"), ("ctbl",))
    seg_ref("a .ctbl with a damaged names line", "ok", "ref.nii.gz", "ref_labels.nii.gz",
            lambda f: (f / "ref_labels.ctbl").write_text((f / "ref_labels.ctbl").read_text().replace("# IrisSegment names: {", "# IrisSegment names: {{")),
            classes={1: "kidney left", 2: "front part"})
    seg_ref("a broken dataset.json two folders up", "fail", "ref.nii.gz", "labelsTr/case.nii.gz",
            lambda f: ((f / "labelsTr").mkdir(), save_nifti(f / "labelsTr" / "case.nii.gz", lab), (f / "dataset.json").write_text("{not json")),
            ("dataset.json",))
    seg_ref("reference scan with a NaN voxel", "fail", "nan_ref.nii.gz", "ref_labels.nii.gz",
            lambda f: save_nifti(f / "nan_ref.nii.gz", np.where(np.arange(ref_image.size).reshape(SHAPE) == 9, np.nan, ref_image).astype(np.float32)), ("NaN",))
    seg_ref("reference of one slice", "fail", "slice.nii.gz", "slice_labels.nii.gz",
            lambda f: (save_nifti(f / "slice.nii.gz", ref_image[:, :, 20:21]), save_nifti(f / "slice_labels.nii.gz", lab[:, :, 20:21])), ("mm long",))
    seg_ref("a corrupt .seg.nrrd", "fail", "ref.nii.gz", "bad.seg.nrrd", lambda f: (f / "bad.seg.nrrd").write_bytes(b"NRRD0004\ntype: uchar\n\n\x00\x01"))
    seg_ref("a class not in the labels", "fail", "ref.nii.gz", "ref_labels.nii.gz", lambda f: None, ("liver",), extra=("--classes", "liver"))
    seg_ref("class 99", "fail", "ref.nii.gz", "ref_labels.nii.gz", lambda f: None, ("99",), extra=("--classes", "99"))
    seg_ref("--modality CT for an MR reference", "fail", "ref.nii.gz", "ref_labels.nii.gz", lambda f: None, ("--allow-modality-mismatch",),
            extra=("--modality", "CT"))

    # --- task files that cannot be used ---
    task_bytes = (fz.base / "task.safetensors").read_bytes()

    def seg_task(name, write, words=()):
        found.append(Case(f"task file: {name}", "fail", ["segment", "--task", f"{W}/bad.safetensors", "--target", f"{W}/target.nii.gz", *out, *weights],
                          lambda f: write(f / "bad.safetensors"), words=words))

    for cut in (0, 5, 8, 40, len(task_bytes) // 2, len(task_bytes) - 3):
        seg_task(f"truncated at {cut} bytes", lambda p, c=cut: p.write_bytes(task_bytes[:c]))
    for header in (b"[]", b"3", b'"text"', b"null", b'{"tokens": 5}', b'{"tokens": {"dtype": "F32"}}', b"{\"__metadata__\": [1]}"):
        seg_task(f"JSON header {header.decode()}", lambda p, h=header: p.write_bytes(struct.pack("<Q", len(h)) + h))
    seg_task("random bytes", lambda p: p.write_bytes(np.random.default_rng(3).bytes(2000)))
    seg_task("the weights file", lambda p: shutil.copy(fz.weights, p), ("not an IrisSegment task file",))
    seg_task("a NIfTI file", lambda p: p.write_bytes(good_nifti))

    def edited_task(**meta):
        def write(path):
            from IrisSegmentLib.model.serialization import load_tensors, save_tensors

            tensors, metadata = load_tensors(fz.base / "task.safetensors")
            for key, value in meta.items():
                if key == "tokens":
                    tensors["tokens"] = value
                elif value is None:
                    metadata.pop(key, None)
                else:
                    metadata[key] = value
            save_tensors(path, tensors, metadata)
        return write

    import torch

    for name, edit in {
        "NaN tokens": dict(tokens=torch.full_like(fz.task.tokens, float("nan"))),
        "no label values": dict(label_values=None),
        "label values of another count": dict(label_values="[1, 2, 3]"),
        "label values not JSON": dict(label_values="[1, 2"),
        "segments not a mapping": dict(segments="[1, 2]"),
        "thresholds out of range": dict(thresholds="[0, 1.5]"),
        "spacing not a number": dict(spacing="fast"),
        "another model": dict(model_id="somebody-else"),
        "future format": dict(format_version="99"),
        "another format": dict(format="iris-segment-weights"),
        "flat tokens": dict(tokens=fz.task.tokens[0]),
    }.items():
        seg_task(name, edited_task(**edit))
    found.append(Case("task file missing", "fail", ["segment", "--task", f"{W}/nowhere.safetensors", "--target", f"{W}/target.nii.gz", *out, *weights]))
    found.append(Case("task file is a folder", "fail", ["segment", "--task", f"{W}/dir.safetensors", "--target", f"{W}/target.nii.gz", *out, *weights],
                      lambda f: (f / "dir.safetensors").mkdir()))
    found.append(Case("task class not in the task", "fail", ["segment", "--task", f"{W}/task.safetensors", "--classes", "liver", "--target",
                                                             f"{W}/target.nii.gz", *out, *weights], words=("no class 'liver'",)))

    # --- weights ---
    for name, write in {
        "missing": lambda f: None,
        "truncated": lambda f: (f / "w.safetensors").write_bytes(fz.weights.read_bytes()[:1000]),
        "random bytes": lambda f: (f / "w.safetensors").write_bytes(np.random.default_rng(4).bytes(5000)),
        "a task file": lambda f: shutil.copy(f / "task.safetensors", f / "w.safetensors"),
        "a folder": lambda f: (f / "w.safetensors").mkdir(),
    }.items():
        found.append(Case(f"weights: {name}", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", *out, "--weights", f"{W}/w.safetensors"], write))

    # --- option values ---
    seg = ["segment", *ref, "--target", f"{W}/target.nii.gz", *out, *weights]
    for name, extra, words in [
        ("--top-k 0", ["--strategy", "retrieval", "--top-k", "0"], ("--top-k",)),
        ("--top-k -1", ["--strategy", "retrieval", "--top-k", "-1"], ("--top-k",)),
        ("--top-k abc", ["--strategy", "retrieval", "--top-k", "abc"], ("--top-k",)),
        ("--top-k 1.5", ["--strategy", "retrieval", "--top-k", "1.5"], ("--top-k",)),
        ("--top-k without retrieval", ["--top-k", "2"], ("--top-k",)),
        ("--strategy bogus", ["--strategy", "bogus"], ("--strategy",)),
        ("--strategy memory with a reference", ["--strategy", "memory", "--classes", "liver"], ("memory",)),
        ("one-shot with two references", ["--strategy", "one-shot", *ref2], ("one-shot",)),
        ("--device tpu", ["--device", "tpu"], ("unknown device",)),
        ("--device cuda:x", ["--device", "cuda:x"], ("unknown device",)),
        ("--device ''", ["--device", ""], ()),
        ("--modality PET", ["--modality", "PET"], ("modality",)),
        ("unknown option", ["--fast"], ("unrecognized",)),
        ("--reference with one file", ["--reference", f"{W}/ref.nii.gz"], ()),
        ("--classes with nothing", ["--classes"], ("--classes",)),
    ]:
        found.append(Case(f"option: {name}", "either" if name == "--device ''" else "fail", [*seg, *extra], output="out.nii.gz", check="segment", words=words))
    found.append(Case("option: memory without --classes", "fail", ["segment", "--strategy", "memory", "--target", f"{W}/target.nii.gz", *out, *weights],
                      words=("--classes",)))
    found.append(Case("option: memory with weights without a bank", "fail", ["segment", "--strategy", "memory", "--classes", "liver", "--target",
                                                                           f"{W}/target.nii.gz", *out, *weights], words=("no memory bank",)))
    found.append(Case("option: nothing to segment from", "fail", ["segment", "--target", f"{W}/target.nii.gz", *out, *weights], words=("--reference",)))
    found.append(Case("option: no command", "fail", []))
    found.append(Case("option: unknown command", "fail", ["segmnt"], words=("invalid choice",)))
    tune = ["tune", "--task", f"{W}/task.safetensors", "--image", f"{W}/target.nii.gz", "--labels", f"{W}/target_labels.nii.gz"]
    for steps in ("0", "-1", "1001", "99999999999999999999", "abc", "2.5"):
        found.append(Case(f"option: tune --steps {steps}", "fail", [*tune, "--steps", steps, "--output", f"{W}/t.safetensors", *weights], words=("--steps",)))
    for option in ("--cases", "--references", "--tuning-cases", "--tune-steps", "--overlays"):
        found.append(Case(f"option: evaluate {option} -1", "fail", ["evaluate", "--data", f"{W}/nowhere", "--output", f"{W}/report", option, "-1", *weights],
                          words=(option,)))
    found.append(Case("option: evaluate on a missing dataset", "fail", ["evaluate", "--data", f"{W}/nowhere", "--output", f"{W}/report", *weights]))

    # --- output paths ---
    found.append(Case("output exists, no --overwrite", "fail", [*seg], lambda f: (f / "out.nii.gz").write_bytes(b"precious"), words=("--overwrite",)))
    found.append(Case("output's .ctbl exists, no --overwrite", "fail", [*seg], lambda f: (f / "out.ctbl").write_text("1 mine 1 2 3 255\n"), words=("out.ctbl",)))
    found.append(Case("output is the target", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", "--output", f"{W}/target.nii.gz", "--overwrite", *weights],
                      words=("one of the inputs",)))
    found.append(Case("output is the reference's labels", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", "--output", f"{W}/ref_labels.nii.gz",
                                                                 "--overwrite", *weights], words=("one of the inputs",)))
    found.append(Case("output's .ctbl is the reference's", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", "--output", f"{W}/ref_labels.nrrd",
                                                                  "--overwrite", *weights], words=("ref_labels.ctbl",)))
    found.append(Case("output through a symlink to the target", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", "--output", f"{W}/link.nii.gz",
                                                                       "--overwrite", *weights], lambda f: (f / "link.nii.gz").symlink_to(f / "target.nii.gz"),
                      words=("one of the inputs",)))
    for name in ("out.png", "out.mha", "out.nhdr", "out", ".nii.gz", "out.seg"):
        found.append(Case(f"output named {name}", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", "--output", f"{W}/{name}", *weights],
                          words=("supported",)))
    found.append(Case("output in a missing folder", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", "--output", f"{W}/no/such/out.nii.gz", *weights],
                      words=("does not exist",)))
    found.append(Case("output is a folder", "fail", ["segment", *ref, "--target", f"{W}/target.nii.gz", "--output", f"{W}/dir.nii.gz", "--overwrite", *weights],
                      lambda f: (f / "dir.nii.gz").mkdir(), words=("folder",)))
    found.append(Case("encode output .nii.gz", "fail", ["encode", *ref, "--output", f"{W}/task.nii.gz", *weights], words=(".safetensors",)))
    found.append(Case("tune output .nii.gz", "fail", [*tune, "--output", f"{W}/tuned.nii.gz", *weights], words=(".safetensors",)))
    found.append(Case("encode output exists", "fail", ["encode", *ref, "--output", f"{W}/task.safetensors", *weights], words=("exists",)))
    found.append(Case("tune output is its task", "fail", [*tune, "--output", f"{W}/task.safetensors", "--overwrite", *weights], words=("one of the inputs",)))
    if read_only is not None:
        for command, argv in (("segment", [*seg[:-4]]), ("encode", ["encode", *ref]), ("tune", tune)):
            name = "out.nii.gz" if command == "segment" else "out.safetensors"
            found.append(Case(f"{command} output in a read-only folder", "fail", [*argv, "--output", str(read_only / name), *weights],
                              words=("not writable",)))

    # --- tune inputs ---
    tune_out = ["--output", f"{W}/tuned.safetensors", "--steps", "1", *weights]
    for name, image, labels, setup, words in [
        ("image and labels swapped", "target_labels.nii.gz", "target.nii.gz", lambda f: None, ("looks like a label map",)),
        ("the scan as labels", "target.nii.gz", "scan_labels.nii.gz",
         lambda f: save_nifti(f / "scan_labels.nii.gz", np.clip(target_array, 0, 255).astype(np.uint8)), ("looks like a scan",)),
        ("labels without the task's classes", "target.nii.gz", "other.nii.gz",
         lambda f: save_nifti(f / "other.nii.gz", (fz.arrays["target_labels"] > 0).astype(np.uint8) * 7), ("none of the task's classes",)),
        ("labels of another shape", "target.nii.gz", "small.nii.gz", lambda f: save_nifti(f / "small.nii.gz", fz.arrays["target_labels"][:-2]), ("shape",)),
        ("empty labels", "target.nii.gz", "empty.nii.gz", lambda f: save_nifti(f / "empty.nii.gz", np.zeros(SHAPE, np.uint8)), ("none of the task's classes",)),
        ("a NaN image", "nan.nii.gz", "target_labels.nii.gz", lambda f: save_nifti(f / "nan.nii.gz", nan), ("NaN",)),
        ("a 1-slice image", "slice.nii.gz", "slice_labels.nii.gz",
         lambda f: (save_nifti(f / "slice.nii.gz", target_array[:, :, 20:21]), save_nifti(f / "slice_labels.nii.gz", fz.arrays["target_labels"][:, :, 20:21])),
         ("mm long",)),
    ]:
        found.append(Case(f"tune: {name}", "fail", ["tune", "--task", f"{W}/task.safetensors", "--image", f"{W}/{image}", "--labels", f"{W}/{labels}", *tune_out],
                          setup, words=words))
    found.append(Case("tune: labels with an extra class", "ok", ["tune", "--task", f"{W}/task.safetensors", "--image", f"{W}/target.nii.gz",
                                                               "--labels", f"{W}/extra.nii.gz", *tune_out],
                      lambda f: save_nifti(f / "extra.nii.gz", np.where(fz.arrays["target_labels"] == 0, 0, fz.arrays["target_labels"]).astype(np.uint8)
                                           + (np.indices(SHAPE)[0] < 3).astype(np.uint8) * 5), "tuned.safetensors", "tune"))

    # --- score and pool ---
    found.append(Case("score: grids differ", "fail", ["score", "--prediction", f"{W}/small.nii.gz", "--truth", f"{W}/target_labels.nii.gz"],
                      lambda f: save_nifti(f / "small.nii.gz", fz.arrays["target_labels"][:-1]), words=("same voxel grid",)))
    found.append(Case("score: a scan as prediction", "fail", ["score", "--prediction", f"{W}/target.nii.gz", "--truth", f"{W}/target_labels.nii.gz"],
                      words=("non-integer",)))
    found.append(Case("score: missing truth", "fail", ["score", "--prediction", f"{W}/target_labels.nii.gz", "--truth", f"{W}/nowhere.nii.gz"],
                      words=("not found",)))
    found.append(Case("pool: missing reports", "fail", ["pool", "--reports", f"{W}/nowhere", "--output", f"{W}/pooled.md"], words=("not found",)))
    found.append(Case("pool: a results.csv of junk", "fail", ["pool", "--reports", f"{W}/r", "--output", f"{W}/pooled.md"],
                      lambda f: ((f / "r").mkdir(), (f / "r" / "results.csv").write_bytes(b"\x00\x01junk,,\n1,2"))))
    return found


def main_fuzz(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=0, help="run the first COUNT cases (all of them when 0 or more than there are)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed) for inspection")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    parser.add_argument("--verbose", action="store_true", help="print each case's error line")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from engine_fixtures import random_model

    from IrisSegmentLib.model.weights import save_model

    root = Path(tempfile.mkdtemp(prefix="iris_fuzz_"))
    started = time.time()
    try:
        weights = root / "small.safetensors"
        save_model(random_model(0), weights, provenance={"purpose": "fuzz", "trained": "no (random)"})
        fz = Fuzz(root, weights)
        everything = cases(fz, read_only_folder(root))
        chosen = [c for c in everything if not args.only or args.only in c.name]
        if args.count and args.count < len(chosen):
            chosen = chosen[: args.count]
        counts: dict[tuple[str, str], int] = {}  # (expected, exit code) -> cases
        broken = []
        for index, case in enumerate(chosen):
            rc, problems = fz.run(case, index)
            counts[case.expect, str(rc)] = counts.get((case.expect, str(rc)), 0) + 1
            if problems:
                broken.append((case, problems))
            print(f"{'FAIL' if problems else 'ok  '} [{case.expect:6s} -> exit {rc}] {case.name}", flush=True)
            if args.verbose and fz.last_error:
                print("      " + fz.last_error.replace(str(root), "<tmp>"), flush=True)
            for problem in problems:
                print("      " + problem.replace("\n", "\n      "), flush=True)
            shutil.rmtree(root / f"case{index:03d}", ignore_errors=True)
        print(f"\n{len(chosen)} cases ({sum(c.expect == 'fail' for c in chosen)} expected to fail, {sum(c.expect == 'ok' for c in chosen)} to succeed, "
              f"{sum(c.expect == 'either' for c in chosen)} either) in {time.time() - started:.0f} s: "
              f"{len(chosen) - len(broken)} as expected, {len(broken)} broke a rule.")
        print("exit codes: " + ", ".join(f"expected {e}, exit {r}: {n}" for (e, r), n in sorted(counts.items())))
        for case, problems in broken:
            print(f"  {case.name}: {problems[0].splitlines()[0]}")
        return 1 if broken else 0
    finally:
        if (root / "read_only").exists():
            (root / "read_only").chmod(0o755)
        if args.keep:
            print(f"work folder: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main_fuzz())
