"""Episodic in-context training (Iris recipe scaled to CPU), resumable and DDP-ready.

Each step draws episodes (labelled, invented and agnostic tasks, see training.data), optimises
Dice + BCE (plus, with --matching-weight, the reference-matching loss on the encoder's features:
inference/matching.py), and updates the memory bank by EMA from the labelled classes. Episodes are a pure
function of (seed, step), so a resumed run draws exactly what the interrupted one would have drawn.
Run with plain python on a CPU or under `torchrun --nproc_per_node=N` on GPUs (bf16 autocast).

Resume state: `last.pt` (weights and optimizer, exact; local, never committed) or, when it is
absent, `resume.json` with `resume.safetensors` (float16 weights, a few MB, committed): the run
goes on at the step and schedule position recorded there with a fresh optimizer.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..model.config import IrisConfig
from ..model.iris import IrisModel
from ..inference.matching import matching_loss
from ..model.loss import dice_bce_loss
from ..model.serialization import load_tensors
from ..model.weights import load_model, save_model
from .data import QUERY_SCALE, TASK_MIX, EpisodeSampler, EpisodeStream, load_all, load_unseen

log = logging.getLogger("iris.train")


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _mix(text: str) -> dict[str, float]:
    try:
        mix = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--mix wants kind=share pairs separated by commas, got {text!r}") from None
    if set(mix) - set(TASK_MIX) or not any(v > 0 for v in mix.values()) or any(v < 0 for v in mix.values()):
        raise argparse.ArgumentTypeError(f"--mix kinds are {', '.join(TASK_MIX)} with shares >= 0 (one positive), got {text!r}")
    return mix


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="iris-segment train", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="data root with one nnU-Net-layout folder per set")
    p.add_argument("--output", type=Path, required=True, help="run folder: checkpoints, log, exported weights")
    p.add_argument("--steps", type=int, default=40000, help="total optimiser steps of the schedule")
    p.add_argument("--patch", type=int, default=64, help="training crop size in voxels (the working spacing stays that of a full target)")
    p.add_argument("--episodes-per-step", type=int, default=4, help="episodes per optimiser step, run as one batch")
    p.add_argument("--max-classes", type=int, default=6, help="at most this many classes per labelled episode")
    p.add_argument("--max-invented", type=int, default=12, help="at most this many classes per invented or agnostic episode")
    p.add_argument("--query-scale", type=float, default=QUERY_SCALE,
                   help="invented and agnostic queries show their structures up to this many times larger or smaller than the reference "
                        "(log-uniform; 1: the reference's scale; iris-cpu-v3 to v7 drew each of the two in 0.9-1.1)")
    p.add_argument("--mix", type=_mix, default=dict(TASK_MIX), help="episode kind shares, e.g. labelled=0.4,invented=0.3,agnostic=0.3")
    p.add_argument("--init", type=Path, help="start a new run from these weights (memory-bank rows matched by class name)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--ema", type=float, default=0.999, help="memory bank momentum")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--datasets", nargs="*", help="only these sets (default: all in --data)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--stop-after", type=float, default=0, help="stop cleanly after this many hours (0: run to --steps)")
    p.add_argument("--matching-weight", type=float, default=0.0,
                   help="weight of the reference-matching loss on the encoder's features (inference/matching.py; 0: off)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = int(os.environ.get("RANK", "0"))
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(format="%(asctime)s %(message)s")  # the console; a no-op where logging is set up already
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    run_log = logging.FileHandler(args.output / "train.log")  # this run's own file, whoever configured logging
    run_log.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(run_log)
    try:
        train(args, rank, distributed, device)
    finally:
        log.removeHandler(run_log)
        run_log.close()
        if distributed:
            dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, distributed: bool, device: torch.device) -> None:
    """The training loop of `main`, from the run folder's resume state to --steps (or --stop-after)."""
    base_config = IrisConfig()
    sets = load_all(args.data, base_config.working_size, args.datasets)
    sampler = EpisodeSampler(sets, args.patch, args.max_classes, args.mix, args.max_invented, query_scale=args.query_scale)
    class_keys = sampler.class_keys()
    config = replace(base_config, memory_classes=tuple(class_keys))
    log.info("sets: %s", ", ".join(f"{s.name} ({s.kind}, {len(s.cases)} cases)" for s in sets))
    torch.manual_seed(args.seed)
    model = IrisModel(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    start, hours_before = resume(model, optimizer, config, args, device)
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if distributed else model
    class_index = {k: i for i, k in enumerate(class_keys)}
    began = time.time()
    window: deque[float] = deque(maxlen=20)
    losses: deque[float] = deque(maxlen=20)
    matching_losses: deque[float] = deque(maxlen=20)
    step = start
    stream = EpisodeStream(sampler, args.seed, rank, start, args.steps, args.episodes_per_step)
    episodes = iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4, persistent_workers=False))
    while step < args.steps:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        t0 = time.time()
        optimizer.zero_grad(set_to_none=True)
        batch = next(episodes)
        classes = batch.classes.to(device)
        matched = args.matching_weight > 0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, tokens, *features = net(batch.reference.to(device), batch.reference_masks.to(device), batch.query.to(device), classes,
                                            with_features=matched)
        loss = dice_bce_loss(logits.float(), batch.query_masks.to(device), classes.float())
        if matched:
            match = matching_loss(*features[0], batch.reference_masks.to(device), batch.query_masks.to(device), classes)
            matching_losses.append(float(match.detach()))
            loss = loss + args.matching_weight * match
        loss.backward()
        total = float(loss.detach())
        rows = [[class_index[key] if key else -1 for key in keys] for keys in batch.class_keys]
        capacity = args.episodes_per_step * max(args.max_classes, args.max_invented)
        update_memory_bank(model.memory_bank, rows, tokens.detach().float(), args.ema, capacity)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        window.append(time.time() - t0)
        losses.append(total)
        if rank == 0 and step % 20 == 0:
            log.info("step %d loss %.4f (mean of 20) lr %.2e %.2f s/step%s", step, float(np.mean(losses)), optimizer.param_groups[0]["lr"],
                     float(np.mean(window)), f"; matching loss {np.mean(matching_losses):.4f}" if matching_losses else "")
        stop = args.stop_after and (time.time() - began) / 3600 >= args.stop_after
        if rank == 0 and (step % args.checkpoint_every == 0 or step == args.steps or stop):
            checkpoint(model, optimizer, step, config, args, hours_before + (time.time() - began) / 3600)
        if stop:
            break


@torch.no_grad()
def update_memory_bank(bank: torch.Tensor, rows: list[list[int]], tokens: torch.Tensor, momentum: float, capacity: int) -> None:
    """EMA of every class embedding seen this step: bank[rows[e][c]] takes tokens[e, c] (padded
    classes beyond rows[e] are ignored). Under DDP each rank sees other episodes, so every rank's
    updates are gathered and applied in rank order everywhere: the banks stay identical, and the one
    rank 0 saves holds every class seen on any rank. `capacity`: the most class embeddings a rank
    makes in one step (episodes x classes), the size each rank sends. A row of -1 is a nameless
    class (invented or agnostic): it has no entry."""
    seen = torch.full((capacity,), -1, dtype=torch.long, device=bank.device)
    embeddings = torch.zeros((capacity, *bank.shape[1:]), dtype=bank.dtype, device=bank.device)
    n = 0
    for episode_rows, episode_tokens in zip(rows, tokens):
        for row, embedding in zip(episode_rows, episode_tokens):
            seen[n], embeddings[n] = row, embedding
            n += 1
    if dist.is_available() and dist.is_initialized():
        every_seen = [torch.empty_like(seen) for _ in range(dist.get_world_size())]
        every_embedding = [torch.empty_like(embeddings) for _ in range(dist.get_world_size())]
        dist.all_gather(every_seen, seen)
        dist.all_gather(every_embedding, embeddings)
        seen, embeddings = torch.cat(every_seen), torch.cat(every_embedding)
    for row, embedding in zip(seen.tolist(), embeddings):
        if row >= 0:
            entry = bank[row]
            entry.copy_(embedding if not entry.any() else momentum * entry + (1 - momentum) * embedding)


def resume(model: IrisModel, optimizer: torch.optim.Optimizer, config: IrisConfig, args: argparse.Namespace, device: torch.device) -> tuple[int, float]:
    """Step and hours already trained, after loading what the run folder holds (see the module
    docstring), or `--init` weights for a new run; (0, 0.0) for a run from scratch."""
    full, light = args.output / "last.pt", args.output / "resume.json"
    if args.init and (full.exists() or light.exists()):
        log.info("--init %s not used: the run folder's resume state goes on", args.init)
    if full.exists():
        ckpt = torch.load(full, map_location=device, weights_only=True)
        if ckpt["config"] != config.to_json():
            raise SystemExit(f"{full} was trained with other settings or data; use a new --output folder")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        log.info("resumed at step %d (weights and optimizer)", ckpt["step"])
        return ckpt["step"], ckpt["hours"]
    if light.exists():
        state = json.loads(light.read_text())
        if state["schedule"] != _schedule(args):  # a choice (a longer run, a cool-down), but never a silent one
            log.warning("resuming with %s where the run recorded %s: the learning rate follows the new schedule", _schedule(args), state["schedule"])
        tensors, meta = load_tensors(args.output / state["weights"])
        if meta.get("config") != config.to_json():
            raise SystemExit(f"{light} was trained with other settings or data; use a new --output folder")
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})
        # The weights' own provenance says which step they are (resume.json could be a step behind if a
        # run died between writing the two files).
        made = json.loads(meta.get("provenance", "{}"))
        step, hours = made.get("steps", state["step"]), made.get("train_hours", state["hours"])
        log.info("resumed at step %d from %s (float16 weights, fresh optimizer)", step, state["weights"])
        return step, hours
    if args.init:
        init_from(model, load_model(args.init, device="cpu"))
        log.info("new run initialised from %s", args.init)
    return 0, 0.0


def _schedule(args: argparse.Namespace) -> dict:
    """What a resumed run must repeat to go on where it stopped: the schedule and the episode stream."""
    return {"lr": args.lr, "warmup": args.warmup, "steps": args.steps, "seed": args.seed}


def init_from(model: IrisModel, source: IrisModel) -> None:
    """Copy every network weight of `source`, and the memory-bank rows of the classes both know."""
    state = {k: v for k, v in source.state_dict().items() if k != "memory_bank"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"memory_bank"}:
        raise SystemExit(f"--init weights do not fit this architecture (missing {missing}, unexpected {unexpected})")
    rows = {name: i for i, name in enumerate(source.config.memory_classes)}
    with torch.no_grad():
        for i, name in enumerate(model.config.memory_classes):
            if name in rows:
                model.memory_bank[i] = source.memory_bank[rows[name]].to(model.memory_bank)


def checkpoint(model: IrisModel, optimizer: torch.optim.Optimizer, step: int, config: IrisConfig, args: argparse.Namespace, hours: float) -> None:
    """Resume state (atomic): `last.pt` for an exact resume here, `resume.json` + float16
    `resume.safetensors` for the repository; plus the exported weights with their provenance."""
    tmp = args.output / "last.pt.part"
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "hours": hours, "config": config.to_json()}
    torch.save(state, tmp)
    os.replace(tmp, args.output / "last.pt")
    unseen_sets, unseen_classes = load_unseen()
    provenance = {
        "steps": step,
        "train_hours": round(hours, 3),
        "device": str(next(model.parameters()).device),
        "patch": args.patch,
        "episodes_per_step": args.episodes_per_step,
        "max_classes": args.max_classes,
        "max_invented": args.max_invented,
        "mix": args.mix,
        "query_scale": args.query_scale,
        "lr": args.lr,
        "matching_weight": args.matching_weight,
        "init": str(args.init) if args.init else None,
        "data": sorted({k.split("/")[0] for k in config.memory_classes}),
        "heldout": "Resources/splits.json",
        "unseen_sets": sorted(unseen_sets),
        "unseen_classes": sorted(unseen_classes),
    }
    weights = args.output / f"iris_step{step:06d}.safetensors"
    save_model(model, weights, provenance)
    shutil.copyfile(weights, args.output / "resume.safetensors.part")
    os.replace(args.output / "resume.safetensors.part", args.output / "resume.safetensors")
    resume_state = {"step": step, "hours": round(hours, 4), "weights": "resume.safetensors", "schedule": _schedule(args),
                    "note": "resume with the same --steps/--lr/--warmup/--seed; the optimizer restarts fresh from these weights"}
    (args.output / "resume.json.part").write_text(json.dumps(resume_state, indent=1) + "\n")
    os.replace(args.output / "resume.json.part", args.output / "resume.json")
    log.info("checkpoint at step %d", step)


if __name__ == "__main__":
    main()
