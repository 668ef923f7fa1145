"""Encode once vs re-encode per target and class (the UniverSeg-style cost), and per-target latency/memory.

Iris encodes a reference's classes once into task embeddings and reuses them for every target;
a method that re-encodes the reference with every target and class pays n*m encoder passes.
This script measures both on this machine for n targets x m classes at the working size, then the
full predictor path (preprocessing, one decoder pass for all classes, the second pass for thin
classes, mapping back; and without the second pass) on a real 128^3 CT, in a fresh process so its
peak memory is its own.

    python benchmarks/encode_once.py [--threads 2] [--weights FILE] [--output benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "HeadNeck_CT"


def _model(weights: str | None):
    from IrisSegmentLib.model.config import IrisConfig
    from IrisSegmentLib.model.iris import IrisModel
    from IrisSegmentLib.model.weights import default_weights_path, load_model

    path = Path(weights) if weights else default_weights_path()
    if path.is_file():
        return load_model(path, "cpu"), str(path)
    torch.manual_seed(0)
    return IrisModel(IrisConfig()).eval(), "random weights (default config; cost does not depend on the values)"


def compare_paths(model, size: int, targets: list[int], classes: list[int], references: int = 1) -> list[dict]:
    """Seconds for n targets x m classes with k references: encode the k references once (their
    embeddings averaged, the context ensemble) + n segmentations, vs for every target and class
    encoding the k references again (the UniverSeg-style cost) + one segmentation."""
    rng = torch.Generator().manual_seed(0)
    support = [torch.randn(1, 1, size, size, size, generator=rng) for _ in range(references)]
    images = [torch.randn(1, 1, size, size, size, generator=rng) for _ in range(max(targets))]
    masks = torch.zeros(1, max(classes), size, size, size)
    for k in range(max(classes)):  # one small cube per class
        c = 8 + (k * 7) % (size - 24)
        masks[0, k, c : c + 12, c : c + 12, c : c + 12] = 1
    rows = []

    def encode(class_masks: torch.Tensor) -> torch.Tensor:
        return torch.stack([model.encode_task(image, class_masks) for image in support]).mean(0)

    with torch.no_grad():
        model.segment(images[0], encode(masks[:, :1]))  # warm-up
        for m in classes:
            for n in targets:
                start = time.perf_counter()
                tokens = encode(masks[:, :m])
                for target in images[:n]:
                    model.segment(target, tokens)
                once = time.perf_counter() - start
                start = time.perf_counter()
                for target in images[:n]:
                    for k in range(m):
                        model.segment(target, encode(masks[:, k : k + 1]))
                again = time.perf_counter() - start
                rows.append({"references": references, "targets": n, "classes": m, "encode_once_s": once, "reencode_s": again, "ratio": again / once})
                print(f"  k={references} n={n:2d} m={m:2d}: encode once {once:7.2f} s, re-encode {again:8.2f} s, ratio {again / once:5.1f}x", flush=True)
    return rows


def component_costs(model, size: int, classes: list[int]) -> dict:
    """Seconds of each part at the working size: target encoder pass E, task encoding T(m) of a
    reference's features, decoder D(m). They explain the ratio: with one reference, n targets and
    m classes it is n*m*(2E + T(1) + D(1)) / (E + T(m) + n*(E + D(m))). At n=10, m=5 it reaches
    10x only if 5*T(1) - T(5) >= E + 10*D(5) - 5*D(1): the task-encoding work shared across classes
    must outweigh the decoder, which no network whose task encoding is linear in m can do."""
    rng = torch.Generator().manual_seed(1)
    image = torch.randn(1, 1, size, size, size, generator=rng)
    masks = torch.zeros(1, max(classes), size, size, size)
    for k in range(max(classes)):
        c = 8 + (k * 7) % (size - 24)
        masks[0, k, c : c + 12, c : c + 12, c : c + 12] = 1

    def seconds(fn, repeats: int = 3) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    with torch.no_grad():
        features = model.encoder(image)
        costs = {"E": seconds(lambda: model.encoder(image))}
        for m in sorted({1, *classes}):
            tokens = model.task_encoder(features, masks[:, :m])
            costs[f"T({m})"] = seconds(lambda: model.task_encoder(features, masks[:, :m]))
            costs[f"D({m})"] = seconds(lambda: model.decoder(features, tokens, (size,) * 3))
    return costs


def latency_child(weights: str | None, threads: int) -> None:
    """Runs in its own process: one real 128^3 target, all classes, through the full predictor."""
    torch.set_num_threads(threads)
    from IrisSegmentLib.inference.predictor import IrisPredictor
    from IrisSegmentLib.io import read_image, read_label_map

    reference_id, target_id = "openkbp_pt_100", "openkbp_pt_101"
    ref_image = read_image(DATA / "imagesTr" / f"{reference_id}_0000.nii.gz")
    ref_labels = read_label_map(DATA / "labelsTr" / f"{reference_id}.nii.gz")
    target = read_image(DATA / "imagesTr" / f"{target_id}_0000.nii.gz")
    predictor = IrisPredictor(_model(weights)[0])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    task = predictor.encode_reference(ref_image, ref_labels)
    encode = time.perf_counter() - start
    times: dict[bool, list[float]] = {True: [], False: []}
    for refine in (True, False):
        predictor.segment(target, task, refine=refine)  # warm-up
        for _ in range(3):
            start = time.perf_counter()
            predictor.segment(target, task, refine=refine)
            times[refine].append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({
        "target_shape": list(target.shape), "classes": len(task.label_values), "thin_classes": len(task.refined), "encode_s": encode,
        "segment_s_median": float(np.median(times[True])), "segment_s_all": times[True],
        "first_pass_only_s_median": float(np.median(times[False])), "peak_rss_mb": peak, "rss_after_load_mb": baseline,
    }))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m, color in zip(sorted({r["classes"] for r in rows}), ("tab:blue", "tab:orange", "tab:green")):
        sub = [r for r in rows if r["classes"] == m]
        n = [r["targets"] for r in sub]
        ax.plot(n, [r["encode_once_s"] for r in sub], "o-", color=color, label=f"encode once, {m} classes")
        ax.plot(n, [r["reencode_s"] for r in sub], "s--", color=color, label=f"re-encode per target and class, {m} classes")
    ax.set_yscale("log")
    ax.set_xlabel("targets")
    ax.set_ylabel("seconds (log)")
    ax.set_title("Task embeddings reused vs re-encoded (CPU)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights")
    parser.add_argument("--size", type=int, default=128, help="working size of the synthetic comparison")
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 5, 15])
    parser.add_argument("--references", type=int, default=1, help="k references per task (context ensemble)")
    parser.add_argument("--skip-latency", action="store_true", help="only the encode-once comparison")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--latency-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.latency_child:
        latency_child(args.weights, args.threads)
        return
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    model, source = _model(args.weights)
    print(f"model: {source}; {args.threads} CPU threads; {args.size}^3")
    rows = compare_paths(model, args.size, args.targets, args.classes, args.references)
    costs = component_costs(model, args.size, args.classes)
    latency = None
    if DATA.is_dir() and not args.skip_latency:
        cmd = [sys.executable, __file__, "--latency-child", "--threads", str(args.threads)] + (["--weights", args.weights] if args.weights else [])
        latency = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    lines = ["| references | targets | classes | encode once (s) | re-encode (s) | ratio |", "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['references']} | {r['targets']} | {r['classes']} | {r['encode_once_s']:.2f} | {r['reencode_s']:.2f} | {r['ratio']:.1f}x |" for r in rows]
    lines += ["", "Parts (seconds): " + ", ".join(f"{k} {v:.3f}" for k, v in costs.items()) + ".",
              "With one reference the ratio is n*m*(2E + T(1) + D(1)) / (E + T(m) + n*(E + D(m))). At n=10, m=5 it reaches 10x only if",
              "5*T(1) - T(5) >= E + 10*D(5) - 5*D(1) (task-encoding work shared across classes outweighing the decoder); no network",
              "whose task encoding is linear in m can. More classes, more references (the ensemble) or more targets raise the ratio."]
    if latency:
        lines += ["", f"Real 128^3 CT target ({latency['classes']} classes, {latency['thin_classes']} of them thin), full predictor path, {args.threads} threads: "
                  f"{latency['segment_s_median']:.2f} s per target with the second pass for thin classes ({latency['first_pass_only_s_median']:.2f} s "
                  f"without: --no-refine; medians of 3), reference encoded in {latency['encode_s']:.2f} s, "
                  f"peak memory {latency['peak_rss_mb']:.0f} MB (process RSS; {latency['rss_after_load_mb']:.0f} MB after loading torch and the model)."]
    table = "\n".join(lines)
    print(table)
    stem = "encode_once" if args.references == 1 else f"encode_once_k{args.references}"
    (args.output / f"{stem}.md").write_text(f"Model: {source}\n\n{table}\n")
    (args.output / f"{stem}.json").write_text(json.dumps({"rows": rows, "parts_s": costs, "latency": latency, "threads": args.threads, "model": source}, indent=1))
    plot(rows, args.output / f"{stem}.png")
    print(f"saved {args.output / f'{stem}.png'}")


if __name__ == "__main__":
    main()
