"""Average the weights of several checkpoints of one run (stochastic weight averaging, afterwards).

While the learning rate is high, consecutive checkpoints scatter around a better point than any of
them: on validation (`select`), steps 4,500 / 4,750 / 5,000 of iris-cpu-v2 (lr near 1e-3) scored
0.744 / 0.740 / 0.752 alone, and the mean of steps 4,500-5,250 scored 0.773. After the learning rate
has decayed there is little left to gain: steps 6,250-7,000 averaged scored 0.784, step 7,000 alone
0.785. The memory bank is averaged too (it is an EMA already). The result is an ordinary weights
file: score it with `select --weights FILE` before shipping it.

    python -m IrisSegmentLib.training.average --run runs/iris-cpu-v2 --steps 6250 6500 6750 7000 \
        --output runs/iris-cpu-v2/iris_avg_006250-007000.safetensors
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import WeightsError
from ..model.iris import IrisModel
from ..model.weights import load_model, save_model


def average_weights(paths: list[Path]) -> IrisModel:
    """One model whose floating-point tensors are the mean of those of `paths` (same architecture and
    memory-bank classes required); provenance is the last checkpoint's plus the files averaged."""
    if len(paths) < 2:
        raise WeightsError("give at least two checkpoints to average.")
    models = [load_model(p, "cpu") for p in paths]
    for path, model in zip(paths[1:], models[1:]):
        if model.config != models[0].config:
            raise WeightsError(f"{path} has other model settings than {paths[0]}: average checkpoints of one run only.")
    averaged = models[-1]
    states = [m.state_dict() for m in models]
    mean = {k: (torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v) for k, v in states[-1].items()}
    averaged.load_state_dict(mean)
    averaged.provenance = {**models[-1].provenance, "averaged": [p.name for p in paths]}
    averaged.model_id = ""  # new weights: the predictor derives their id
    return averaged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="training run folder holding iris_step*.safetensors")
    p.add_argument("--steps", type=int, nargs="+", required=True, help="the checkpoints' steps")
    p.add_argument("--output", type=Path, required=True, help="the averaged weights file to write")
    args = p.parse_args(argv)
    paths = [args.run / f"iris_step{s:06d}.safetensors" for s in args.steps]
    model = average_weights(paths)
    save_model(model, args.output, model.provenance)
    print(f"wrote {args.output}: the mean of {', '.join(p.name for p in paths)}")


if __name__ == "__main__":
    main()
