"""Run a recipe: connect to Ray, then run each stage in order, skipping the finished ones.

The manifest in the run root is the single record of progress: a stage marked `done` is never run
again, so re-submitting a failed job resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from types import ModuleType

import ray

from sphuatuo.recipe import Recipe
from sphuatuo.runs import RunRoot, StageRecord, StageTimer
from sphuatuo.stages import (
    StageContext,
    StageSkipped,
    dpo,
    evaluate,
    preference_pairs,
    questions,
    sft,
    student_answers,
    teacher_cot,
)

log = logging.getLogger("sphuatuo")

SELF_PLAY_STAGES: tuple[ModuleType, ...] = (
    questions,
    teacher_cot,
    sft,
    student_answers,
    preference_pairs,
    dpo,
    evaluate,
)

# What engine and trainer processes need on a machine without GPUs; set before a local Ray starts so
# every worker inherits it. Values already in the environment win.
CPU_ENVIRONMENT = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_AUTH_MODE": "disabled",
}


def apply_cpu_environment() -> None:
    for key, value in CPU_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS (as under `ray job submit`), else start a local one
    sized to this machine."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    apply_cpu_environment()
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=512 * 1024**2)


def run_pipeline(recipe: Recipe, stages: tuple[ModuleType, ...] = SELF_PLAY_STAGES) -> RunRoot:
    """Run every stage not yet done; return the run root. Raises on the first failing stage."""
    run = RunRoot(recipe.run_root)
    manifest = run.load_manifest(recipe)
    connect_ray(recipe.ray.address, recipe.ray.num_cpus)
    started = time.perf_counter()
    for stage in stages:
        record = manifest.stages.setdefault(stage.NAME, StageRecord())
        if record.status in ("done", "skipped"):
            log.info("stage %s: already %s, not run again", stage.NAME, record.status)
            continue
        record.error = None
        log.info("stage %s: starting", stage.NAME)
        failure: BaseException | None = None
        with StageTimer(record):
            try:
                stage.run(StageContext(recipe=recipe, run=run, record=record))
                record.status = "done"
            except StageSkipped as reason:
                record.status = "skipped"
                record.error = str(reason)
                log.warning("stage %s: skipped: %s", stage.NAME, reason)
            except BaseException as err:  # noqa: BLE001 - recorded, then re-raised below
                record.status = "failed"
                record.error = f"{type(err).__name__}: {err}"
                failure = err
        run.save_manifest(manifest)
        if failure is not None:
            raise failure
        log.info("stage %s: %s in %.1fs (rows in %d, out %d, rejected %d, failed %d)", stage.NAME,
                 record.status, record.seconds, record.rows_in, record.rows_out, record.rows_rejected,
                 record.rows_failed)
    log.info("run %s finished in %.1fs", recipe.name, time.perf_counter() - started)
    return run
