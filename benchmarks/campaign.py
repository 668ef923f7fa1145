"""Which checkpoint of a training campaign ships: its generalization tables side by side.

`generalization.py --weights CHECKPOINT --tag TAG` scores one checkpoint into
benchmarks/results/generalization_TAG.json. This script reads several such tables and a baseline (the
shipped model's, run the same way) and prints one row per checkpoint: its step, the score that ranks
checkpoints (`generalization_score`), self-segmentation and one-shot Dice of each unseen set, and
one-shot Dice of each in-distribution set. The ship rule is the one the model card states: a
checkpoint ships only with a higher score than the baseline and in-distribution one-shot Dice not below
the baseline's on any set. The benchmark's in-distribution pairs are few (4-6 targets of one
reference), so a checkpoint that passes here is then checked on every held-out case (`iris-segment
evaluate ... --strategy one-shot`), which decides (Hippocampus: the shipped model 0.825 on the 6 pairs,
0.813 on the 50 held-out cases; v3's step 4,000 0.814 and 0.795). Only tables of one strategy and one setting of the second pass compare;
run every checkpoint with the baseline's command.

    python benchmarks/campaign.py --baseline shipped_one-shot_refined --tags v3_step2000 v3_step3000 --name v3

Writes benchmarks/results/campaign_NAME.md, .json and .png (score and in-distribution Dice by step).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalization import IN_DISTRIBUTION, RESULTS, UNSEEN_CLASSES, UNSEEN_SET  # noqa: E402


def load(tag: str, results: Path = RESULTS) -> dict:
    path = results / f"generalization_{tag}.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: score the checkpoint first (python benchmarks/generalization.py --weights ... --tag {tag})")
    return json.loads(path.read_text())


def step_of(table: dict) -> int | None:
    """The training step generalization.py recorded in the model's description."""
    match = re.search(r"step (\d+)", table["model"])
    return int(match.group(1)) if match else None


def figures(table: dict) -> dict[str, float | None]:
    """The columns of one row: score, then per set the Dice that the ship rule and the issue look at."""
    out: dict[str, float | None] = {"score": table["score"]}
    for row in table["rows"]:
        s, name = row["summary"], row["set"]
        if row["kind"] == UNSEEN_SET:
            out[f"{name} self"], out[f"{name} one-shot"] = s["self_counted"], s["one_shot"]
        elif row["kind"] == UNSEEN_CLASSES:
            out[f"{name} unseen classes"] = s["self_unseen_classes"]
        elif row["kind"] == IN_DISTRIBUTION:
            out[f"{name} one-shot"] = s["one_shot"]
    return out


def verdict(candidate: dict, baseline: dict) -> str:
    """The ship rule against the baseline's table: 'ships', or what stops it."""
    ours, theirs = figures(candidate), figures(baseline)
    reasons = []
    if ours["score"] is None or theirs["score"] is None or ours["score"] <= theirs["score"]:
        reasons.append("score not above the baseline's")
    in_distribution = [row["set"] for row in baseline["rows"] if row["kind"] == IN_DISTRIBUTION]
    for name in in_distribution:
        key = f"{name} one-shot"
        if key not in ours or ours[key] is None:
            reasons.append(f"{name} not scored")
        elif theirs[key] is not None and ours[key] < theirs[key]:
            reasons.append(f"{name} {ours[key]:.3f} < {theirs[key]:.3f}")
    return "ships" if not reasons else "; ".join(reasons)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def campaign_table(baseline_tag: str, tags: list[str], results: Path = RESULTS) -> dict:
    baseline = load(baseline_tag, results)
    rows = [{"tag": baseline_tag, "step": step_of(baseline), "figures": figures(baseline), "verdict": "baseline"}]
    for tag in tags:
        table = load(tag, results)
        if table.get("strategy") != baseline.get("strategy"):
            raise SystemExit(f"{tag} was run with strategy {table.get('strategy')!r}, the baseline with {baseline.get('strategy')!r}: they do not compare")
        rows.append({"tag": tag, "step": step_of(table), "figures": figures(table), "verdict": verdict(table, baseline)})
    in_distribution = [row["set"] for row in baseline["rows"] if row["kind"] == IN_DISTRIBUTION]
    return {"baseline": baseline_tag, "strategy": baseline.get("strategy"), "in_distribution": in_distribution, "rows": rows}


def markdown(campaign: dict) -> str:
    columns = list(dict.fromkeys(key for row in campaign["rows"] for key, value in row["figures"].items() if value is not None))
    lines = ["| tag | step | " + " | ".join(columns) + " | ship rule |", "|---|---:|" + "---:|" * len(columns) + "---|"]
    for row in campaign["rows"]:
        cells = [_cell(row["figures"].get(key)) for key in columns]
        lines.append(f"| {row['tag']} | {row['step'] if row['step'] is not None else 'n/a'} | " + " | ".join(cells) + f" | {row['verdict']} |")
    return "\n".join(lines)


def plot(campaign: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline, checkpoints = campaign["rows"][0], [row for row in campaign["rows"][1:] if row["step"] is not None]
    keys = ["score"] + [f"{name} one-shot" for name in campaign["in_distribution"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n, key in enumerate(keys):
        color = f"C{n}"
        steps = [row["step"] for row in checkpoints if row["figures"].get(key) is not None]
        ax.plot(steps, [row["figures"][key] for row in checkpoints if row["figures"].get(key) is not None], "o-", color=color, label=key)
        if baseline["figures"].get(key) is not None:
            ax.axhline(baseline["figures"][key], color=color, linestyle=":", linewidth=1)
    ax.set_xlabel("training step")
    ax.set_ylabel("Dice / score")
    ax.set_title(f"checkpoints against {campaign['baseline']} (dotted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True, help="tag of the shipped model's table (generalization_TAG.json)")
    p.add_argument("--tags", nargs="+", required=True, help="tags of the checkpoints' tables")
    p.add_argument("--name", required=True, help="the campaign's name: writes campaign_NAME.md/.json/.png")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    campaign = campaign_table(args.baseline, args.tags, args.results)
    command = "python benchmarks/campaign.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(campaign)
    stem = args.results / f"campaign_{args.name}"
    stem.with_suffix(".md").write_text(
        f"# Training campaign {args.name}: checkpoints against the shipped model\n\n`{command}`; strategy {campaign['strategy']}.\n\n"
        "Ship rule: score above the baseline's and in-distribution one-shot Dice not below the baseline's on any set, "
        "then the same on every held-out case (`iris-segment evaluate`), which decides. "
        "self: self-segmentation Dice (classes of at least 1 cm^3); unseen classes: self-segmentation of the classes no set trains.\n\n"
        f"{text}\n")
    stem.with_suffix(".json").write_text(json.dumps({**campaign, "command": command}, indent=1))
    plot(campaign, stem.with_suffix(".png"))
    print(text)
    print(f"saved {stem}.md/.json/.png")


if __name__ == "__main__":
    main()
