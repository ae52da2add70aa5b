"""Run a recipe: take the run root's lease, connect to Ray, then run each stage in order, reusing the ones
already done for the same fingerprint.

The manifest in the run root is the single record of progress. A stage done for the fingerprint it has now
is reused, so re-submitting a failed job resumes where it stopped; a stage whose fingerprint changed (an
edited recipe field it reads, another model or prompt version, a changed input) runs again, and the run
says field by field why. Its earlier output is moved aside (`.superseded/`), never deleted, until
`sphuatuo gc` removes it. The lease keeps a run root to one driver at a time: a second driver fails
before it connects to Ray.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from sphuatuo.data.loaders import resolve_source_path
from sphuatuo.local_models import model_identity
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import Recipe, is_prompt_field
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.store.credentials import shared_filesystem
from sphuatuo.store.fingerprint import Fingerprint, changes, flatten
from sphuatuo.store.lease import Lease
from sphuatuo.store.manifest import Manifest, StageRecord, StageTimer, load_manifest, package_versions, save_manifest
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import connect_ray
from sphuatuo.store.secrets import declare, declare_recipe, redact
from sphuatuo.store.tracking import TRACKER_CREDENTIALS, Tracking

if TYPE_CHECKING:
    from sphuatuo.engines.serving import EngineServices

log = logging.getLogger("sphuatuo")


# Engine and trainer fields that change how fast a stage runs or how it is placed, not what it writes.
NOT_FINGERPRINTED = frozenset({
    "replicas", "batch_size", "max_concurrent_batches", "cpus_per_replica", "cpu_threads", "gpus_per_replica",
    "tensor_parallel_size", "accelerator_type", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens",
    "request_timeout_s", "max_retries", "qps", "checkpoint_every_steps", "keep_checkpoints", "max_failures",
    "report_to", "cpus_per_worker", "peak_tflops_per_gpu",
})
SUPERSEDED = ".superseded"
# Stage fields that name a data file: the file's content is part of the stage's fingerprint.
DATA_FILE_FIELDS = ("data", "extra_data")


def recipe_stages(kind: type[Recipe]) -> tuple[ModuleType, ...]:
    """The stage modules a recipe kind runs, in order (its config class names them)."""
    return tuple(importlib.import_module(f"sphuatuo.stages.{name}") for name in kind.STAGES)


def stages_until(stages: tuple[ModuleType, ...], last: str) -> tuple[ModuleType, ...]:
    """`stages` up to and including the one named `last` (`sphuatuo run --until`)."""
    names = [stage.NAME for stage in stages]
    if last not in names:
        raise ValueError(f"--until {last}: not a stage of this recipe; its stages: {', '.join(names)}")
    return stages[: names.index(last) + 1]


def stage_outputs(stage: ModuleType, recipe: Recipe) -> tuple[str, ...]:
    """The run-root folders a stage writes."""
    return stage.outputs(recipe) if hasattr(stage, "outputs") else (stage.NAME,)


def file_identity(location: str) -> str:
    """A question file's content, for the questions stage's fingerprint: a digest of a local file's bytes (or
    of a folder's files), size and modification time where a remote store holds it; "missing" if absent."""
    if "://" in location and not location.startswith("file://"):
        filesystem, path = pafs.FileSystem.from_uri(location)
        info = filesystem.get_file_info(path)
        return "missing" if info.type == pafs.FileType.NotFound else f"{info.size}@{info.mtime_ns}"
    path = Path(location.removeprefix("file://")).expanduser()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.exists() else []
    if not files:
        return "missing"
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()[:16]


def stage_fingerprint(recipe: Recipe, stage: ModuleType, upstream: dict[str, str]) -> Fingerprint:
    """The stage's fingerprint: the recipe fields it reads (less placement and speed knobs), the models and
    prompt versions they name, the fingerprints of the stages it reads, and the producing packages' versions."""
    dumped = recipe.model_dump(mode="json")
    components: dict = {}
    for path in stage.CONFIG:
        value: object = dumped
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            components.update(flatten(value, path))
    components = {key: value for key, value in components.items() if key.rsplit(".", 1)[-1] not in NOT_FINGERPRINTED}
    for key, value in list(components.items()):
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "model" and isinstance(value, str):
            components[f"{key}@identity"] = model_identity(value)
        elif isinstance(value, str) and (leaf in DATA_FILE_FIELDS or (leaf == "path" and key.startswith("data."))):
            components[f"{key}@identity"] = file_identity(resolve_source_path(value))
        elif isinstance(value, str) and is_prompt_field(leaf):
            template = get_prompt(value)
            components[f"{key}@version"] = Fingerprint.of(template.model_dump(mode="json")).short
    components.update({f"input.{name}": upstream[name] for name in stage.READS if name in upstream})
    components.update({f"package.{name}": version for name, version in package_versions().items()})
    return Fingerprint.of(components)


class RunLog(logging.Handler):
    """Keeps this process's `sphuatuo` log lines and appends them to `<run root>/run.log` at each save,
    so the run root holds its own history (stages, progress, throughput) wherever it lives. The earlier
    log is read at the first save, under the lease, so a driver turned away never touches it. The values of
    declared secrets are masked in what it writes, whichever logger a line came from."""

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
        self.run.write_text(redact(self.earlier + "".join(line + "\n" for line in self.lines)), "run.log")


def stage_summary(name: str, record: StageRecord) -> str:
    rate = ""
    if record.seconds and record.status == "done":
        rate = (f"; {record.rows_out / record.seconds:.2f} rows/s out, "
                f"{record.output_tokens / record.seconds:.0f} output tok/s")
    return (f"stage {name}: {record.status} in {record.seconds:.1f}s (rows in {record.rows_in}, out "
            f"{record.rows_out}, rejected {record.rows_rejected}, failed {record.rows_failed}){rate}")


def run_pipeline(recipe: Recipe, stages: tuple[ModuleType, ...] | None = None, until: str | None = None) -> RunRoot:
    """Run every stage not yet done (default: the recipe's own stages; with `until`, those up to that one); return
    the run root. Raises on the first failing stage, and LeaseError at once when another driver holds the run
    root."""
    declare_recipe(recipe.model_dump())
    declare(TRACKER_CREDENTIALS)
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
                if until is not None:
                    stages = stages_until(stages, until)
                return _run_stages(recipe, stages, run, run_log, lease)
            finally:
                run_log.save()
    finally:
        log.removeHandler(run_log)


def supersede(run: RunRoot, folders: tuple[str, ...], fingerprint: str | None) -> list[str]:
    """Move a stage's earlier output aside (`.superseded/<folder>@<fingerprint>`); return what was moved."""
    moved = []
    for folder in folders:
        if run.exists(folder):
            target = f"{folder}@{(fingerprint or 'unfingerprinted')[:12]}"
            run.move(folder, SUPERSEDED, target)
            moved.append(f"{SUPERSEDED}/{target}")
    return moved


def plan_stages(recipe: Recipe, stages: tuple[ModuleType, ...], manifest: Manifest
                ) -> list[tuple[ModuleType, Fingerprint, str]]:
    """Each stage with its fingerprint and what a run would do with it: `reuse` (done or skipped for this
    fingerprint), `stale` (done for another one, or for none), `resume` (started for this one) or `run`."""
    upstream: dict[str, str] = {}
    planned = []
    for stage in stages:
        fingerprint = stage_fingerprint(recipe, stage, upstream)
        upstream[stage.NAME] = fingerprint.digest
        record = manifest.stages.get(stage.NAME)
        if record is None or record.status == "pending":
            action = "run"
        elif record.fingerprint != fingerprint.digest:
            action = "stale"
        else:
            action = "reuse" if record.status in ("done", "skipped") else "resume"
        planned.append((stage, fingerprint, action))
    return planned


def stale_reasons(record: StageRecord, fingerprint: Fingerprint) -> list[str]:
    if record.fingerprint is None:
        return ["no fingerprint recorded (a run from before fingerprints)"]
    return changes(record.fingerprint_components, fingerprint.components)


def _run_stages(recipe: Recipe, stages: tuple[ModuleType, ...], run: RunRoot, run_log: RunLog,
                lease: Lease) -> RunRoot:
    manifest = load_manifest(run, recipe)
    planned = plan_stages(recipe, stages, manifest)
    connect_ray(recipe.ray.address, recipe.ray.num_cpus)
    from sphuatuo.engines.serving import EngineServices  # imports Ray's LLM batch API: only once Ray is needed

    services = EngineServices(host=recipe.ray.engine_host) if recipe.ray.keep_engines_up else None
    try:
        # Ray's workers read and write stage folders too: they get the run root's filesystem as the recipe's
        # storage.credentials says (with `driver`, this driver's credentials relayed to them until the run ends).
        with shared_filesystem(run, recipe.storage.credentials) as filesystem:
            _run_planned(recipe, planned, RunRoot(run.uri, filesystem), run_log, lease, manifest, services)
    finally:
        if services is not None:
            services.close()
    return run


def _run_planned(recipe: Recipe, planned: list[tuple[ModuleType, Fingerprint, str]], run: RunRoot, run_log: RunLog,
                 lease: Lease, manifest: Manifest, services: EngineServices | None) -> None:
    started = time.perf_counter()
    # The trackers' runs open with the first stage that runs: a run that reuses every stage logs nothing.
    tracking = Tracking(recipe, run, {stage.NAME: fingerprint.digest for stage, fingerprint, _ in planned})
    failed = True
    try:
        for stage, fingerprint, action in planned:
            lease.check()  # a driver whose lease was taken over writes no further stage
            if action == "reuse":
                log.info("stage %s: reused (%s for fingerprint %s)", stage.NAME,
                         manifest.stages[stage.NAME].status, fingerprint.short)
                continue
            _run_stage(recipe, stage, fingerprint, action, run, manifest, run_log, tracking, services)
        failed = False
    finally:
        tracking.close(failed)
    log.info("run %s finished in %.1fs", recipe.name, time.perf_counter() - started)


def _run_stage(recipe: Recipe, stage: ModuleType, fingerprint: Fingerprint, action: str, run: RunRoot,
               manifest: Manifest, run_log: RunLog, tracking: Tracking, services: EngineServices | None) -> None:
    """Run one stage that is not reused, record it in the manifest, and raise what it raised."""
    if action == "stale":
        record = manifest.stages[stage.NAME]
        log.warning("stage %s: stale, runs again: %s", stage.NAME, "; ".join(stale_reasons(record, fingerprint)))
        for moved in supersede(run, stage_outputs(stage, recipe), record.fingerprint):
            log.info("stage %s: earlier output kept at %s until `sphuatuo gc`", stage.NAME, moved)
        manifest.stages[stage.NAME] = StageRecord()
    record = manifest.stages.setdefault(stage.NAME, StageRecord())
    record.fingerprint, record.fingerprint_components = fingerprint.digest, fingerprint.components
    record.error = None
    log.info("stage %s: starting", stage.NAME)
    if services is not None and stage.NAME in type(recipe).TRAINING_STAGES:
        services.release_all()  # the trainer needs the devices the engines hold
    failure: BaseException | None = None
    with StageTimer(record):
        save_manifest(run, manifest)  # a crash from here on leaves the stage `running` for this fingerprint
        try:
            tracking.begin()
            stage.run(StageContext(recipe=recipe, run=run, record=record, engines=services, tracking=tracking))
            record.status = "done"
        except StageSkipped as reason:
            record.status = "skipped"
            record.error = str(reason)
            log.warning("stage %s: skipped: %s", stage.NAME, reason)
        except BaseException as err:  # noqa: BLE001 - recorded, then re-raised below
            record.status = "failed"
            record.error = f"{type(err).__name__}: {err}"
            failure = err
    if services is not None:
        engine_log = services.take_log()
        if engine_log["starts"] or engine_log["reuses"]:
            record.details["engines"] = engine_log
    save_manifest(run, manifest)
    log.info(stage_summary(stage.NAME, record))
    run_log.save()
    if failure is not None:
        raise failure
