"""Run a recipe: take the run root's lease, connect to Ray, then run each stage in order, skipping the
finished ones.

The manifest in the run root is the single record of progress: a stage marked `done` is never run
again, so re-submitting a failed job resumes where it stopped. The lease keeps it to one driver at a
time: a second driver on the same run root fails before it connects to Ray.
"""

from __future__ import annotations

import importlib
import logging
import time
from types import ModuleType

from sphuatuo.recipe import Recipe
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.store.lease import Lease
from sphuatuo.store.manifest import StageRecord, StageTimer, load_manifest, save_manifest
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import connect_ray

log = logging.getLogger("sphuatuo")


def recipe_stages(kind: type[Recipe]) -> tuple[ModuleType, ...]:
    """The stage modules a recipe kind runs, in order (its config class names them)."""
    return tuple(importlib.import_module(f"sphuatuo.stages.{name}") for name in kind.STAGES)


class RunLog(logging.Handler):
    """Keeps this process's `sphuatuo` log lines and appends them to `<run root>/run.log` at each save,
    so the run root holds its own history (stages, progress, throughput) wherever it lives. The earlier
    log is read at the first save, under the lease, so a driver turned away never touches it."""

    def __init__(self, run: RunRoot):
        super().__init__(level=logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.run = run
        self.earlier: str | None = None
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def save(self) -> None:
        if self.earlier is None:
            self.earlier = self.run.read_text("run.log") if self.run.exists("run.log") else ""
        self.run.write_text(self.earlier + "".join(line + "\n" for line in self.lines), "run.log")


def stage_summary(name: str, record: StageRecord) -> str:
    rate = ""
    if record.seconds and record.status == "done":
        rate = (f"; {record.rows_out / record.seconds:.2f} rows/s out, "
                f"{record.output_tokens / record.seconds:.0f} output tok/s")
    return (f"stage {name}: {record.status} in {record.seconds:.1f}s (rows in {record.rows_in}, out "
            f"{record.rows_out}, rejected {record.rows_rejected}, failed {record.rows_failed}){rate}")


def run_pipeline(recipe: Recipe, stages: tuple[ModuleType, ...] | None = None) -> RunRoot:
    """Run every stage not yet done (default: the recipe's own stages); return the run root. Raises on
    the first failing stage, and LeaseError at once when another driver holds the run root."""
    run = RunRoot(recipe.run_root)
    run_log = RunLog(run)
    log.addHandler(run_log)
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)  # the run log keeps progress lines even when the caller logs only warnings
    try:
        with Lease(run) as lease:  # before Ray and before any write: a second driver stops here
            try:
                # The stage modules import the engines and trainers (seconds): only once the lease is held.
                stages = recipe_stages(type(recipe)) if stages is None else stages
                return _run_stages(recipe, stages, run, run_log, lease)
            finally:
                run_log.save()
    finally:
        log.removeHandler(run_log)


def _run_stages(recipe: Recipe, stages: tuple[ModuleType, ...], run: RunRoot, run_log: RunLog,
                lease: Lease) -> RunRoot:
    manifest = load_manifest(run, recipe)
    connect_ray(recipe.ray.address, recipe.ray.num_cpus)
    started = time.perf_counter()
    for stage in stages:
        lease.check()  # a driver whose lease was taken over writes no further stage
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
