"""The cluster path, locally: `ray job submit --working-dir .` of a `sphuatuo run` against a Ray head
on loopback, as a user does on a GPU cluster."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import RAY, REPO, tiny_recipe

pytestmark = pytest.mark.slow


def test_ray_job_submit_runs_a_recipe_to_succeeded(ray_head: dict[str, str], tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    run_root = tmp_path / "run"
    recipe = tiny_recipe(run_root, **{"data.train": [{"path": "builtin:sample_bank", "limit": 4}],
                                      "data.test_fraction": 0.5,
                                      "models.teacher.backend": "hf", "models.judge.kind": "rule",
                                      "stages.teacher_cot.retry_with_reference": False,
                                      "stages.evaluate.models": ["base"]})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))

    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", ray_head["dashboard"], "--working-dir", ".",
         "--runtime-env", "cluster/runtime_env.yaml", "--no-wait", "--",
         "sphuatuo", "run", str(recipe_file)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = re.search(r"raysubmit_\w+", submitted.stdout + submitted.stderr).group(0)

    client = JobSubmissionClient(ray_head["dashboard"])
    deadline = time.monotonic() + 600
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, "job did not finish in 10 minutes"
        time.sleep(2)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]

    manifest = json.loads((run_root / "manifest.json").read_text())
    stages = manifest["stages"]
    assert stages["questions"]["rows_out"] == 4
    assert stages["teacher_cot"]["status"] == "done" and stages["teacher_cot"]["rows_in"] == 2
    assert stages["evaluate"]["details"]["models"]["base"]["n"] == 2
    assert (run_root / "report.md").is_file()
    assert f"report: {run_root}/report.md" in logs
