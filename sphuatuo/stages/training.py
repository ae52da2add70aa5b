"""What the SFT and DPO stages share: write the training set, launch Ray Train, record the result."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sphuatuo.local_models import resolve_model
from sphuatuo.recipe import TrainStage
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.train.launcher import fit


def model_of(ctx: StageContext, name: str) -> str:
    """The model a stage starts from: `base` is the student as configured, else a stage's export."""
    if name == "base":
        return resolve_model(ctx.recipe.models.student.model)
    if not ctx.run.exists(name, "model", "config.json"):
        raise StageSkipped(f"no {name} model in the run (the {name} stage did not produce one)")
    return ctx.run.join(name, "model")


def train_stage(
    ctx: StageContext,
    name: str,
    stage: TrainStage,
    examples: list[dict[str, Any]],
    worker_fn: Callable[[dict[str, Any]], None],
    start_model: str,
) -> None:
    """Write `examples` to `<name>/data`, then fine-tune `start_model` on them into `<name>/model`."""
    ctx.record.rows_out = len(examples)
    if not examples:
        raise StageSkipped(f"zero training examples for {name}; nothing to train")
    scaling = stage.scaling
    global_batch = stage.micro_batch_size * stage.grad_accumulation * scaling.num_workers
    ctx.record.details.update(global_batch=global_batch, workers=scaling.num_workers, zero_stage=scaling.zero_stage,
                              finetuning=stage.finetuning, start_model=start_model)
    if global_batch > len(examples):
        ctx.note(f"global batch {global_batch} is larger than the {len(examples)} examples: "
                 "each epoch is a single optimizer step")
    ctx.run.write_rows(examples, name, "data")
    # Every start model is the student or trained from it: it runs the student's code if any.
    fit(ctx.run, name, stage, worker_fn, {"model": start_model, "data": f"{name}/data",
                                          "trust_remote_code": ctx.recipe.models.student.trust_remote_code},
        checkpoint_name=checkpoint_name(name, ctx.record.fingerprint), credentials=ctx.recipe.storage.credentials)
    if not ctx.run.exists(name, "model", "config.json"):
        raise RuntimeError(f"{name}: training finished but no model was exported to {ctx.run.join(name, 'model')}")
    if ctx.run.exists(name, "lengths.json"):
        lengths = json.loads(ctx.run.read_text(name, "lengths.json"))
        ctx.record.details["lengths"] = lengths
        if lengths["overlong"]:
            ctx.note(f"{name}: {lengths['overlong']} of {lengths['examples']} examples are longer than max_length "
                     f"{lengths['max_length']} (longest {lengths['longest']} tokens): {lengths['dropped']} dropped, "
                     f"{lengths['truncated']} cut from the left")
    losses = [entry["loss"] for entry in training_log(ctx, name) if "loss" in entry]
    ctx.record.details.update(steps=len(losses), first_loss=losses[0] if losses else None,
                              last_loss=losses[-1] if losses else None)


def checkpoint_name(name: str, fingerprint: str | None) -> str:
    """Ray Train's run name: the stage's folder name and its fingerprint."""
    return f"{name}-{fingerprint[:12]}" if fingerprint else name


def training_log(ctx: StageContext, name: str) -> list[dict[str, Any]]:
    if not ctx.run.exists(name, "train_log.json"):
        return []
    return json.loads(ctx.run.read_text(name, "train_log.json"))
