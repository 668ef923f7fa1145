"""Make docs/screenshot.png: a real result of the Slicer module's logic, rendered offscreen.

The same path the panel takes, without the desktop app: a slicer-core MRML scene, the bundled sample
pair loaded as Sample Data loads it (sample_data.load_sample), IrisSceneLogic.start_segment with the
bundled model (one-shot), the result read back from the output segmentation node. Drawn with
matplotlib: the reference with its segmentation, the target with IrisSegment's result, and the target's
manual labels (never shown to the model) with the Dice of each class.

Run from the repository root:  python docs/make_screenshot.py  (needs the 'test' extra: slicer-core, matplotlib)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

import slicer  # noqa: E402
from slicer_scene import scene_context  # noqa: E402

from IrisSegmentLib.model.weights import default_weights_path  # noqa: E402
from IrisSegmentLib.slicer_logic import IrisSceneLogic, Reference, sample_data, scene_bridge  # noqa: E402

OUTPUT = ROOT / "docs" / "screenshot.png"


def masks(node, geometry) -> dict[str, tuple[np.ndarray, tuple]]:
    """Segment name -> ((k, j, i) mask on the geometry's grid, color)."""
    segmentation = node.GetSegmentation()
    return {
        segmentation.GetSegment(i).GetName(): (slicer.util.arrayFromSegmentBinaryLabelmap(node, i, geometry) > 0, segmentation.GetSegment(i).GetColor())
        for i in scene_bridge.segment_ids(node)
    }


def draw(axis, image: np.ndarray, segments: dict, index: int, title: str) -> None:
    """One slice (the k-th along the first array axis), the segments filled half-transparent and outlined."""
    axis.imshow(image[index], cmap="gray", interpolation="nearest", origin="lower")
    for mask, color in segments.values():
        overlay = np.zeros((*mask[index].shape, 4))
        overlay[mask[index]] = (*color, 0.45)
        axis.imshow(overlay, interpolation="nearest", origin="lower")
        if mask[index].any():
            axis.contour(mask[index].astype(float), levels=[0.5], colors=[color], linewidths=1.5, origin="lower")
    axis.set_title(title, fontsize=10)
    axis.axis("off")


def main() -> None:
    if not default_weights_path().is_file():
        sys.exit(f"the bundled model is missing ({default_weights_path()}): the screenshot shows its result")
    with scene_context():
        sample = sample_data.load_sample()
        logic = IrisSceneLogic()  # the bundled model, as in the panel
        try:
            job = logic.start_segment(sample.target, [Reference(sample.reference, sample.reference_segmentation)])
            while not job.tick()[1]:
                pass
            output = job.result()
        finally:
            logic.shutdown()
        truth_node = sample_data.load_target_truth()
        reference = slicer.util.arrayFromVolume(sample.reference)
        target = slicer.util.arrayFromVolume(sample.target)
        reference_segments = masks(sample.reference_segmentation, sample.reference)
        result = masks(output, sample.target)
        truth = {name: (mask, result[name][1]) for name, (mask, _) in masks(truth_node, sample.target).items()}
        dice = {
            name: 2 * (mask & result[name][0]).sum() / max(1, mask.sum() + result[name][0].sum())
            for name, (mask, _) in truth.items()
        }
        reference_slice = int(np.argmax(sum(m.sum(axis=(1, 2)) for m, _ in reference_segments.values())))
        target_slice = int(np.argmax(sum(m.sum(axis=(1, 2)) for m, _ in truth.values())))

    figure, axes = plt.subplots(1, 3, figsize=(9.6, 4.2), dpi=150)
    draw(axes[0], reference, reference_segments, reference_slice, "Reference: scan + its segmentation")
    draw(axes[1], target, result, target_slice, "Target: IrisSegment's result")
    draw(axes[2], target, truth, target_slice, "Target: manual labels (not shown to the model)")
    names = ", ".join(f"{name} {value:.2f}" for name, value in dice.items())
    figure.suptitle(f"IrisSegment, one-shot, on the bundled hippocampus MRI pair with the bundled model\nDice against the manual labels: {names}", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for _, color in result.values()]
    figure.legend(handles, list(result), loc="lower center", ncol=len(result), frameon=False, fontsize=9)
    figure.tight_layout(rect=(0, 0.06, 1, 0.93))
    figure.savefig(OUTPUT)
    print(f"wrote {OUTPUT} ({time.strftime('%Y-%m-%d')}); Dice: {names}")


if __name__ == "__main__":
    main()
