"""A recipe is one YAML file that describes a whole run: data, models per role, and each stage.

Every field is typed and unknown keys are refused, so a typo fails `sphuatuo validate` with the
field's path instead of being silently ignored halfway through a GPU job.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from sphuatuo.data.mapping import ColumnMapping
from sphuatuo.overlay import apply_overlay, read_overlay


class Strict(BaseModel):
    # A ValidationError's text never shows the values it refuses: one may be a secret. `load_recipe`
    # adds the value back where it helps and cannot be a credential.
    model_config = ConfigDict(extra="forbid", validate_default=True, hide_input_in_errors=True)


# ---------------------------------------------------------------------------------------------
# Secrets in a recipe, and the error types load_recipe words itself
# ---------------------------------------------------------------------------------------------

# An engine kwarg that is a recipe field: load_recipe names the field by its full path.
RECIPE_FIELD_IN_KWARGS = "recipe_field_in_kwargs"
# A refusal whose input holds credentials: load_recipe never shows the value given (nor any under `secrets`).
CREDENTIALS_IN_URI = "credentials_in_uri"

CREDENTIALS_ADVICE = (
    "credentials in the URI ({problem}) are refused: they would be written to the manifest, the report and the "
    "logs. Leave them out; each node finds its own through its provider chain: an instance role, a Kubernetes "
    "service account, or the AWS_* (GOOGLE_APPLICATION_CREDENTIALS for gs://) environment variables")

TRACKER_CREDENTIALS_ADVICE = (
    "credentials in the URI ({problem}) are refused: they would be written to the manifest, the report and the "
    "logs. Set MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) where the driver "
    "and the workers run")

_CREDENTIAL_QUERY = re.compile(r"key|secret|token|password|credential|signature", re.IGNORECASE)


def uri_credentials(uri: str) -> str | None:
    """What in `uri` carries credentials (`user:password@`, a `secret_key=` query parameter, ...), described
    without their values; None when nothing does."""
    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        return "a user name or key before '@'"
    named = sorted({key for key, _ in parse_qsl(parts.query, keep_blank_values=True) if _CREDENTIAL_QUERY.search(key)})
    if named:
        return "the query parameter " + ", ".join(named)
    return None


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


class QuestionSource(Strict):
    """A question file. `builtin:sample_bank` is the bank the package ships.

    Either `format` (a built-in format, or an entry of the `datasets.yaml` beside the recipe, which
    `load_recipe` replaces by its `columns`) or `columns` (a mapping written inline), or neither to
    detect the format from the file.
    """

    path: str = Field(description="a file or datasets folder: local, NFS, or a pyarrow URI such as s3://…")
    format: str | None = Field(default=None, description="format name; detected from the file when unset")
    columns: ColumnMapping | None = Field(default=None, description="which column holds what (see datasets.yaml)")
    source: str | None = Field(default=None, description="the source name questions carry (default: the format "
                                                         "name, or the file stem)")
    limit: int | None = Field(default=None, ge=1, description="keep only the first N valid questions")

    @model_validator(mode="after")
    def _one_way_to_read(self) -> QuestionSource:
        if self.format is not None and self.columns is not None:
            raise ValueError("give either format or columns, not both")
        return self


class DataConfig(Strict):
    train: list[QuestionSource]
    test: list[QuestionSource] = Field(default_factory=list)
    test_fraction: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="when `test` is empty, hold out this share of `train`"
    )
    max_error_share: float = Field(
        default=0.5, ge=0.0, le=1.0, description="fail the load when more than this share of rows is rejected"
    )


# vLLM's own defaults for its `LLM` class, per device kind (vllm.engine.arg_utils.get_batch_defaults):
# (max_num_seqs, max_num_batched_tokens). ray.data.llm builds its engines without that usage context and
# so gets the scheduler's base limits (128 sequences, 2,048 batched tokens), about half as many; these
# are what a recipe gets unless it says otherwise.
SCHEDULER_DEFAULTS = {"cpu": (256, 4096), "gpu": (256, 8192), "large_gpu": (1024, 16384)}
LARGE_GPUS = ("H100", "H200", "H20", "B200", "B300", "GB200")  # >= 70 GiB, not A100: vLLM's larger defaults


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
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="auto: on GPUs the engine's own choice; on CPUs bf16 where the CPU has native "
                                    "bf16 (AVX-512 BF16, AMX), else fp32 (sphuatuo.engines.precision)")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="vllm: share of each GPU's memory "
                                                                               "for weights and KV cache")
    enable_prefix_caching: bool = Field(default=True, description="vllm: reuse the KV cache of shared prompt "
                                                                  "prefixes (system prompt, one-shot example)")
    accelerator_type: str | None = Field(default=None, description="vllm: schedule replicas only on nodes with "
                                                                   "this Ray accelerator type, e.g. H100, A100-80G")
    max_num_seqs: int | None = Field(default=None, ge=1, description="vllm: sequences one replica decodes at "
                                                                    "once (default: vLLM's LLM default for the "
                                                                    "device kind, see SCHEDULER_DEFAULTS)")
    max_num_batched_tokens: int | None = Field(default=None, ge=1, description="vllm: tokens per scheduler step "
                                                                              "(default: as max_num_seqs)")
    trust_remote_code: bool = Field(
        default=False, description="run the Python code that ships with the model (transformers `auto_map`): "
                                   "code from the model's repository runs on every node that loads it")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to vllm.LLM as is")
    base_url: str | None = Field(default=None, description="openai: the server's /v1 URL")
    server: Literal["openai", "vllm", "sglang"] = Field(
        default="openai", description="openai: what answers at base_url. `openai` (a hosted API) gets the standard "
                                      "API only; `vllm` and `sglang` also get their extensions (continuing a "
                                      "prefilled reply, constrained choices, allowed token ids)")
    api_key_file: str | None = Field(default=None, description="openai: a file holding the API key, at the same "
                                                               "path on every node (a mounted secret)")
    api_key_env: str | None = Field(default=None, description="openai: name of the environment variable "
                                                              "holding the API key (the key itself never goes "
                                                              "in a recipe)")
    request_timeout_s: float = Field(default=600, gt=0, description="openai: per-request timeout")
    max_retries: int = Field(default=5, ge=0, description="openai: retries with exponential backoff on "
                                                          "429/408/5xx and timeouts")
    qps: int | None = Field(default=None, ge=1, description="openai: request rate limit per replica")
    max_attempts: int = Field(default=2, ge=1, description="tries of a row the engine fails on (a prompt too long, "
                                                           "a server error past its retries) before it is kept as "
                                                           "an error row")
    max_error_share: float = Field(default=0.1, ge=0.0, le=1.0, description="fail a pass when more than this "
                                                                            "share of its rows ends in an error")
    max_restarts: int = Field(default=3, ge=0, description="vllm, hf: times Ray restarts a replica that died, per "
                                                           "pass (over the run for an engine kept up; its batches in "
                                                           "flight are sent again); one more death fails the pass "
                                                           "with the replica's error")

    @field_validator("engine_kwargs")
    @classmethod
    def _no_recipe_fields(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Running a model's own code is decided where `sphuatuo plan` and the report can see it."""
        if "trust_remote_code" in kwargs:
            raise PydanticCustomError(RECIPE_FIELD_IN_KWARGS, "{kwarg} is a recipe field (beside engine_kwargs), "
                                      "not an engine kwarg", {"kwarg": "trust_remote_code"})
        return kwargs

    @model_validator(mode="after")
    def _openai_needs_url(self) -> EngineConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://host:8000/v1)")
        if self.backend == "openai" and self.trust_remote_code:
            raise ValueError("backend 'openai' loads no model here: trust_remote_code is the server's own setting")
        return self

    @model_validator(mode="after")
    def _replicas_range(self) -> EngineConfig:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas must be N >= 1 or [min, max] with 1 <= min <= max (got {self.replicas})")
        return self

    @property
    def scheduler_limits(self) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens) one replica runs with: the recipe's, else the defaults of its
        device kind (a CPU engine's scale with its tensor-parallel size, as vLLM's do)."""
        if self.gpus_per_replica == 0:
            seqs, tokens = (n * self.tensor_parallel_size for n in SCHEDULER_DEFAULTS["cpu"])
        elif self.accelerator_type and self.accelerator_type.upper().startswith(LARGE_GPUS):
            seqs, tokens = SCHEDULER_DEFAULTS["large_gpu"]
        else:
            seqs, tokens = SCHEDULER_DEFAULTS["gpu"]
        return (self.engine_kwargs.get("max_num_seqs", self.max_num_seqs or seqs),
                self.engine_kwargs.get("max_num_batched_tokens", self.max_num_batched_tokens or tokens))

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
    constrain: Literal["auto", "token_ids", "choice", "logprobs"] = Field(
        default="auto", description="how the LLM's one-token verdict is constrained: token_ids (the two words' ids in "
                                    "the judge's own tokenizer; vllm and hf engines), choice (a vllm or sglang "
                                    "server's constrained choice), logprobs (the standard API: one token, the likelier "
                                    "of the two words among the top log-probabilities). auto: token_ids for local "
                                    "engines, choice for vllm/sglang servers, logprobs for other OpenAI-compatible "
                                    "APIs")

    @model_validator(mode="after")
    def _llm_needs_engine(self) -> JudgeConfig:
        if self.kind in ("llm", "auto") and self.engine is None:
            raise ValueError(f"judge kind {self.kind!r} needs an `engine` (the judge model)")
        return self

    @model_validator(mode="after")
    def _constraint_fits_the_backend(self) -> JudgeConfig:
        if self.engine is None or self.constrain == "auto":
            return self
        hosted = self.engine.backend == "openai"
        if self.constrain == "token_ids" and hosted:
            raise ValueError("constrain 'token_ids' needs a local engine (vllm or hf): a hosted model's tokenizer is "
                             "not known here; use logprobs (or choice for a vllm/sglang server)")
        if self.constrain in ("choice", "logprobs") and not hosted:
            raise ValueError(f"constrain {self.constrain!r} is for the openai backend; local engines use token_ids")
        if self.constrain == "choice" and self.engine.server == "openai":
            raise ValueError("constrain 'choice' needs a server that offers it (engine.server: vllm or sglang)")
        return self

    @property
    def constraint(self) -> str:
        """`constrain` with `auto` resolved for this judge's engine."""
        if self.constrain != "auto" or self.engine is None:
            return self.constrain
        if self.engine.backend != "openai":
            return "token_ids"
        return "logprobs" if self.engine.server == "openai" else "choice"


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
    hint_prompt: str = Field(default="self_play/reference_hint", description="the block that shows the gold answer "
                                                                             "(reveal_reference, retry_with_reference)")
    retry_with_reference: bool = Field(
        default=False, description="re-ask rejected questions with the reference shown; such rows are hinted=true"
    )
    answer_from_thought: bool = Field(
        default=False, description="multiple-choice replies that stop after </think> with a verified answer in "
                                   "the thought get the judged option(s) as their <answer> (for small teachers)"
    )


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


Tracker = Literal["tensorboard", "mlflow", "wandb"]


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
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = Field(
        default=None, description="attention kernel (default: transformers' choice, sdpa where it can); "
                                  "flash_attention_2 needs the flash-attn package and a GPU")
    use_liger_kernel: bool = Field(default=False, description="Liger's fused kernels (RMSNorm, RoPE, SwiGLU, "
                                                              "cross-entropy); needs the liger-kernel package, GPUs")
    overlong: Literal["drop", "truncate_left"] = Field(
        default="drop", description="an example longer than max_length: drop it, or cut its completion from the "
                                    "start of the chain so the prompt and the answer stay (never a cut that "
                                    "removes the answer)")
    precision: Literal["bf16", "fp32"] = "bf16"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every_steps: int = Field(default=0, ge=0, description="0: only the final export")
    keep_checkpoints: int = Field(default=1, ge=1)
    max_failures: int = Field(default=0, ge=-1,
                              description="worker-group restarts from the last checkpoint; -1: forever")
    report_to: list[Tracker] = Field(default_factory=list, description="trackers for this stage besides "
                                                                    "tracking.report_to")
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
    padding_free: bool = Field(default=True, description="each micro-batch trains as one row of its examples "
                                                         "without padding, attention kept within each example by "
                                                         "its position ids: the padded batch's loss, less compute "
                                                         "where lengths differ (packing implies it)")


class DpoStage(TrainStage):
    learning_rate: float = Field(default=1e-5, gt=0)
    epochs: float = Field(default=10.0, gt=0)
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    grad_accumulation: int = Field(default=16, ge=1)
    beta: float = Field(default=0.3, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    precompute_ref_log_probs: bool = Field(default=False, description="compute the frozen reference's log-probs "
                                                                      "once before training instead of every epoch "
                                                                      "(the paper trains 10 epochs)")


class StudentAnswersStage(Strict):
    prompt: str = "self_play/student_answer"
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=2048)
    samples_per_question: int = Field(default=1, ge=1, description="answers drawn per question (sample k is seeded "
                                                                   "seed + k); the `sampled` strategy needs 2+")


PairStrategy = Literal["self_correction", "answer_correction", "teacher_correction", "sampled"]


class PreferencePairsStage(Strict):
    """METHOD A.3. Several strategies make an ablation: one DPO model per strategy, from the same SFT model."""

    strategies: list[PairStrategy] = Field(
        default_factory=lambda: ["self_correction"], min_length=1,
        description="self_correction (the paper's method), answer_correction, teacher_correction, sampled")
    prompt: str = Field(default="self_play/self_correction", description="thought-level correction "
                                                                         "(self_correction, teacher_correction)")
    answer_prompt: str = Field(default="self_play/answer_correction", description="answer_correction")
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=2048)
    answer_from_thought: bool = Field(default=False, description="as in teacher_cot, for the corrected replies")
    pairs_per_question: int = Field(default=1, ge=1, description="per strategy; also how many wrong answers of a "
                                                                   "question are given to be corrected")
    max_pairs: int | None = Field(default=None, ge=1, description="per strategy; the cap takes every question's "
                                                                  "first pair before any question's second")

    @model_validator(mode="before")
    @classmethod
    def _one_strategy(cls, data: Any) -> Any:
        """Recipes written before ablations name a single `strategy`."""
        if isinstance(data, dict) and "strategy" in data and "strategies" not in data:
            data = {key: value for key, value in data.items() if key != "strategy"} | {"strategies": [data["strategy"]]}
        return data

    @model_validator(mode="after")
    def _distinct_strategies(self) -> PreferencePairsStage:
        if len(set(self.strategies)) != len(self.strategies):
            raise ValueError(f"strategies lists one twice: {self.strategies}")
        return self


# Named evaluation protocols (sphuatuo.stages.evaluate.PROTOCOLS says what each one samples and scores).
ProtocolName = Literal["project", "strict", "sp_paper", "o1_paper", "shuffled"]


class EvaluateStage(Strict):
    prompt: str = "self_play/student_answer"
    models: list[Literal["base", "sft", "dpo"]] = Field(
        default=["base", "sft", "dpo"], description="`dpo`: every DPO model of the run (one per pair strategy)")
    sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_tokens=2048)
    protocols: list[ProtocolName] = Field(
        default_factory=lambda: ["project"], min_length=1,
        description="each a generation pass per model, scored by its own rule, reported side by side: project (this "
                    "stage's sampling, chat template, last match), strict (greedy; a reply cut at the budget is "
                    "wrong), sp_paper (the SP paper's test: T 0.7, top_p 0.9, 450 tokens, raw prompt without the chat "
                    "template), o1_paper (HuatuoGPT-o1's scorer: T 0.5, right when the first or the last match is), "
                    "shuffled (as project, each item's options in another order: the permutation check); the first "
                    "is the one the report's breakdowns show")
    max_protocol_tokens: int | None = Field(
        default=None, ge=1, description="caps every protocol's token budget, the papers' fixed ones included "
                                        "(sp_paper's 450): for shrunk runs, as an overlay sets it; the report's "
                                        "protocol labels show the budget each ran with")

    report_to: list[Tracker] = Field(default_factory=list, description="trackers for the results besides "
                                                                    "tracking.report_to")

    @model_validator(mode="after")
    def _distinct_protocols(self) -> EvaluateStage:
        if len(set(self.protocols)) != len(self.protocols):
            raise ValueError(f"protocols lists one twice: {self.protocols}")
        return self


class StagesConfig(Strict):
    teacher_cot: TeacherCotStage = TeacherCotStage()
    sft: SftStage = SftStage()
    student_answers: StudentAnswersStage = StudentAnswersStage()
    preference_pairs: PreferencePairsStage = PreferencePairsStage()
    dpo: DpoStage = DpoStage()
    evaluate: EvaluateStage = EvaluateStage()

    def dpo_models(self) -> dict[str, str]:
        """DPO model name (also its folder in the run) -> the pair strategy it is trained on: `dpo` for one
        strategy, `dpo_<strategy>` for each of several (an ablation)."""
        strategies = self.preference_pairs.strategies
        if len(strategies) == 1:
            return {"dpo": strategies[0]}
        return {f"dpo_{strategy}": strategy for strategy in strategies}

    def evaluated_models(self) -> list[str]:
        """The models the evaluate stage compares, with `dpo` standing for every DPO model."""
        return [model for name in self.evaluate.models
                for model in (self.dpo_models() if name == "dpo" else [name])]

    @model_validator(mode="after")
    def _sampled_needs_samples(self) -> StagesConfig:
        if "sampled" in self.preference_pairs.strategies and self.student_answers.samples_per_question < 2:
            raise ValueError("pair strategy 'sampled' needs stages.student_answers.samples_per_question >= 2 "
                             "(a correct and a wrong sample of the same question)")
        return self


# ---------------------------------------------------------------------------------------------
# HuatuoGPT-o1 stages (METHOD B). Roles: teacher = the search generator (GPT-4o in the paper),
# judge = the verifier, student = the policy fine-tuned and improved by RL.
# ---------------------------------------------------------------------------------------------


class VerifiableProblemsStage(Strict):
    """Multiple-choice items -> open-ended problems with a short ground-truth answer (METHOD B.1)."""

    filter: bool = Field(default=True, description="ask the generator to filter first: Pass / Too Simple / "
                                                   "Ambiguous Answer / Not Reformulatable; only Pass goes on")
    filter_prompt: str = "huatuo_o1/filter"
    rewrite_prompt: str = "huatuo_o1/rewrite"
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=1024)
    max_retries: int = Field(default=1, ge=0, description="re-asks (with a new seed) of an unreadable filter or "
                                                          "rewrite reply; the released code tries twice")
    small_models: list[EngineConfig] = Field(
        default_factory=list, description="pre-filter: drop items that every one of these models answers correctly "
                                          "(the paper uses three small models); empty: no pre-filter")
    small_model_prompt: str = "huatuo_o1/eval"
    small_model_sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_tokens=1024)
    rl_share: float = Field(default=0.5, ge=0.0, lt=1.0, description="share of the problems kept for RL instead "
                                                                    "of the search (paper: 20K and 20K)")


SearchStrategy = Literal["backtracking", "exploring_new_paths", "verification", "correction"]


class ReasoningSearchStage(Strict):
    """Verifier-guided search for a complex reasoning path, then its rewrite as natural thinking (METHOD B.2)."""

    init_prompt: str = "huatuo_o1/search_init"
    strategies: list[SearchStrategy] = ["backtracking", "exploring_new_paths", "verification", "correction"]
    max_depth: int = Field(default=3, ge=1, description="strategy steps per attempt (paper: 3)")
    max_attempts: int = Field(default=3, ge=1, description="restarts from the initial reasoning (paper: 3)")
    reveal_label: bool = Field(
        default=False, description="one more step for items still unsolved, with the ground truth revealed "
                                   "('pretend not to know'); such items are flagged label_revealed and, unlike the "
                                   "released code, still verified")
    sampling: SamplingConfig = SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=4096)
    plain_text_fallback: bool = Field(
        default=False, description="for small generators: a search reply that is not the JSON chain is read as one "
                                   "reasoning step whose last paragraph is the conclusion, and a natural-reasoning "
                                   "reply that is not JSON as the text itself (the trace notes each such reply)")
    verifier_prompt: str = "huatuo_o1/verify"
    natural_prompt: str = "huatuo_o1/natural_reasoning"
    response_prompt: str = "huatuo_o1/final_response"
    max_problems: int | None = Field(default=None, ge=1, description="search only the first N problems")
    data: str | None = Field(default=None, description="a file of the released verifiable problems "
                                                       "(medical-o1-verifiable-problem: Open-ended Verifiable "
                                                       "Question, Ground-True Answer) to search instead of this "
                                                       "run's own")

    @model_validator(mode="after")
    def _first_retry_has_a_strategy(self) -> ReasoningSearchStage:
        if not set(self.strategies) - {"backtracking"}:
            raise ValueError("strategies needs one besides backtracking (never used on the first retry)")
        return self


class O1SftStage(SftStage):
    """Paper values (METHOD B.3): full fine-tuning, lr 5e-6, weight decay 0.1, warmup 0.05, 3 epochs, 8,192
    tokens, ZeRO-3."""

    prompt: str = "huatuo_o1/question"
    finetuning: Literal["full", "lora"] = "full"
    learning_rate: float = Field(default=5e-6, gt=0)
    weight_decay: float = Field(default=0.1, ge=0.0)
    warmup_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    max_length: int = Field(default=8192, ge=16)
    include_label_revealed: bool = Field(default=True, description="train on paths found with the label revealed")
    data: str | None = Field(default=None, description="a file of the released SFT paths (medical-o1-reasoning-SFT: "
                                                       "Question, Complex_CoT, Response) to train on instead of this "
                                                       "run's search; the run then starts at sft")
    extra_data: str | None = Field(default=None, description="a file in the same format whose rows are added to the "
                                                             "paths (the search's, or `data`'s), each keeping its "
                                                             "origin (its `source` column, else released); "
                                                             "builtin:o1_format_examples is the project's own 64 "
                                                             "short examples in English and Chinese, for policies "
                                                             "too small to learn the format from a few paths")


class RewardVerifierConfig(Strict):
    """Who decides that a final response is correct, inside the RL workers (METHOD B.4).

    `exact_match`: the option letters the response names equal the gold letters (items from a multiple-choice
    bank; others: the ground truth appears in the response); `classifier`: a sequence-classification model
    (the released 3B verifier) with p(True) > threshold; `llm`: a causal LM asked True/False."""

    kind: Literal["exact_match", "classifier", "llm"] = "exact_match"
    model: str | None = Field(default=None, description="classifier or llm: a local path or hub id")
    trust_remote_code: bool = Field(default=False, description="run the Python code that ships with `model`")
    threshold: float = Field(default=0.4, gt=0.0, lt=1.0, description="classifier: p(True) above this accepts")
    prompt: str = Field(default="huatuo_o1/verify", description="llm: the verifier prompt")
    max_length: int = Field(default=2048, ge=64)

    @model_validator(mode="after")
    def _model_for_models(self) -> RewardVerifierConfig:
        if self.kind != "exact_match" and not self.model:
            raise ValueError(f"verifier kind {self.kind!r} needs `model`")
        if self.kind == "exact_match" and self.trust_remote_code:
            raise ValueError("verifier kind 'exact_match' loads no model: trust_remote_code does not apply")
        return self


class RlStage(TrainStage):
    """RL with the verifier as reward (METHOD B.4). The paper's PPO left TRL; GRPO and RLOO are offered with the
    same reward. Paper values where they carry over: lr 5e-7, KL 0.03, response length 1,300, temperature 0.5,
    3 optimisation epochs per batch."""

    algorithm: Literal["grpo", "rloo"] = "grpo"
    prompt: str = "huatuo_o1/question"
    start_from: Literal["sft", "base"] = Field(default="sft", description="sft: the SFT export (base if the run "
                                                                          "has none)")
    finetuning: Literal["full", "lora"] = "full"
    learning_rate: float = Field(default=5e-7, gt=0)
    epochs: float = Field(default=1.0, gt=0)
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    kl_coef: float = Field(default=0.03, ge=0.0, description="paper (PPO): 0.03")
    group_size: int = Field(default=8, ge=2, description="completions per prompt")
    max_response_length: int = Field(default=1300, ge=1, description="paper: 1,300 tokens")
    temperature: float = Field(default=0.5, gt=0.0, description="paper: 0.5")
    iterations: int = Field(default=3, ge=1, description="optimisation passes per generated batch (PPO epochs: 3)")
    use_vllm: bool | None = Field(default=None, description="generate with vLLM colocated in each worker (GPUs "
                                                              "only); default: on with GPUs, off on CPU")
    verifier: RewardVerifierConfig = RewardVerifierConfig()
    max_prompts: int | None = Field(default=None, ge=1, description="train on the first N RL problems")
    data: str | None = Field(default=None, description="a file of the released verifiable problems to train on "
                                                       "instead of this run's RL share")

    @property
    def generates_with_vllm(self) -> bool:
        return self.scaling.use_gpu if self.use_vllm is None else self.use_vllm


class O1EvaluateStage(EvaluateStage):
    """The released evaluation prompt (METHOD B.5); `huatuo_o1/eval_strict` asks for 'The answer is X.'."""

    prompt: str = "huatuo_o1/eval"
    models: list[Literal["base", "sft", "rl"]] = ["base", "sft", "rl"]


class O1StagesConfig(Strict):
    verifiable_problems: VerifiableProblemsStage = VerifiableProblemsStage()
    reasoning_search: ReasoningSearchStage = ReasoningSearchStage()
    sft: O1SftStage = O1SftStage()
    rl: RlStage = RlStage()
    evaluate: O1EvaluateStage = O1EvaluateStage()

    def evaluated_models(self) -> list[str]:
        return list(self.evaluate.models)


class StorageConfig(Strict):
    """How the nodes reach an object-store run root (`s3://…`)."""

    credentials: Literal["node", "driver"] = Field(
        default="node", description="node: each node's own provider chain (instance role, Kubernetes service "
                                    "account, AWS_* in its environment), which the SDK refreshes as they expire; "
                                    "driver: for nodes that have none, the driver's credentials (botocore's chain) "
                                    "relayed to Ray Train's processes through a Ray actor and renewed there as the "
                                    "driver's chain renews them; never inside the pickled filesystem")


class TrackingConfig(Strict):
    """Experiment trackers (sphuatuo.store.tracking): every training stage's trainer metrics, as the trainer logs
    them, and the evaluation's accuracies with their intervals, beside the recipe and each stage's fingerprint."""

    report_to: list[Tracker] = Field(
        default_factory=list, description="for every training stage and the evaluation (a stage's own report_to "
                                          "adds to these): tensorboard, mlflow, wandb")
    mlflow_uri: str | None = Field(
        default=None, description="an MLflow tracking server (http://host:5000) or database (postgresql://…); "
                                  "default: the SQLite database RUN_ROOT/tracking/mlflow.db (a local or NFS run root)")
    project: str | None = Field(default=None, description="the MLflow experiment and the W&B project (default: the "
                                                          "recipe's name)")
    wandb_mode: Literal["offline", "online"] = Field(
        default="offline", description="offline: W&B writes its run files into the run root (`wandb sync` uploads "
                                       "them later); online: needs WANDB_API_KEY on the driver and every node")
    wandb_entity: str | None = Field(default=None, description="the W&B team or user (default: the API key's)")

    @field_validator("mlflow_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        problem = uri_credentials(uri) if uri else None
        if problem:
            raise PydanticCustomError(CREDENTIALS_IN_URI, TRACKER_CREDENTIALS_ADVICE, {"problem": problem})
        return uri


class RayConfig(Strict):
    address: str | None = Field(default=None, description="None: connect to RAY_ADDRESS or start a local cluster")
    num_cpus: int | None = Field(default=None, ge=1, description="only for a local cluster started by sphuatuo")
    keep_engines_up: bool = Field(
        default=True, description="vLLM engines stay up, shared by every pass and stage that uses the same model and "
                                  "engine arguments until a training stage needs the devices; false: each pass "
                                  "starts and stops its own engines (Ray Data's vLLM processor)")
    engine_host: Literal["auto", "serve", "actors"] = Field(
        default="auto", description="what keeps engines up: Ray Serve LLM apps (autoscaling, tensor parallelism) or "
                                    "plain Ray actors holding vLLM's engine; auto: Serve on GPUs, actors on CPU "
                                    "(measured on 2 cores: a Serve LLM engine came up in 37-52 s and ran passes at "
                                    "half speed)")


PROMPT_FAMILIES = {"en": "self_play", "zh": "self_play_zh"}


def is_prompt_field(name: str) -> bool:
    """Fields that name a prompt template: `prompt` and `*_prompt` (the fingerprint adds the template's version)."""
    return name == "prompt" or name.endswith("_prompt")


def _localise_prompts(node: BaseModel, family: str) -> None:
    """Point every prompt field that names a Self-Play template at the same template of `family`."""
    for name, value in node:
        if isinstance(value, BaseModel):
            _localise_prompts(value, family)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _localise_prompts(item, family)
        elif isinstance(value, str) and is_prompt_field(name):
            prompt_family, _, key = value.partition("/")
            if prompt_family in PROMPT_FAMILIES.values():
                setattr(node, name, f"{family}/{key}")


class Recipe(Strict):
    """The Self-Play recipe (METHOD A)."""

    # The stages a run of this kind runs, in order (modules under sphuatuo.stages), and those that train.
    STAGES: ClassVar[tuple[str, ...]] = (
        "questions",
        "self_play.teacher_cot",
        "self_play.sft",
        "self_play.student_answers",
        "self_play.preference_pairs",
        "self_play.dpo",
        "evaluate",
    )
    TRAINING_STAGES: ClassVar[tuple[str, ...]] = ("sft", "dpo")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    recipe: Literal["self_play"] = "self_play"
    run_root: str = Field(description="local path, NFS path, or s3:// / gs:// URI; relative paths are resolved "
                                      "against the current directory")
    seed: int = 0
    secrets: list[str] = Field(
        default_factory=list, description="names of environment variables whose values are secrets: masked as *** "
                                          "in the run log, the manifest, the report and error messages (every "
                                          "`api_key_env` counts without being listed)")
    data: DataConfig
    models: ModelsConfig
    stages: StagesConfig = StagesConfig()
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("run_root")
    @classmethod
    def _no_credentials(cls, run_root: str) -> str:
        problem = uri_credentials(run_root)
        if problem:
            raise PydanticCustomError(CREDENTIALS_IN_URI, CREDENTIALS_ADVICE, {"problem": problem})
        return run_root

    @field_validator("secrets")
    @classmethod
    def _variable_names(cls, names: list[str]) -> list[str]:
        bad = [name for name in names if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)]
        if bad:
            # Only the count: an entry that is not a variable name may be a pasted secret.
            raise ValueError(f"entries that are not environment variable names: {len(bad)} (list the variables' "
                             "names, never their values)")
        return names
    prompt_language: Literal["en", "zh"] = Field(
        default="en", description="the Self-Play prompt family: en (self_play/…) or zh (self_play_zh/…, the project's "
                                  "Chinese versions); every self_play prompt field is resolved to it, so the "
                                  "manifest and the fingerprints name the templates used")

    @model_validator(mode="after")
    def _resolve_prompt_language(self) -> Recipe:
        _localise_prompts(self, PROMPT_FAMILIES[self.prompt_language])
        return self

    @model_validator(mode="after")
    def _mlflow_has_a_store(self) -> Recipe:
        remote = "://" in self.run_root and not self.run_root.startswith("file://")
        used = {tracker for _, stage in self.stages for tracker in getattr(stage, "report_to", ())}
        if remote and self.tracking.mlflow_uri is None and "mlflow" in used | set(self.tracking.report_to):
            raise ValueError("mlflow with an object-store run root needs tracking.mlflow_uri (a tracking server or "
                             "database): the default SQLite database lives in a local or NFS run root")
        return self

    def trackers(self, stage: TrainStage | EvaluateStage) -> list[Tracker]:
        """What a training stage or the evaluation reports to: `tracking.report_to`, then its own `report_to`."""
        return list(dict.fromkeys([*self.tracking.report_to, *stage.report_to]))


class O1Recipe(Recipe):
    """The HuatuoGPT-o1 recipe: the same data, models and Ray sections, its own stages."""

    STAGES: ClassVar[tuple[str, ...]] = (
        "questions",
        "huatuo_o1.verifiable_problems",
        "huatuo_o1.reasoning_search",
        "huatuo_o1.sft",
        "huatuo_o1.rl",
        "evaluate",
    )
    TRAINING_STAGES: ClassVar[tuple[str, ...]] = ("sft", "rl")

    recipe: Literal["huatuo_o1"] = "huatuo_o1"  # type: ignore[assignment]
    stages: O1StagesConfig = O1StagesConfig()  # type: ignore[assignment]


# The one place a recipe kind is looked up: its config class, which names its stages.
RECIPE_KINDS: dict[str, type[Recipe]] = {"self_play": Recipe, "huatuo_o1": O1Recipe}


# ---------------------------------------------------------------------------------------------
# Models that run their own code
# ---------------------------------------------------------------------------------------------


def remote_code_models(recipe: Mapping[str, Any]) -> dict[str, str]:
    """Field path -> model of every model the recipe loads with `trust_remote_code`, from a recipe as a plain
    mapping (a Recipe's model_dump, or the copy a manifest keeps), so old manifests are read the same way:
    before the field existed, `engine_kwargs` could turn it on."""
    found: dict[str, str] = {}

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, Mapping):
            kwargs = node.get("engine_kwargs")
            if node.get("trust_remote_code") is True or (isinstance(kwargs, Mapping)
                                                          and kwargs.get("trust_remote_code") is True):
                found[_field_path(path)] = str(node.get("model"))
            for key, value in node.items():
                if key != "engine_kwargs":  # read above, as its engine's
                    walk(value, (*path, key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, (*path, index))

    walk(recipe, ())
    return found


def remote_code_summary(recipe: Mapping[str, Any]) -> str:
    """`none`, or each model that runs its own code as `path → model`: the line `sphuatuo plan` and the report
    print, so a reviewer sees it before a run and after."""
    models = remote_code_models(recipe)
    return ", ".join(f"{path} → {model}" for path, model in models.items()) or "none"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class RecipeError(ValueError):
    """Raised with every problem of a recipe file, each on its own line with its field path.

    `raw` is the file's mapping when it could be read, so a caller can still learn which environment
    variables the recipe names as secrets (and mask them in the message it prints)."""

    def __init__(self, path: str, problems: list[str], raw: dict[str, Any] | None = None):
        self.path = path
        self.problems = problems
        self.raw = raw
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


DATASETS_FILE = "datasets.yaml"
"""Named column mappings beside a recipe, that its sources reference by `format:`."""


def _resolve_formats(raw: dict[str, Any], datasets_file: Path) -> list[str]:
    """Replace each `format:` naming a datasets.yaml entry by that entry's `columns:` (and make the name the
    source's name), so the recipe the run records is complete without the file; unknown names are problems."""
    from sphuatuo.data.loaders import BUILTIN_FORMATS
    from sphuatuo.data.mapping import read_mappings

    data = raw.get("data")
    sources = [(f"data.{split}.{i}", item) for split in ("train", "test")
               for i, item in enumerate(data.get(split) or [] if isinstance(data, dict) else [])
               if isinstance(item, dict) and isinstance(item.get("format"), str)]
    named = [(where, item) for where, item in sources if item["format"] not in BUILTIN_FORMATS]
    if not named:
        return []
    try:
        mappings = read_mappings(datasets_file) if datasets_file.is_file() else {}
    except ValueError as err:
        return [str(err)]
    problems = []
    for where, item in named:
        name = item["format"]
        if name not in mappings:
            problems.append(f"{where}.format: unknown format {name!r} (built in: {', '.join(BUILTIN_FORMATS)}; "
                            f"{datasets_file}: {', '.join(mappings) or 'none'})")
            continue
        del item["format"]
        item["columns"] = mappings[name].model_dump(exclude_defaults=True)
        item.setdefault("source", name)
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None, overlays: Sequence[str | Path] = ()) -> Recipe:
    """Parse and validate a recipe with `overlays` (files, see sphuatuo.overlay) and then `overrides` applied;
    raise RecipeError listing every problem with its field path."""
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
        if overlays:
            _state_sampling_defaults(raw)
        for overlay in overlays:
            raw = apply_overlay(raw, read_overlay(overlay), str(overlay))
        raw = apply_overrides(raw, overrides or [])
    except ValueError as err:
        raise RecipeError(path, [str(err)], raw) from None
    problems = _resolve_formats(raw, Path(path).parent / DATASETS_FILE)
    if problems:
        raise RecipeError(path, problems, raw)
    return parse_recipe(raw, path)


def _state_sampling_defaults(raw: dict[str, Any]) -> None:
    """Write out every sampling block a recipe leaves at its stage's default, so that an overlay's token budget
    caps those too (HuatuoGPT-o1's small models decode 1,024 tokens unless the recipe says otherwise)."""
    kind = RECIPE_KINDS.get(raw.get("recipe", "self_play"))
    stages = raw.setdefault("stages", {})
    if kind is None or not isinstance(stages, dict):
        return
    for stage_name, default_stage in kind.model_fields["stages"].default:
        stage = stages.setdefault(stage_name, {})
        if not isinstance(stage, dict):
            continue
        for name, value in default_stage:
            if isinstance(value, SamplingConfig) and name not in stage:
                stage[name] = value.model_dump()


def parse_recipe(raw: dict[str, Any], source: str) -> Recipe:
    """Validate a raw recipe mapping (from a file, or as a manifest stores it); `source` names it in errors."""
    path = source
    kind = raw.get("recipe", "self_play")
    if kind not in RECIPE_KINDS:
        raise RecipeError(path, [f"recipe: unknown recipe {kind!r} (known: {', '.join(RECIPE_KINDS)})"], raw)
    try:
        return RECIPE_KINDS[kind].model_validate(raw)
    except ValidationError as err:
        raise RecipeError(path, [_problem(e) for e in err.errors()], raw) from None


def _problem(error: Any) -> str:
    """One line of a RecipeError: the field's path, what is wrong, and the value given when it is safe to show."""
    kind, message = error["type"], error["msg"]
    if kind == "extra_forbidden":
        message = "unknown field (not part of the recipe schema)"
    elif kind == RECIPE_FIELD_IN_KWARGS:
        kwarg = error["ctx"]["kwarg"]
        message = f"{kwarg} is a recipe field ({_field_path((*error['loc'][:-1], kwarg))}), not an engine kwarg"
    hidden = kind in ("missing", "extra_forbidden", RECIPE_FIELD_IN_KWARGS, CREDENTIALS_IN_URI)
    given = "" if hidden or error["loc"][:1] == ("secrets",) else f" (got {error.get('input')!r:.80})"
    return f"{_field_path(error['loc'])}: {message}{given}"
