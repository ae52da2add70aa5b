"""A recipe is one YAML file that describes a whole run: data, models per role, and each stage.

Every field is typed and unknown keys are refused, so a typo fails `sphuatuo validate` with the
field's path instead of being silently ignored halfway through a GPU job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


class QuestionSource(Strict):
    """A question file. `builtin:sample_bank` is the bank the package ships."""

    path: str
    format: str | None = Field(default=None, description="loader name; detected from the file when unset")
    limit: int | None = Field(default=None, ge=1, description="keep only the first N valid questions")


class DataConfig(Strict):
    train: list[QuestionSource]
    test: list[QuestionSource] = Field(default_factory=list)
    test_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="when `test` is empty, hold out this share of `train`"
    )
    max_error_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fail the load when more than this share of rows is rejected"
    )


class EngineConfig(Strict):
    """Where a role's model runs. `vllm` is the production path (Ray's ray.data.llm processor);
    `hf` runs transformers `generate` in a Ray Data actor pool; `openai` sends chat requests to any
    OpenAI-compatible server (a `vllm serve`, SGLang, a hosted teacher)."""

    backend: Literal["vllm", "hf", "openai"] = "vllm"
    model: str = Field(description="a local path, a hub id, or builtin:tiny / builtin:smollm2-135m-instruct")
    replicas: int | tuple[int, int] = Field(
        default=1, description="engine actors (data parallel): N for a fixed pool, or [min, max] for a pool "
                               "that grows with the backlog as the autoscaler adds GPU nodes")
    batch_size: int = Field(default=16, ge=1, description="rows per batch sent to a replica")
    max_concurrent_batches: int = Field(default=8, ge=1, description="batches in flight per replica, so the "
                                                                     "engine's continuous batching never runs dry")
    cpus_per_replica: float = Field(default=1, gt=0)
    cpu_threads: int | None = Field(default=None, ge=1, description="CPU engines: compute threads per replica "
                                                                   "(default: cpus_per_replica rounded up)")
    gpus_per_replica: float = Field(default=0, ge=0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_model_len: int = Field(default=4096, ge=64)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vllm: share of each GPU's memory "
                                                                               "for weights and KV cache")
    enable_prefix_caching: bool = Field(default=True, description="vllm: reuse the KV cache of shared prompt "
                                                                  "prefixes (system prompt, one-shot example)")
    accelerator_type: str | None = Field(default=None, description="vllm: schedule replicas only on nodes with "
                                                                   "this Ray accelerator type, e.g. H100, A100-80G")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to vllm.LLM as is")
    base_url: str | None = Field(default=None, description="openai: the server's /v1 URL")
    api_key_env: str | None = Field(default=None, description="openai: name of the environment variable "
                                                              "holding the API key (the key itself never goes "
                                                              "in a recipe)")
    request_timeout_s: float = Field(default=600, gt=0, description="openai: per-request timeout")
    max_retries: int = Field(default=5, ge=0, description="openai: retries with exponential backoff on "
                                                          "429/408/5xx and timeouts")
    qps: int | None = Field(default=None, ge=1, description="openai: request rate limit per replica")

    @model_validator(mode="after")
    def _openai_needs_url(self) -> EngineConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://host:8000/v1)")
        return self

    @model_validator(mode="after")
    def _replicas_range(self) -> EngineConfig:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas must be N >= 1 or [min, max] with 1 <= min <= max (got {self.replicas})")
        return self

    @property
    def min_replicas(self) -> int:
        return self.replicas if isinstance(self.replicas, int) else self.replicas[0]

    @property
    def max_replicas(self) -> int:
        return self.replicas if isinstance(self.replicas, int) else self.replicas[1]


class JudgeConfig(Strict):
    """`llm`: the one-token constrained judge (METHOD A.5). `rule`: option-letter set equality.
    `auto`: rule for multiple-choice items, llm for open-ended ones."""

    kind: Literal["llm", "rule", "auto"] = "auto"
    engine: EngineConfig | None = None
    prompt: str = "self_play/judge"

    @model_validator(mode="after")
    def _llm_needs_engine(self) -> JudgeConfig:
        if self.kind in ("llm", "auto") and self.engine is None:
            raise ValueError(f"judge kind {self.kind!r} needs an `engine` (the judge model)")
        return self


class ModelsConfig(Strict):
    teacher: EngineConfig
    student: EngineConfig
    judge: JudgeConfig


class SamplingConfig(Strict):
    temperature: float = Field(default=0.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=512, ge=1)
    seed: int | None = 0


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


class TeacherCotStage(Strict):
    prompt: str = "self_play/teacher_cot"
    sampling: SamplingConfig = SamplingConfig(temperature=0.5, top_p=0.9, max_tokens=10000)
    samples_per_question: int = Field(
        default=1, ge=1, description="teacher answers drawn per question (sample k is seeded seed + k); SFT keeps "
                                     "one accepted answer per question")
    reveal_reference: bool = Field(
        default=False, description="show the gold answer in the prompt (the original script did, leaking it)"
    )
    retry_with_reference: bool = Field(
        default=False, description="re-ask rejected questions with the reference shown; such rows are hinted=true"
    )
    answer_from_thought: bool = Field(
        default=False, description="multiple-choice replies that stop after </think> with a verified answer in "
                                   "the thought get the judged option(s) as their <answer> (for small teachers)"
    )
    max_error_share: float = Field(default=1.0, ge=0.0, le=1.0)


class LoraConfig(Strict):
    rank: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class TrainScaling(Strict):
    """One Ray Train worker per GPU (or per CPU slot): 2 nodes x 8 GPUs is num_workers 16."""

    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    gpus_per_worker: float = Field(default=1, gt=0, description="only with use_gpu")
    cpus_per_worker: float = Field(default=1, gt=0)
    zero_stage: Literal[0, 2, 3] = Field(default=2, description="0 = plain DDP")
    offload_optimizer: bool = Field(default=False, description="ZeRO: optimizer states in CPU memory (GPU only)")
    offload_params: bool = Field(default=False, description="ZeRO-3: parameters in CPU memory (GPU only)")
    peak_tflops_per_gpu: float | None = Field(
        default=None, gt=0, description="dense bf16 peak for MFU; default: looked up from the GPU's name")

    @model_validator(mode="after")
    def _offload_needs_zero_on_gpu(self) -> TrainScaling:
        if (self.offload_optimizer or self.offload_params) and not (self.use_gpu and self.zero_stage):
            raise ValueError("offload_optimizer / offload_params need use_gpu and zero_stage 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3 (ZeRO-2 does not partition parameters)")
        return self


class TrainStage(Strict):
    """Shared by SFT and DPO. Global batch = micro_batch_size x grad_accumulation x num_workers."""

    finetuning: Literal["full", "lora"] = "lora"
    lora: LoraConfig = LoraConfig()
    learning_rate: float = Field(default=1e-4, gt=0)
    epochs: float = Field(default=3.0, gt=0)
    max_steps: int = Field(default=-1, description="overrides epochs when > 0")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    micro_batch_size: int = Field(default=1, ge=1)
    grad_accumulation: int = Field(default=8, ge=1)
    global_batch_size: int | None = Field(
        default=None, ge=1, description="optional statement of the global batch, checked against the product")
    max_length: int = Field(default=2048, ge=16)
    precision: Literal["bf16", "fp32"] = "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every_steps: int = Field(default=0, ge=0, description="0: only the final export")
    keep_checkpoints: int = Field(default=1, ge=1)
    max_failures: int = Field(default=0, ge=-1,
                              description="worker-group restarts from the last checkpoint; -1: forever")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(default_factory=list)
    scaling: TrainScaling = TrainScaling()

    @model_validator(mode="after")
    def _global_batch_matches(self) -> TrainStage:
        product = self.micro_batch_size * self.grad_accumulation * self.scaling.num_workers
        if self.global_batch_size is not None and self.global_batch_size != product:
            raise ValueError(f"global_batch_size {self.global_batch_size} != micro_batch_size {self.micro_batch_size}"
                             f" x grad_accumulation {self.grad_accumulation} x scaling.num_workers "
                             f"{self.scaling.num_workers} = {product}")
        return self


class SftStage(TrainStage):
    packing: bool = Field(default=False, description="pack several examples per row (TRL best-fit decreasing, "
                                                     "padding-free): for long CoT; needs flash attention on GPU")


class DpoStage(TrainStage):
    learning_rate: float = Field(default=1e-5, gt=0)
    epochs: float = Field(default=10.0, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    grad_accumulation: int = Field(default=16, ge=1)
    beta: float = Field(default=0.3, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


class StudentAnswersStage(Strict):
    prompt: str = "self_play/student_answer"
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=2048)


class PreferencePairsStage(Strict):
    strategy: Literal["self_correction"] = "self_correction"
    prompt: str = "self_play/self_correction"
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=2048)
    answer_from_thought: bool = Field(default=False, description="as in teacher_cot, for the corrected replies")
    max_pairs: int | None = Field(default=None, ge=1)


class EvaluateStage(Strict):
    prompt: str = "self_play/student_answer"
    models: list[Literal["base", "sft", "dpo"]] = ["base", "sft", "dpo"]
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_tokens=2048)


class StagesConfig(Strict):
    teacher_cot: TeacherCotStage = TeacherCotStage()
    sft: SftStage = SftStage()
    student_answers: StudentAnswersStage = StudentAnswersStage()
    preference_pairs: PreferencePairsStage = PreferencePairsStage()
    dpo: DpoStage = DpoStage()
    evaluate: EvaluateStage = EvaluateStage()


class RayConfig(Strict):
    address: str | None = Field(default=None, description="None: connect to RAY_ADDRESS or start a local cluster")
    num_cpus: int | None = Field(default=None, ge=1, description="only for a local cluster started by sphuatuo")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    recipe: Literal["self_play"] = "self_play"
    run_root: str = Field(description="local path, NFS path, or s3:// / gs:// URI; relative paths are resolved "
                                      "against the current directory")
    seed: int = 0
    data: DataConfig
    models: ModelsConfig
    stages: StagesConfig = StagesConfig()
    ray: RayConfig = RayConfig()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class RecipeError(ValueError):
    """Raised with every problem of a recipe file, each on its own line with its field path."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a raw recipe dict; a number selects a
    list item (`data.train.0.limit=10`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form field.path=value")
        node: Any = raw
        *parents, leaf = key.split(".")
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(leaf)] = yaml.safe_load(value)
            else:
                node[leaf] = yaml.safe_load(value)
        except (ValueError, IndexError, AttributeError, TypeError):
            raise ValueError(f"override {item!r}: {key} does not name a field of this recipe") from None
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse and validate a recipe; raise RecipeError listing every problem with its field path."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(path, ["file not found"]) from None
    except yaml.YAMLError as err:
        raise RecipeError(path, [f"not valid YAML: {err}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError(path, ["the top level must be a mapping of fields"])
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as err:
        raise RecipeError(path, [str(err)]) from None
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            message = "unknown field (not part of the recipe schema)" if e["type"] == "extra_forbidden" else e["msg"]
            given = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e.get('input')!r:.80})"
            problems.append(f"{_field_path(e['loc'])}: {message}{given}")
        raise RecipeError(path, problems) from None
