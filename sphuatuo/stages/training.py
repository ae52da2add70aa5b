"""What the SFT and DPO stages share: write the training set, launch Ray Train, record the result."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from sphuatuo.local_models import resolve_model
from sphuatuo.recipe import TrainStage
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.store.credentials import engine_model_path
from sphuatuo.store.datasets import on_worker
from sphuatuo.store.run_root import RunRoot
from sphuatuo.train.launcher import fit

Examples = list[dict[str, Any]]
# A training set the driver holds already, or how one of Ray's workers makes it from the run root.
ExampleSource = Examples | Callable[[RunRoot], Examples]


def model_of(ctx: StageContext, name: str) -> str:
    """The model a stage starts from: `base` is the student as configured, else a stage's export."""
    if name == "base":
        return resolve_model(ctx.recipe.models.student.model)
    if not ctx.run.exists(name, "model", "config.json"):
        raise StageSkipped(f"no {name} model in the run (the {name} stage did not produce one)")
    return ctx.run.join(name, "model")


def engine_model_of(ctx: StageContext, name: str) -> str:
    """`model_of` where an engine can load it (see `engine_model_path`)."""
    return engine_model_path(ctx.run, model_of(ctx, name), ctx.recipe.storage.credentials)


def write_examples(run: RunRoot, name: str, examples: ExampleSource) -> int:
    """Write a training set to `<name>/data` and return its size. A builder runs on one of Ray's workers, which
    reads the earlier stages' rows and writes the set: they never pass through the driver."""
    if callable(examples):
        return on_worker(_write_built_examples, run, name, examples)
    if examples:
        run.write_rows(examples, name, "data")
    return len(examples)


def _write_built_examples(run: RunRoot, name: str, build: Callable[[RunRoot], Examples]) -> int:
    return write_examples(run, name, build(run))


def train_stage(
    ctx: StageContext,
    name: str,
    stage: TrainStage,
    examples: ExampleSource,
    worker_fn: Callable[[dict[str, Any]], None],
    start_model: str,
) -> None:
    """Write `examples` to `<name>/data`, then fine-tune `start_model` on them into `<name>/model`."""
    fine_tune(ctx, name, stage, write_examples(ctx.run, name, examples), worker_fn, start_model)


def fine_tune(
    ctx: StageContext,
    name: str,
    stage: TrainStage,
    count: int,
    worker_fn: Callable[[dict[str, Any]], None],
    start_model: str,
) -> None:
    """Fine-tune `start_model` on the `count` examples written to `<name>/data` into `<name>/model`."""
    ctx.record.rows_out = count
    if not count:
        raise StageSkipped(f"zero training examples for {name}; nothing to train")
    scaling = stage.scaling
    global_batch = stage.micro_batch_size * stage.grad_accumulation * scaling.num_workers
    ctx.record.details.update(global_batch=global_batch, workers=scaling.num_workers, zero_stage=scaling.zero_stage,
                              finetuning=stage.finetuning, start_model=start_model)
    if global_batch > count:
        ctx.note(f"global batch {global_batch} is larger than the {count} examples: "
                 "each epoch is a single optimizer step")
    # The trainer reports to the recipe's trackers and the stage's own; under a pipeline run, as part of it.
    trackers = ctx.recipe.trackers(stage)
    stage = stage.model_copy(update={"report_to": trackers})
    worker_config: dict[str, Any] = {"model": start_model, "data": f"{name}/data",
                                     # Every start model is the student or trained from it: its code if any.
                                     "trust_remote_code": ctx.recipe.models.student.trust_remote_code}
    env = None
    if ctx.tracking is not None:
        fingerprint = ctx.record.fingerprint or ""
        env = ctx.tracking.worker_environment(name, fingerprint, trackers)
        worker_config["tracking_params"] = ctx.tracking.training_params(name, fingerprint)
    fit(ctx.run, name, stage, worker_fn, worker_config, checkpoint_name=checkpoint_name(name, ctx.record.fingerprint),
        credentials=ctx.recipe.storage.credentials, env=env)
    if not ctx.run.exists(name, "model", "config.json"):
        raise RuntimeError(f"{name}: training finished but no model was exported to {ctx.run.join(name, 'model')}")
    if ctx.run.exists(name, "lengths.json"):
        lengths = json.loads(ctx.run.read_text(name, "lengths.json"))
        ctx.record.details["lengths"] = lengths
        if lengths["overlong"]:
            ctx.note(f"{name}: {lengths['overlong']} of {lengths['examples']} examples are longer than max_length "
                     f"{lengths['max_length']} (longest {lengths['longest']} tokens): {lengths['dropped']} dropped, "
                     f"{lengths['truncated']} cut from the left")
    log_history = training_log(ctx, name)
    if ctx.tracking is not None:
        ctx.tracking.training_finished(name, trackers, log_history)
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    ctx.record.details.update(steps=len(losses), first_loss=losses[0] if losses else None,
                              last_loss=losses[-1] if losses else None)


def checkpoint_name(name: str, fingerprint: str | None) -> str:
    """Ray Train's run name: the stage's folder name and its fingerprint."""
    return f"{name}-{fingerprint[:12]}" if fingerprint else name


def training_log(ctx: StageContext, name: str) -> list[dict[str, Any]]:
    if not ctx.run.exists(name, "train_log.json"):
        return []
    return json.loads(ctx.run.read_text(name, "train_log.json"))
