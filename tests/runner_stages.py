"""Small stages of the tests' own, registered as a plugin, to exercise the runner without real models."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from pipeline import faults
from pipeline.files import atomic_write_json
from pipeline.graph import register_stage


@dataclass
class MakeConfig:
    value: int = 1  # written into the output
    n: int = 3  # number of output files


@dataclass
class TrainConfig:
    steps: int = 6  # optimiser steps
    lr: float = 0.1


@register_stage("make", config_class=MakeConfig, uses_modalities="none", description="writes n files")
def make(ctx):
    for i in range(ctx.section.n):
        atomic_write_json(ctx.dir / f"out{i}.json", {"i": i, "value": ctx.section.value})
    return {"out": ctx.section.n}


def _train_progress(stage_dir, cfg):
    ck = sorted((stage_dir / "checkpoints").glob("step-*")) if (stage_dir / "checkpoints").exists() else []
    return f"step {int(ck[-1].name.split('-')[1])} of {cfg.section('train').steps}" if ck else None


@register_stage("train", after=("make",), config_class=TrainConfig, uses_modalities="none", progress=_train_progress,
                extends="steps", description="a tiny deterministic training loop with checkpoints")
def train(ctx):
    inputs = [json.loads(p.read_text())["value"] for p in sorted(ctx.input_dir("make").glob("out*.json"))]
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=ctx.section.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ckpt = ctx.checkpoints()
    step = 0
    loaded = ckpt.load_latest({"model": model}, {"model": opt}, sched)
    if loaded:
        step = loaded.step
    target = float(sum(inputs))
    while step < ctx.section.steps:
        x = torch.randn(8, 4)  # the torch RNG is part of the checkpoint, so a resumed run draws the same x
        loss = ((model(x).squeeze(-1) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        ctx.metric({"step": step, "loss": loss.item()})
        faults.point("step")
        ckpt.save(step, {"model": model}, {"model": opt}, sched)
    ckpt.save_final({"model": model})
    return {"steps": step}


@register_stage("concat", after=("make", "train"), uses_modalities="none", description="joins make's outputs")
def concat(ctx):
    vals = [json.loads(p.read_text()) for p in sorted(ctx.input_dir("make").glob("out*.json"))]
    atomic_write_json(ctx.dir / "all.json", vals)
    return {"out": 1}
