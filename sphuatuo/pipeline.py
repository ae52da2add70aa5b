"""Run a recipe: connect to Ray, then run each stage in order, skipping the finished ones.

The manifest in the run root is the single record of progress: a stage marked `done` is never run
again, so re-submitting a failed job resumes where it stopped.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType

from sphuatuo.recipe import Recipe
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.store.manifest import StageRecord, StageTimer, load_manifest, save_manifest
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import connect_ray
from sphuatuo.store.secrets import declare, redact, secret_names

log = logging.getLogger("sphuatuo")


def recipe_stages(kind: type[Recipe]) -> tuple[ModuleType, ...]:
    """The stage modules a recipe kind runs, in order (its config class names them)."""
    return tuple(importlib.import_module(f"sphuatuo.stages.{name}") for name in kind.STAGES)


class RunLog(logging.Handler):
    """Keeps this process's `sphuatuo` log lines and appends them to `<run root>/run.log` at each save,
    so the run root holds its own history (stages, progress, throughput) wherever it lives. The values of
    declared secrets are masked in what it writes, whichever logger a line came from."""

    def __init__(self, run: RunRoot):
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.run = run
        self.earlier = run.read_text("run.log") if run.exists("run.log") else ""
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def save(self) -> None:
        self.run.write_text(redact(self.earlier + "".join(line + "\n" for line in self.lines)), "run.log")


def stage_summary(name: str, record: StageRecord) -> str:
    rate = ""
    if record.seconds and record.status == "done":
        rate = (f"; {record.rows_out / record.seconds:.2f} rows/s out, "
                f"{record.output_tokens / record.seconds:.0f} output tok/s")
    return (f"stage {name}: {record.status} in {record.seconds:.1f}s (rows in {record.rows_in}, out "
            f"{record.rows_out}, rejected {record.rows_rejected}, failed {record.rows_failed}){rate}")


def run_pipeline(recipe: Recipe, stages: tuple[ModuleType, ...] | None = None) -> RunRoot:
    """Run every stage not yet done (default: the recipe's own stages); return the run root. Raises on
    the first failing stage."""
    if stages is None:
        stages = recipe_stages(type(recipe))
    declare(secret_names(recipe.model_dump()))
    run = RunRoot(recipe.run_root)
    run_log = RunLog(run)
    log.addHandler(run_log)
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)  # the run log keeps progress lines even when the caller logs only warnings
    try:
        return _run_stages(recipe, stages, run, run_log)
    finally:
        log.removeHandler(run_log)
        run_log.save()


def _run_stages(recipe: Recipe, stages: tuple[ModuleType, ...], run: RunRoot, run_log: RunLog) -> RunRoot:
    manifest = load_manifest(run, recipe)
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
        save_manifest(run, manifest)
        log.info(stage_summary(stage.NAME, record))
        run_log.save()
        if failure is not None:
            raise failure
    log.info("run %s finished in %.1fs", recipe.name, time.perf_counter() - started)
    return run
