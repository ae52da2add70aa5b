"""Plan a recipe before paying for GPUs: what each stage asks Ray for, whether its model fits in GPU
memory, and a rough duration from the decode roofline.

This is back-of-envelope arithmetic, not a profiler. Engines need their weights (split over tensor
parallel ranks) plus KV cache; vLLM refuses to start unless one sequence of `max_model_len` tokens fits
next to the weights, and runs fewer sequences at once when the whole batch does not. Trainers need
weights, gradients and Adam state, each sharded over the workers as its ZeRO stage says, plus
activations. Decoding is memory-bound: every step reads all weights once for the whole batch, plus each
sequence's KV cache, so tokens/s is at most bandwidth / bytes read per step x sequences per step.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphuatuo.recipe import EngineConfig, O1Recipe, QuestionSource, Recipe, TrainStage, remote_code_summary

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_RESERVE_GIB = 4.0
"""Per GPU, besides weights, KV cache and training state: CUDA context, NCCL and DeepSpeed buffers, and
vLLM's activation peak (its start-up memory profile reports 2-5 GiB for 7B-32B models)."""
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")

KNOWN_MODELS: dict[str, dict[str, Any]] = {
    # The published config.json of the models in pipelines/, to plan without downloading them.
    "Qwen/QwQ-32B": {
        "model_type": "qwen2", "hidden_size": 5120, "intermediate_size": 27648, "num_hidden_layers": 64,
        "num_attention_heads": 40, "num_key_value_heads": 8, "vocab_size": 152064,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "Qwen/Qwen2.5-7B-Instruct": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
    "builtin:smollm2-135m-instruct": {  # as sphuatuo.local_models builds it: float32
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    },
}


# ---------------------------------------------------------------------------------------------
# Model sizes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSize:
    """The shape of a dense decoder (Llama/Qwen2 layout): enough for weights, KV cache and LoRA sizes."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    dtype: str  # the checkpoint's; engines with dtype "auto" load it as is
    source: str  # where these numbers came from

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str) -> ModelSize | None:
        """None for what this arithmetic does not cover (mixture of experts, nested or partial configs)."""
        if any(key in config for key in MOE_KEYS):
            return None
        try:
            heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
            size = cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases; Llama-style configs say so in `attention_bias`.
                qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
                dtype=str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"),
                source=source,
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        return size if size.dtype in DTYPE_BYTES else None

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by its module name."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linear_shapes().values()) + 2 * self.hidden_size  # + 2 norms
        if self.qkv_bias:
            per_layer += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size  # + final norm

    def kv_bytes_per_token(self, dtype_bytes: int, tensor_parallel: int = 1) -> int:
        """K and V of every layer for one token on one GPU. vLLM splits the KV heads over tensor parallel
        ranks, and replicates them when there are fewer heads than ranks."""
        return 2 * self.num_layers * math.ceil(self.num_kv_heads / tensor_parallel) * self.head_dim * dtype_bytes

    def lora_params(self, rank: int, targets: str | list[str]) -> int:
        """Adapter parameters: rank x (in + out) per targeted linear; `all-linear` leaves out lm_head, as PEFT does."""
        shapes = self.linear_shapes()
        names = list(shapes) if targets == "all-linear" else [t for t in targets if t in shapes]
        return self.num_layers * sum(rank * sum(shapes[name]) for name in names)


def model_size(model: str) -> ModelSize | None:
    """From config.json when `model` is a local directory, else from KNOWN_MODELS; None when neither
    knows it, so the plan says "unknown model size" instead of guessing."""
    config_path = Path(model).expanduser() / "config.json"
    if config_path.is_file():
        return ModelSize.from_config(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
    if model in KNOWN_MODELS:
        return ModelSize.from_config(KNOWN_MODELS[model], "built-in table")
    return None


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    """One engine or trainer that a stage starts: what it asks Ray for, and what it needs per GPU."""

    stage: str
    role: str  # teacher, judge, student or trainer
    model: str
    gpus_per_replica: float  # per engine replica (tensor_parallel_size x gpus_per_replica) or per training worker
    replicas: int  # engine replicas or training workers
    cpus: float  # all replicas together
    memory_gib: dict[str, float] = field(default_factory=dict)  # per GPU, by component
    usable_gib: float | None = None  # what one GPU may hold for this
    fits: bool | None = None  # None: not checked (CPU only, or unknown model size)
    reason: str = ""
    tokens_per_s: float | None = None  # decode ceiling of all replicas together
    rows: int | None = None  # prompts the stage generates for, when the recipe fixes it
    hours_per_1k_rows: float | None = None  # every reply at max_tokens, at the decode ceiling
    notes: list[str] = field(default_factory=list)

    @property
    def gpus(self) -> float:
        return self.gpus_per_replica * self.replicas

    @property
    def hours(self) -> float | None:
        if self.rows is None or self.hours_per_1k_rows is None:
            return None
        return self.rows / 1000 * self.hours_per_1k_rows


@dataclass
class Plan:
    recipe: str
    gpu_memory_gb: float
    gpu_bandwidth_tbs: float
    stages: list[StagePlan]
    remote_code: str  # `none`, or `path → model` of each model that runs the code shipped with it

    @property
    def fits(self) -> bool:
        return all(stage.fits is not False for stage in self.stages)


def plan(recipe: Recipe, gpu_memory_gb: float = 80, gpu_bandwidth_tbs: float = 3.35) -> Plan:
    """Plan every engine and trainer of a Self-Play recipe on GPUs with `gpu_memory_gb` each (as sold:
    an 80 GB H100 holds 80 GiB) and `gpu_bandwidth_tbs` of memory bandwidth (H100 SXM: 3.35 TB/s)."""
    if isinstance(recipe, O1Recipe):
        return _o1_plan(recipe, gpu_memory_gb, gpu_bandwidth_tbs)
    models, stages = recipe.models, recipe.stages
    train_rows, test_rows = _question_counts(recipe)
    judge = models.judge.engine if models.judge.kind != "rule" else None

    def generation(stage: str, role: str, engine: EngineConfig, rows: int | None, max_tokens: int) -> list[StagePlan]:
        passes = [_engine_plan(stage, role, engine, gpu_memory_gb, gpu_bandwidth_tbs, rows, max_tokens)]
        if judge is not None:
            passes.append(_engine_plan(stage, "judge", judge, gpu_memory_gb, gpu_bandwidth_tbs, rows, None))
        return passes

    teacher = generation("teacher_cot", "teacher", models.teacher, train_rows, stages.teacher_cot.sampling.max_tokens)
    if stages.teacher_cot.retry_with_reference and not stages.teacher_cot.reveal_reference:
        teacher[0].notes.append("plus one hinted retry of each rejected question")
    samples = None if train_rows is None else train_rows * stages.student_answers.samples_per_question
    strategies = stages.preference_pairs.strategies
    pairs = []
    for role, engine, corrections in (("student", models.student, {"self_correction", "answer_correction"}),
                                      ("teacher", models.teacher, {"teacher_correction"})):
        used = sorted(corrections & set(strategies))
        if used:
            passes = generation("preference_pairs", role, engine, samples, stages.preference_pairs.sampling.max_tokens)
            passes[0].notes.append(f"rows: at most the wrong answers of student_answers, for each of {', '.join(used)}")
            pairs += passes
    dpo_models = len(stages.dpo_models())
    evaluated = None if test_rows is None else test_rows * len(stages.evaluated_models())
    dpo = _train_plan("dpo", stages.dpo, models.student.model, gpu_memory_gb, preference=True)
    if dpo_models > 1:
        dpo.notes.append(f"{dpo_models} DPO models, one per pair strategy, one after the other")
    return Plan(
        recipe=recipe.name,
        gpu_memory_gb=gpu_memory_gb,
        gpu_bandwidth_tbs=gpu_bandwidth_tbs,
        remote_code=remote_code_summary(recipe.model_dump()),
        stages=[
            *teacher,
            _train_plan("sft", stages.sft, models.student.model, gpu_memory_gb, preference=False),
            *generation("student_answers", "student", models.student, samples,
                        stages.student_answers.sampling.max_tokens),
            *pairs,
            dpo,
            *generation("evaluate", "student", models.student, evaluated, stages.evaluate.sampling.max_tokens),
        ],
    )


def _o1_plan(recipe: O1Recipe, gpu_memory_gb: float, bandwidth_tbs: float) -> Plan:
    """The HuatuoGPT-o1 stages: problem construction, the search (at most 1 + attempts x depth (+1 with the
    label revealed) steps per problem, each verified), SFT, RL (policy, reference and verifier per worker)."""
    models, stages = recipe.models, recipe.stages
    train_rows, test_rows = _question_counts(recipe)
    problems, search = stages.verifiable_problems, stages.reasoning_search
    judge = models.judge.engine if models.judge.kind != "rule" else None

    def engine(stage: str, role: str, config: EngineConfig, rows: int | None, max_tokens: int | None) -> StagePlan:
        return _engine_plan(stage, role, config, gpu_memory_gb, bandwidth_tbs, rows, max_tokens)

    plans = [engine("verifiable_problems", "small model", small, train_rows, problems.small_model_sampling.max_tokens)
             for small in problems.small_models]
    asks = (2 if problems.filter else 1) * (1 + problems.max_retries)
    plans.append(engine("verifiable_problems", "teacher", models.teacher, train_rows, problems.sampling.max_tokens))
    plans[-1].notes.append(f"{'filter and rewrite' if problems.filter else 'rewrite'}: at most {asks} replies per row")
    steps = 1 + search.max_attempts * search.max_depth + int(search.reveal_label)
    plans.append(engine("reasoning_search", "teacher", models.teacher, None, search.sampling.max_tokens))
    plans[-1].notes.append(f"at most {steps} steps per problem, then natural reasoning and a final response")
    if judge is not None:
        plans.append(engine("reasoning_search", "judge", judge, None, 8))
    plans.append(_train_plan("sft", stages.sft, models.student.model, gpu_memory_gb, preference=False))
    rl = _train_plan("rl", stages.rl, models.student.model, gpu_memory_gb, preference=False)
    colocated = " and a colocated vLLM engine" if stages.rl.generates_with_vllm else ""
    rl.notes.append(f"plus a frozen reference copy, the {stages.rl.verifier.kind} verifier{colocated} per worker: "
                    "not modelled")
    plans.append(rl)
    evaluated = None if test_rows is None else test_rows * len(stages.evaluated_models())
    plans.append(engine("evaluate", "student", models.student, evaluated, stages.evaluate.sampling.max_tokens))
    return Plan(recipe=recipe.name, gpu_memory_gb=gpu_memory_gb, gpu_bandwidth_tbs=bandwidth_tbs, stages=plans,
                remote_code=remote_code_summary(recipe.model_dump()))


def _question_counts(recipe: Recipe) -> tuple[int | None, int | None]:
    """(train, test) question counts where `limit`s fix them; None where only the files know."""

    def known(sources: list[QuestionSource]) -> int | None:
        limits = [source.limit for source in sources]
        return None if None in limits else sum(limit or 0 for limit in limits)

    train = known(recipe.data.train)
    if recipe.data.test:
        return train, known(recipe.data.test)
    if train is None:
        return None, (None if recipe.data.test_fraction else 0)
    test = round(train * recipe.data.test_fraction)
    return train - test, test


def _engine_plan(stage: str, role: str, engine: EngineConfig, gpu_memory_gb: float, bandwidth_tbs: float,
                 rows: int | None, max_tokens: int | None) -> StagePlan:
    """An engine pass; `max_tokens` None for the one-token judge, whose time is prefill, not decode."""
    vllm = engine.backend == "vllm"
    tp = engine.tensor_parallel_size if vllm else 1  # the hf backend has no tensor parallelism
    out = StagePlan(stage, role, engine.model, gpus_per_replica=engine.gpus_per_replica * tp,
                    replicas=engine.max_replicas, cpus=engine.cpus_per_replica * tp * engine.max_replicas, rows=rows)
    if max_tokens is None:
        out.notes.append("one output token per row: prefill-bound, not estimated")
    size = model_size(engine.model)
    if size is None:
        out.reason = "unknown model size"
        return out
    if "quantization" in engine.engine_kwargs:
        out.reason = f"unknown model size: quantization {engine.engine_kwargs['quantization']!r} is not modelled"
        return out
    if engine.gpus_per_replica == 0:
        out.reason = "CPU engine: no GPU memory to check"
        return out

    auto_dtype = "bfloat16" if vllm and size.dtype == "float32" else size.dtype  # vLLM runs fp32 checkpoints in 16 bits
    weight_bytes = DTYPE_BYTES[auto_dtype if engine.dtype == "auto" else engine.dtype]
    kv_dtype = str(engine.engine_kwargs.get("kv_cache_dtype", "auto"))
    kv_token = size.kv_bytes_per_token(1 if kv_dtype.startswith("fp8") else weight_bytes, tp)
    weights = size.params * weight_bytes / tp
    one_sequence = kv_token * engine.max_model_len
    utilization = 1.0
    if vllm:
        utilization = float(engine.engine_kwargs.get("gpu_memory_utilization", engine.gpu_memory_utilization))
    # Engines packed onto a shared GPU (gpus_per_replica < 1) split its memory.
    out.usable_gib = gpu_memory_gb * min(engine.gpus_per_replica, 1.0) * utilization
    out.memory_gib = {"weights": weights / GIB, "kv_cache": one_sequence * engine.batch_size / GIB,
                      "runtime": RUNTIME_RESERVE_GIB}
    kv_room = (out.usable_gib - RUNTIME_RESERVE_GIB) * GIB - weights
    # vLLM pages the KV cache and needs room for one full sequence; transformers holds the whole batch.
    needed = one_sequence if vllm else one_sequence * engine.batch_size
    if weights + RUNTIME_RESERVE_GIB * GIB > out.usable_gib * GIB:
        out.fits = False
        out.reason = (f"weights {weights / GIB:.1f} GiB per GPU + {RUNTIME_RESERVE_GIB:.0f} GiB runtime exceed the "
                      f"{out.usable_gib:.1f} GiB usable ({utilization:g} x {gpu_memory_gb:g} GiB)"
                      + ("; raise tensor_parallel_size" if vllm else "; the hf backend cannot split a model"))
        return out
    if kv_room < needed:
        out.fits = False
        out.reason = (f"after {weights / GIB:.1f} GiB of weights and {RUNTIME_RESERVE_GIB:.0f} GiB runtime, "
                      f"{kv_room / GIB:.1f} of {out.usable_gib:.1f} GiB per GPU is left for KV cache, less than the "
                      f"{needed / GIB:.1f} GiB that "
                      + (f"one {engine.max_model_len}-token sequence needs; lower max_model_len or raise "
                         "tensor_parallel_size" if vllm else f"a batch of {engine.batch_size} needs"))
        return out
    out.fits = True
    if max_tokens is None:
        return out

    reply = min(max_tokens, engine.max_model_len)
    # Rows in flight per replica, capped by the scheduler (vLLM) or one batch at a time (transformers).
    offered = min(engine.scheduler_limits[0], engine.batch_size * engine.max_concurrent_batches) if vllm \
        else engine.batch_size
    at_once = min(offered, int(kv_room // (kv_token * reply)))
    if at_once < offered:
        out.notes.append(f"KV cache holds {at_once} of {offered} replies of {reply} tokens at once")
    # A decode step reads the weights once and each running sequence's KV, on average half a reply long.
    step_seconds = (weights + at_once * kv_token * reply / 2) / (bandwidth_tbs * 1e12)
    out.tokens_per_s = at_once / step_seconds * engine.max_replicas
    out.hours_per_1k_rows = 1000 * max_tokens / out.tokens_per_s / 3600
    return out


def _train_plan(stage: str, config: TrainStage, model: str, gpu_memory_gb: float, *, preference: bool) -> StagePlan:
    """A Ray Train + DeepSpeed stage; DPO (`preference`) runs chosen and rejected through the model together."""
    scaling = config.scaling
    out = StagePlan(stage, "trainer", model, gpus_per_replica=1 if scaling.use_gpu else 0,
                    replicas=scaling.num_workers, cpus=scaling.cpus_per_worker * scaling.num_workers)
    size = model_size(model)
    if size is None:
        out.reason = "unknown model size"
        return out
    if not scaling.use_gpu:
        out.reason = "CPU training: no GPU memory to check"
        return out

    workers, zero = scaling.num_workers, scaling.zero_stage
    param_bytes = 2 if config.precision == "bf16" else 4
    base = size.params
    if config.finetuning == "full":
        trainable, frozen = base, 0
    else:
        trainable, frozen = size.lora_params(config.lora.rank, config.lora.target_modules), base
        unknown = [] if config.lora.target_modules == "all-linear" else [
            name for name in config.lora.target_modules if name not in size.linear_shapes()]
        if unknown:
            out.notes.append(f"LoRA targets not counted: {', '.join(unknown)}")
    # Mixed precision keeps an fp32 master copy next to Adam's two fp32 moments: 4 + 2 x 4 bytes per
    # trainable parameter besides its 16-bit weight and grad (fp32 training has no separate master copy).
    optimizer_bytes = 8 + (4 if param_bytes == 2 else 0)

    def shard(n_bytes: float, from_stage: int) -> float:
        """ZeRO-2 shards gradients and optimizer state over the workers, ZeRO-3 the weights too."""
        return n_bytes / workers if zero >= from_stage else n_bytes

    # Full DPO keeps a frozen reference copy; under LoRA the reference is the base with adapters off.
    reference = base if preference and config.finetuning == "full" else 0
    tokens = config.micro_batch_size * config.max_length * (2 if preference else 1)
    h, kv = size.hidden_size, size.num_kv_heads * size.head_dim
    # Kept for backward per token and layer: the layer and MLP inputs and their norms, q/k/v and the
    # attention output, gate/up, the activation and the down input (~4h + 2q + 2kv + 4i values).
    per_layer = 4 * h + 2 * size.num_heads * size.head_dim + 2 * kv + 4 * size.intermediate_size
    kept = size.num_layers * h + per_layer if config.gradient_checkpointing else size.num_layers * per_layer
    out.memory_gib = {
        "weights": shard((frozen + trainable + reference) * param_bytes, 3) / GIB,
        "grads": shard(trainable * param_bytes, 2) / GIB,
        "optimizer": shard(trainable * optimizer_bytes, 2) / GIB,
        # plus fp32 logits over the vocabulary and their gradient, for the loss
        "activations": tokens * (kept * param_bytes + 2 * 4 * size.vocab_size) / GIB,
        "runtime": RUNTIME_RESERVE_GIB,
    }
    out.usable_gib = gpu_memory_gb
    total = sum(out.memory_gib.values())
    out.fits = total <= gpu_memory_gb
    if not out.fits:
        parts = " + ".join(f"{name} {gib:.1f}" for name, gib in out.memory_gib.items())
        out.reason = (f"{parts} = {total:.1f} GiB per GPU > {gpu_memory_gb:g} GiB; use ZeRO-3, more workers, "
                      "LoRA or gradient checkpointing")
    trained = (f"all {base / 1e9:.2f}B parameters" if config.finetuning == "full"
               else f"LoRA rank {config.lora.rank}: {trainable / 1e6:.1f}M of {base / 1e9:.2f}B parameters")
    out.notes.append(f"{trained} trained, {f'ZeRO-{zero}' if zero else 'DDP'} over {workers} workers")
    return out


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def format_plan(result: Plan) -> str:
    """The plan as a table, then one line per engine or trainer with the reason or notes behind its row."""
    header = ("stage", "role", "model", "GPUs", "CPUs", "weights", "KV/train", "usable", "verdict", "tok/s", "time")
    table = [header]
    for s in result.stages:
        state = sum(gib for name, gib in s.memory_gib.items() if name not in ("weights", "runtime"))
        verdict = {True: "fits", False: "DOES NOT FIT", None: "not checked"}[s.fits]
        if s.hours is not None:
            time = f"{_duration(s.hours)} ({s.rows} rows)"
        elif s.hours_per_1k_rows is not None:
            time = f"{_duration(s.hours_per_1k_rows)} per 1k rows"
        else:
            time = "-"
        table.append((
            s.stage, s.role, s.model if len(s.model) <= 32 else "..." + s.model[-29:],
            f"{s.gpus_per_replica:g} x {s.replicas} = {s.gpus:g}", f"{s.cpus:g}",
            f"{s.memory_gib['weights']:.1f}" if s.memory_gib else "-",
            f"{state:.1f}" if s.memory_gib else "-",
            f"{s.usable_gib:.1f}" if s.usable_gib is not None else "-",
            verdict, f"{s.tokens_per_s:,.0f}" if s.tokens_per_s is not None else "-", time,
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = [
        f"plan for {result.recipe}: {result.gpu_memory_gb:g} GiB GPUs at {result.gpu_bandwidth_tbs:g} TB/s; "
        f"memory in GiB per GPU, {RUNTIME_RESERVE_GIB:.0f} GiB of runtime reserved on each",
        "GPUs: per replica x replicas; KV/train: KV cache for the whole batch at max_model_len, or grads + "
        "optimizer + activations; time: every reply at max_tokens, at the decode roofline",
        "",
        *("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in table),
        "",
    ]
    for s in result.stages:
        detail = "; ".join(filter(None, [s.reason, *s.notes]))
        if detail:
            lines.append(f"{s.stage}/{s.role}: {detail}")
    failing = [f"{s.stage}/{s.role}" for s in result.stages if s.fits is False]
    lines.append("")
    lines.append(f"remote code: {result.remote_code}")
    lines.append(f"DOES NOT FIT: {', '.join(failing)}" if failing else "every checked stage fits")
    return "\n".join(lines)


def _duration(hours: float) -> str:
    return f"{hours:.1f} h" if hours >= 1 else f"{hours * 60:.0f} min"
