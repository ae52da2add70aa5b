"""`sphuatuo status` and `sphuatuo gc`: what a run root holds, what a run would do with it, and the clean-up
of outputs no stage refers to any more."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from sphuatuo.pipeline import SUPERSEDED, plan_stages, recipe_stages, stale_reasons
from sphuatuo.recipe import Recipe, parse_recipe
from sphuatuo.stages.training import checkpoint_name
from sphuatuo.store.manifest import Manifest, read_manifest
from sphuatuo.store.run_root import RunRoot


@dataclass(frozen=True)
class StageStatus:
    name: str
    state: str  # done (reused by the next run) / stale / pending / resume / skipped
    why: str
    rows_in: int
    rows_out: int
    fingerprint: str


def stage_statuses(run: RunRoot, recipe: Recipe | None = None) -> list[StageStatus]:
    """Each stage against `recipe` (default: the recipe the run last ran with)."""
    manifest = read_manifest(run)
    if recipe is None:
        recipe = parse_recipe(manifest.recipe, f"{run.uri}/manifest.json")
        stages = tuple(stage for stage in recipe_stages(type(recipe)) if stage.NAME in manifest.stages)
    else:
        stages = recipe_stages(type(recipe))
    statuses = []
    for stage, fingerprint, action in plan_stages(recipe, stages, manifest):
        record = manifest.stages.get(stage.NAME)
        rows = (record.rows_in, record.rows_out) if record else (0, 0)
        if action == "reuse":
            state, why = record.status, "reused on the next run" + (f" ({record.error})" if record.error else "")
        elif action == "stale":
            state, why = "stale", "; ".join(stale_reasons(record, fingerprint))
        elif action == "resume":
            state, why = "resume", f"{record.status}: {record.error or 'interrupted'}; written keys are kept"
        else:
            state, why = "pending", "not run yet"
        statuses.append(StageStatus(stage.NAME, state, why, *rows, fingerprint.short))
    return statuses


def format_statuses(run: RunRoot, statuses: list[StageStatus]) -> str:
    lines = [f"run root {run.uri}", f"{'stage':<20} {'state':<8} {'rows in':>8} {'rows out':>9}  fingerprint   why"]
    lines += [f"{s.name:<20} {s.state:<8} {s.rows_in:>8} {s.rows_out:>9}  {s.fingerprint}  {s.why}" for s in statuses]
    return "\n".join(lines)


def unreferenced_outputs(run: RunRoot, manifest: Manifest) -> list[str]:
    """Superseded stage outputs, and checkpoint folders that no stage's current fingerprint names."""
    garbage = [f"{SUPERSEDED}/{name}" for name in _folders(run, SUPERSEDED)]
    current = {checkpoint_name(name, record.fingerprint) for name, record in manifest.stages.items()}
    current |= {checkpoint_name(model, record.fingerprint) for record in manifest.stages.values()
                for model in record.details.get("runs", {})}  # one DPO model per pair strategy
    garbage += [f"checkpoints/{name}" for name in _folders(run, "checkpoints") if name not in current]
    return garbage


def collect_garbage(run: RunRoot, dry_run: bool = False) -> list[str]:
    """Remove (or with `dry_run` only list) what `unreferenced_outputs` finds."""
    garbage = unreferenced_outputs(run, read_manifest(run))
    if not dry_run:
        for folder in garbage:
            run.fs.delete_dir(run.fs_path(folder))
    return garbage


def _folders(run: RunRoot, parent: str) -> list[str]:
    if not run.exists(parent):
        return []
    infos = run.fs.get_file_info(pafs.FileSelector(run.fs_path(parent)))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)
