"""Experiment trackers (the recipe's `report_to`): TensorBoard, MLflow and Weights & Biases, for every training stage
and for the evaluation.

A pipeline run that does work opens one run per tracker the recipe names (`Tracking`): an MLflow run named after the
recipe in the experiment `tracking.project` (default: the recipe's name), and a W&B run of that project, in a group
that the stages' runs share. It holds the recipe, its secrets masked, and each stage's fingerprint as parameters
(`recipe.<field>`, `fingerprint.<stage>`); each training stage's logged metrics under `<stage>/` once the stage ends;
and the evaluation: per model and protocol, the accuracy with its 95% interval, as metrics
(`evaluate/<model>/<protocol>/accuracy`, `…/ci95_low`, `…/ci95_high`, …) and as one table (`evaluation.json` in
MLflow, the `evaluation` table in W&B). TensorBoard gets the evaluation as scalars and a text table in
`RUN_ROOT/evaluate/tensorboard`.

A training stage's trainer logs for itself, live, from rank 0 (Hugging Face `report_to`): into an MLflow run nested
under the pipeline's, a W&B run in the pipeline's group, TensorBoard events. `worker_environment` is what the workers
need for that, taken from the recipe and never from the driver's shell. Credentials are not handed on: each node
reads its own MLFLOW_TRACKING_TOKEN (or _USERNAME and _PASSWORD) or WANDB_API_KEY, as it does for an object store;
their values are masked wherever sphuatuo writes text. W&B run files are copied into the run root:
`RUN_ROOT/<stage>/wandb` for a stage's, `RUN_ROOT/tracking/wandb` for the pipeline's (`wandb sync` uploads them).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from sphuatuo.recipe import Recipe
from sphuatuo.store.fingerprint import flatten
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.secrets import redact_data, secret_names

# Read by MLflow and W&B from each process's own environment; masked like a recipe's secrets.
TRACKER_CREDENTIALS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY")

# Per model and protocol, in the evaluation table; those of EVALUATION_METRICS are logged as metrics too.
EVALUATION_COLUMNS = ("model", "protocol", "n", "correct", "accuracy", "ci95_low", "ci95_high",
                      "first_match_accuracy", "unparsable", "truncated")
EVALUATION_METRICS = ("accuracy", "ci95_low", "ci95_high", "first_match_accuracy", "n")

_MLFLOW_BATCH = 100  # parameters per log_batch call (MLflow's limits)
_MLFLOW_METRIC_BATCH = 1000
_MLFLOW_PARAM_LENGTH = 6000


def evaluation_rows(protocols: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per protocol and model, from the evaluate stage's `details.protocols`."""
    rows = []
    for protocol, entry in protocols.items():
        for model, result in entry["models"].items():
            row = {**result, "model": model, "protocol": protocol, "ci95_low": result["ci95"][0],
                   "ci95_high": result["ci95"][1]}
            rows.append({column: row[column] for column in EVALUATION_COLUMNS})
    return rows


def metric_key(key: str) -> str:
    """A name MLflow accepts (as transformers' MLflowCallback sanitises a trainer's)."""
    return re.sub(r"[^0-9A-Za-z_\-\. :/]", "_", key)


def copy_wandb_runs(local: str, run: RunRoot, *parts: str) -> None:
    """The W&B run folders under `local/wandb` (not its `latest-run` link) into `<run root>/<parts>`, beside any
    copied there before."""
    folder = Path(local, "wandb")
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            destination = run.fs_path(*parts, entry.name)
            run.fs.create_dir(destination, recursive=True)
            pafs.copy_files(str(entry), destination, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=run.fs)


class Tracking:
    """A pipeline run's tracker runs, opened when a stage first needs them and closed by the pipeline."""

    def __init__(self, recipe: Recipe, run: RunRoot, fingerprints: dict[str, str]):
        self.recipe = recipe
        self.run = run
        self.fingerprints = fingerprints
        self.group = f"{recipe.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
        self._mlflow: tuple[Any, str] | None = None  # (MlflowClient, run id)
        self._wandb: Any = None
        self._wandb_dir: str | None = None

    @property
    def settings(self) -> Any:
        return self.recipe.tracking

    @property
    def project(self) -> str:
        return self.settings.project or self.recipe.name

    @property
    def mlflow_uri(self) -> str:
        """The recipe's, else the SQLite database in the run root (a recipe validates only with a local run root)."""
        return self.settings.mlflow_uri or "sqlite:///" + self.run.fs_path("tracking", "mlflow.db")

    @property
    def mlflow_run_id(self) -> str | None:
        return self._mlflow[1] if self._mlflow else None

    def recipe_dump(self) -> dict[str, Any]:
        """The recipe as logged: every value of its secrets masked."""
        dumped = self.recipe.model_dump(mode="json")
        return redact_data(dumped, secret_names(dumped))

    def tags(self) -> dict[str, str]:
        return {"sphuatuo.recipe": self.recipe.name, "sphuatuo.recipe_kind": self.recipe.recipe,
                "sphuatuo.run_root": self.run.uri, "sphuatuo.group": self.group}

    def begin(self) -> None:
        """Open a run for each tracker of `tracking.report_to` (TensorBoard has none); idempotent."""
        for tracker in self.settings.report_to:
            self._open(tracker)

    def _open(self, tracker: str) -> None:
        if tracker == "mlflow" and self._mlflow is None:
            self._mlflow = self._start_mlflow()
        elif tracker == "wandb" and self._wandb is None:
            self._wandb = self._start_wandb()

    def _start_mlflow(self) -> tuple[Any, str]:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        artifacts = None
        if self.settings.mlflow_uri is None:
            self.run.fs.create_dir(self.run.fs_path("tracking"), recursive=True)
            artifacts = Path(self.run.fs_path("tracking", "mlartifacts")).as_uri()
        client = MlflowClient(self.mlflow_uri)
        experiment = client.get_experiment_by_name(self.project)
        if experiment is None:
            experiment_id = client.create_experiment(self.project, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":
                client.restore_experiment(experiment_id)
        run_id = client.create_run(experiment_id, run_name=self.recipe.name, tags=self.tags()).info.run_id
        recipe = self.recipe_dump()
        values = {**flatten(recipe, "recipe"),
                  **{f"fingerprint.{stage}": digest for stage, digest in self.fingerprints.items()}}
        params = [Param(key, (value if isinstance(value, str) else json.dumps(value))[:_MLFLOW_PARAM_LENGTH])
                  for key, value in values.items()]
        for start in range(0, len(params), _MLFLOW_BATCH):
            client.log_batch(run_id, params=params[start:start + _MLFLOW_BATCH])
        client.log_dict(run_id, recipe, "recipe.json")
        return client, run_id

    def _start_wandb(self) -> Any:
        import wandb

        self._wandb_dir = tempfile.mkdtemp(prefix="sphuatuo-wandb-")
        return wandb.init(project=self.project, entity=self.settings.wandb_entity, group=self.group,
                          job_type="pipeline", name=self.recipe.name, dir=self._wandb_dir,
                          mode=self.settings.wandb_mode, reinit="create_new",
                          config={"recipe": self.recipe_dump(), "fingerprint": self.fingerprints},
                          settings=wandb.Settings(console="off"))

    def worker_environment(self, stage: str, fingerprint: str, trackers: list[str]) -> dict[str, str]:
        """What a training stage's workers need to report to `trackers` under this pipeline run: the MLflow
        server or database, experiment and the tags that nest the stage's run under the pipeline's; the W&B
        project, group and mode."""
        env: dict[str, str] = {}
        if "mlflow" in trackers:
            self._open("mlflow")
            tags = {**self.tags(), "mlflow.parentRunId": self.mlflow_run_id, "sphuatuo.stage": stage,
                    "sphuatuo.fingerprint": fingerprint}
            env.update(MLFLOW_TRACKING_URI=self.mlflow_uri, MLFLOW_EXPERIMENT_NAME=self.project,
                       MLFLOW_TAGS=json.dumps(tags))
        if "wandb" in trackers:
            self._open("wandb")
            env.update(WANDB_PROJECT=self.project, WANDB_RUN_GROUP=self.group, WANDB_JOB_TYPE="train",
                       WANDB_MODE=self.settings.wandb_mode, WANDB_CONSOLE="off")
            if self.settings.wandb_entity:
                env["WANDB_ENTITY"] = self.settings.wandb_entity
        return env

    def training_params(self, stage: str, fingerprint: str) -> dict[str, str]:
        """What a stage's own W&B run records of the pipeline run besides the trainer's arguments."""
        return {"recipe": self.recipe.name, "recipe_kind": self.recipe.recipe, "stage": stage,
                "fingerprint": fingerprint, "group": self.group}

    def training_finished(self, stage: str, trackers: list[str], log_history: list[dict[str, Any]]) -> None:
        """A stage's logged steps into the pipeline's runs, each metric as `<stage>/<name>` at its step."""
        entries = [({metric_key(f"{stage}/{key}"): float(value) for key, value in entry.items()
                     if key != "step" and isinstance(value, int | float) and not isinstance(value, bool)},
                    int(entry["step"])) for entry in log_history if "step" in entry]
        if "mlflow" in trackers:
            self._mlflow_metrics([(key, value, step) for values, step in entries for key, value in values.items()])
        if "wandb" in trackers:
            self._open("wandb")
            self._wandb.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
            for values, step in entries:
                self._wandb.log({**values, f"{stage}/step": step})

    def _mlflow_metrics(self, metrics: list[tuple[str, float, int]]) -> None:
        """(name, value, step) into the pipeline's MLflow run, in batches of MLflow's size."""
        from mlflow.entities import Metric

        self._open("mlflow")
        client, run_id = self._mlflow
        now = int(time.time() * 1000)
        entities = [Metric(key, value, now, step) for key, value, step in metrics]
        for start in range(0, len(entities), _MLFLOW_METRIC_BATCH):
            client.log_batch(run_id, metrics=entities[start:start + _MLFLOW_METRIC_BATCH])

    def evaluation(self, trackers: list[str], protocols: dict[str, Any]) -> None:
        """The evaluation's scores, per model and protocol, as metrics and as one table."""
        rows = evaluation_rows(protocols)
        if not rows:
            return
        metrics = {metric_key(f"evaluate/{row['model']}/{row['protocol']}/{key}"): float(row[key])
                   for row in rows for key in EVALUATION_METRICS}
        table = {column: [row[column] for row in rows] for column in EVALUATION_COLUMNS}
        if "mlflow" in trackers:
            self._mlflow_metrics([(key, value, 0) for key, value in metrics.items()])
            client, run_id = self._mlflow
            client.log_table(run_id, data=table, artifact_file="evaluation.json")
        if "wandb" in trackers:
            import wandb

            self._open("wandb")
            self._wandb.log({**metrics, "evaluation": wandb.Table(columns=list(EVALUATION_COLUMNS),
                                                                  data=[list(row.values()) for row in rows])})
        if "tensorboard" in trackers:
            self._tensorboard_evaluation(metrics, rows)

    def _tensorboard_evaluation(self, metrics: dict[str, float], rows: list[dict[str, Any]]) -> None:
        from tensorboardX import SummaryWriter

        local = tempfile.mkdtemp(prefix="sphuatuo-tensorboard-")
        writer = SummaryWriter(local)
        for key, value in metrics.items():
            writer.add_scalar(key, value, 0)
        lines = ["| " + " | ".join(EVALUATION_COLUMNS) + " |", "|" + " --- |" * len(EVALUATION_COLUMNS)]
        lines += ["| " + " | ".join(str(value) for value in row.values()) + " |" for row in rows]
        writer.add_text("evaluation", "\n".join(lines), 0)
        writer.close()
        self.run.replace_dir(local, "evaluate", "tensorboard")
        shutil.rmtree(local, ignore_errors=True)

    def close(self, failed: bool) -> None:
        """End the pipeline's tracker runs (failed or finished) and copy W&B's run files into the run root."""
        if self._mlflow is not None:
            client, run_id = self._mlflow
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
            self._mlflow = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=int(failed))
            self._wandb = None
            copy_wandb_runs(self._wandb_dir, self.run, "tracking", "wandb")
            shutil.rmtree(self._wandb_dir, ignore_errors=True)


def finish_worker_wandb(output_dir: str, run: RunRoot, stage: str) -> None:
    """On a training stage's rank 0, after training: end its W&B run (its files complete) and copy them to
    `<run root>/<stage>/wandb`."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    copy_wandb_runs(output_dir, run, stage, "wandb")
