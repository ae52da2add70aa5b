"""Overlays: a shipped recipe on a smaller machine, in its real shape.

A paper-scale recipe names 32B and 7B models on GPUs, tens of thousands of questions and 10k-token chains. An
overlay (`sphuatuo run RECIPE --overlay pipelines/overlays/cpu.yaml`) shrinks only what a machine decides —
model paths, counts, token budgets, engine and GPU sizes, training steps — and keeps everything that makes the
recipe what it is: the back-ends and the role each model plays, the judges and verifiers, the pair strategies,
the prompts, the data formats, the storage and the stage list. So a recipe that runs under the CPU overlay on a
laptop runs the same code paths on the cluster.

An overlay is not a partial recipe merged field by field: it says what to do to every engine, every training
stage, every data source and every sampling budget, whichever roles and stages the recipe has, so one overlay
serves every recipe. It may only change `SIZE_FIELDS`; `shape_changes` lists anything else it changed, which
the tests keep empty for every shipped recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

SIZE_FIELDS = frozenset({
    # engines: what runs where, and how big
    "model", "base_url", "replicas", "qps", "batch_size", "max_concurrent_batches", "cpus_per_replica",
    "gpus_per_replica", "tensor_parallel_size", "max_model_len", "dtype", "gpu_memory_utilization",
    "accelerator_type", "max_num_seqs", "max_num_batched_tokens",
    # data: which file of the same format, how many rows
    "path", "limit",
    # budgets: tokens, steps, batches, workers
    "max_tokens", "max_response_length", "max_protocol_tokens", "epochs", "max_steps", "max_length", "micro_batch_size",
    "grad_accumulation", "global_batch_size", "num_workers", "use_gpu", "gpus_per_worker", "cpus_per_worker",
    "offload_optimizer", "offload_params", "checkpoint_every_steps", "precision",
    # colocated vLLM generation inside RL workers exists on GPUs only
    "use_vllm",
})
"""The only recipe fields an overlay may change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalEngines(_Section):
    """Every engine that loads weights (`backend: vllm` or `hf`), whatever its role. None: left as the recipe has
    it."""

    model: str | None = None
    replicas: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    cpus_per_replica: float | None = Field(default=None, gt=0)
    gpus_per_replica: float | None = Field(default=None, ge=0)
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=64)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] | None = None


class HostedEngines(_Section):
    """Every OpenAI-compatible engine: it keeps its model name (`gpt-4o`) and is sent to `base_url` instead."""

    base_url: str | None = None
    replicas: int | None = Field(default=None, ge=1)
    qps: int | None = Field(default=None, ge=1)


class OverlayData(_Section):
    """Each data source reads a small file of its own format instead (paths relative to the overlay file)."""

    train_files: dict[str, str] = Field(default_factory=dict, description="format → file, for training sources")
    test_files: dict[str, str] = Field(default_factory=dict, description="format → file, for test sources (other "
                                                                         "questions: train and test never share one)")
    train_limit: int | None = Field(default=None, ge=1, description="questions per training source, at most")
    test_limit: int | None = Field(default=None, ge=1, description="questions per test source, at most")


class OverlayTraining(_Section):
    """Every training stage (a stage section with `scaling`, `epochs` or `finetuning`)."""

    epochs: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=16)
    micro_batch_size: int | None = Field(default=None, ge=1)
    grad_accumulation: int | None = Field(default=None, ge=1)
    precision: Literal["bf16", "fp32"] | None = None
    num_workers: int | None = Field(default=None, ge=1)
    cpus_per_worker: float | None = Field(default=None, gt=0)
    use_gpu: bool | None = None
    checkpoint_every_steps: int | None = Field(default=None, ge=1, description="where the recipe checkpoints "
                                                                               "at all")
    use_vllm: bool | None = None


class Overlay(_Section):
    engines: LocalEngines = LocalEngines()
    hosted: HostedEngines = HostedEngines()
    judge_model: str | None = Field(default=None, description="the judge's engine, when it loads weights (after "
                                                              "`engines`)")
    verifier_model: str | None = Field(default=None, description="RL verifiers that load a model (classifier, llm)")
    data: OverlayData = OverlayData()
    max_tokens: int | None = Field(default=None, ge=1, description="every sampling budget (and RL's response "
                                                                   "length), at most")
    training: OverlayTraining = OverlayTraining()


def read_overlay(path: str | Path) -> Overlay:
    """An overlay file, validated, its data files made absolute; a ValueError names the file and the field."""
    try:
        overlay = Overlay.model_validate(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
        folder = Path(path).resolve().parent
        for files in (overlay.data.train_files, overlay.data.test_files):
            files.update({name: str(folder / file) for name, file in files.items()})
        return overlay
    except FileNotFoundError:
        raise ValueError(f"overlay {path}: file not found") from None
    except yaml.YAMLError as err:
        raise ValueError(f"overlay {path}: not valid YAML: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"overlay {path}: {problems}") from None


def _set(section: dict[str, Any], values: BaseModel) -> None:
    for name in values.model_fields_set:
        section[name] = getattr(values, name)


def _engines(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Every engine section of a raw recipe: a mapping with a `backend` field, wherever it is."""
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "backend" in node:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(raw.get("models", {}))
    walk(raw.get("stages", {}))
    return found


def _cap(section: dict[str, Any], field: str, cap: int | None) -> None:
    value = section.get(field)
    if cap is not None and (value is None or value > cap):
        section[field] = cap


def apply_overlay(raw: dict[str, Any], overlay: Overlay, source: str = "overlay") -> dict[str, Any]:
    """The raw recipe `raw` with `overlay` applied (in place, and returned)."""
    for engine in _engines(raw):
        _set(engine, overlay.hosted if engine["backend"] == "openai" else overlay.engines)
    judge = raw.get("models", {}).get("judge", {}).get("engine")
    if overlay.judge_model and judge and judge.get("backend") != "openai":
        judge["model"] = overlay.judge_model

    data = overlay.data
    for kind, files, limit in (("train", data.train_files, data.train_limit), ("test", data.test_files,
                                                                                 data.test_limit)):
        for index, data_source in enumerate(raw.get("data", {}).get(kind, [])):
            file_format = data_source.get("format")
            if file_format in files:
                data_source["path"] = files[file_format]
            elif not str(data_source["path"]).startswith("builtin:"):
                raise ValueError(f"{source}: data.{kind}.{index} reads format {file_format!r}, for which the overlay "
                                 f"has no file (data.{kind}_files)")
            _cap(data_source, "limit", limit)

    for stage in raw.get("stages", {}).values():
        if not isinstance(stage, dict):
            continue
        for field, value in stage.items():
            if field.endswith("sampling") and isinstance(value, dict):
                _cap(value, "max_tokens", overlay.max_tokens)
        if "max_response_length" in stage:
            _cap(stage, "max_response_length", overlay.max_tokens)
        if "protocols" in stage:
            _cap(stage, "max_protocol_tokens", overlay.max_tokens)
        if "verifier" in stage and stage["verifier"].get("model") and overlay.verifier_model:
            stage["verifier"]["model"] = overlay.verifier_model
        if {"scaling", "epochs", "finetuning"} & stage.keys():
            _train(stage, overlay.training)
    return raw


def _train(stage: dict[str, Any], training: OverlayTraining) -> None:
    """One training stage under `training`: the recipe's batch arithmetic stays consistent."""
    scaling = stage.setdefault("scaling", {})
    for name in ("epochs", "max_steps", "max_length", "micro_batch_size", "grad_accumulation", "precision"):
        if name in training.model_fields_set:
            stage[name] = getattr(training, name)
    for name in ("num_workers", "cpus_per_worker", "use_gpu"):
        if name in training.model_fields_set:
            scaling[name] = getattr(training, name)
    if training.use_gpu is False:
        scaling.pop("offload_optimizer", None)
        scaling.pop("offload_params", None)
    if "use_vllm" in stage and "use_vllm" in training.model_fields_set:
        stage["use_vllm"] = training.use_vllm
    if stage.get("checkpoint_every_steps") and training.checkpoint_every_steps:
        stage["checkpoint_every_steps"] = training.checkpoint_every_steps
    if "group_size" in stage:  # RL: each step's completions must fill whole groups of `group_size`
        per_step = stage.get("micro_batch_size", 1) * scaling.get("num_workers", 1)
        stage["grad_accumulation"] = max(stage.get("grad_accumulation", 1), -(-stage["group_size"] // per_step))
    if "global_batch_size" in stage:  # a recipe that states its global batch has it checked: keep it true
        stage["global_batch_size"] = (stage.get("micro_batch_size", 1) * stage.get("grad_accumulation", 1)
                                      * scaling.get("num_workers", 1))


def shape_changes(before: Any, after: Any, path: str = "") -> list[str]:
    """Field paths where `after` differs from `before` in anything but `SIZE_FIELDS`: what an overlay must never
    change."""
    if isinstance(before, dict) or isinstance(after, dict):
        before, after = before or {}, after or {}  # a section the overlay added is compared with an empty one
        changed = []
        for key in before.keys() | after.keys():
            where = f"{path}.{key}" if path else str(key)
            if key in SIZE_FIELDS:
                continue
            changed += shape_changes(before.get(key), after.get(key), where)
        return changed
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [change for index, (b, a) in enumerate(zip(before, after, strict=True))
                for change in shape_changes(b, a, f"{path}.{index}")]
    return [] if before == after else [path]
