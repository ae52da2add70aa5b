"""`sphuatuo submit`: a recipe as a Ray job, through Ray's job submission SDK.

The same as `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- sphuatuo run R`,
but the recipe is validated here first (a typo fails in a second, not after the cluster scaled up),
and the job id is printed before the logs are followed.
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from sphuatuo.recipe import Recipe, load_recipe

DEFAULT_RUNTIME_ENV = Path("cluster") / "runtime_env.yaml"


def job_runtime_env(working_dir: str, runtime_env_file: Path | None) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {}
    if runtime_env_file is not None and runtime_env_file.is_file():
        runtime_env = yaml.safe_load(runtime_env_file.read_text()) or {}
    runtime_env["working_dir"] = working_dir
    return runtime_env


def api_key_notes(recipe: Recipe) -> list[str]:
    """Where the job will find each hosted model's API key: submit never sends one (a job's runtime env and
    entrypoint are stored by the cluster and shown by its dashboard)."""
    engines = {"models.teacher": recipe.models.teacher, "models.student": recipe.models.student}
    if recipe.models.judge.engine is not None:
        engines["models.judge.engine"] = recipe.models.judge.engine
    notes = []
    for path, engine in engines.items():
        if engine.backend != "openai" or engine.api_key_file or not engine.api_key_env:
            continue
        notes.append(f"note: {path} reads its API key from {engine.api_key_env} on the cluster's nodes (or the job "
                     "driver's environment there); sphuatuo submit does not send it. Set it on every node (KubeRay: "
                     "the sphuatuo-secrets Secret) or give api_key_file, a mounted secret file.")
    return notes


def submit(
    recipe_path: str,
    address: str,
    *,
    overrides: list[str] | None = None,
    overlays: list[str] | None = None,
    working_dir: str = ".",
    runtime_env_file: Path | None = DEFAULT_RUNTIME_ENV,
    follow: bool = True,
    until: str | None = None,
) -> int:
    """Submit; print the job id; with `follow`, stream the logs and return 0 only if it SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    overrides, overlays = overrides or [], overlays or []
    recipe = load_recipe(recipe_path, overrides, overlays)
    for note in api_key_notes(recipe):
        print(note, flush=True)
    entrypoint = ["sphuatuo", "run", recipe_path]
    for overlay in overlays:  # a path inside the working directory, as the recipe's is
        entrypoint += ["--overlay", overlay]
    for override in overrides:
        entrypoint += ["--set", override]
    if until is not None:
        entrypoint += ["--until", until]
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=shlex.join(entrypoint),
                               runtime_env=job_runtime_env(working_dir, runtime_env_file))
    print(f"submitted job {job_id} to {address}", flush=True)
    if not follow:
        return 0

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1
