"""vLLM through Ray's own `ray.data.llm` processor: engine replicas as Ray actors, continuous batching
inside each, tensor parallelism through placement groups, autoscaling between (min, max) replicas."""

from __future__ import annotations

from typing import Any

import ray.data
from ray.data.llm import build_processor, vLLMEngineProcessorConfig

from sphuatuo.engines import Request, cpu_runtime_env, row_seed, sampling_params
from sphuatuo.engines.precision import engine_dtype
from sphuatuo.engines.serving import EngineServices
from sphuatuo.recipe import EngineConfig
from sphuatuo.store.runtime import LIGHT_CPUS


def engine_arguments(engine: EngineConfig, seed: int | None) -> dict[str, Any]:
    """The vLLM engine arguments of `engine`, whether it runs inside a Ray Data processor or a Serve app."""
    on_gpu = engine.gpus_per_replica > 0
    return {
        "max_model_len": engine.max_model_len,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "dtype": engine_dtype(engine),
        "max_num_seqs": engine.scheduler_limits[0],
        "max_num_batched_tokens": engine.scheduler_limits[1],
        "enable_prefix_caching": engine.enable_prefix_caching,
        **({"gpu_memory_utilization": engine.gpu_memory_utilization} if on_gpu else {}),
        # On CPU, torch.compile costs a minute of engine start and recompiles on the first batches
        # for little throughput; measured: SmolLM2 starts in 5 s eager vs 60-80 s compiled.
        "enforce_eager": not on_gpu,
        # vLLM 0.32 on CPU crashes on per-request seeds once a prompt is prefilled in chunks
        # ("CPU Generator does not use offset"): seed the engine instead.
        **({} if on_gpu or seed is None else {"seed": seed}),
        **engine.engine_kwargs,
        # A recipe field (never an engine kwarg), so that `sphuatuo plan` and the report can show it; Ray's
        # chat-template stage reads it here too.
        "trust_remote_code": engine.trust_remote_code,
    }


def processor_config(engine: EngineConfig, model_path: str, seed: int | None,
                     raw: bool = False) -> vLLMEngineProcessorConfig:
    """The processor for `engine`; `raw`: rows carry a `prompt` sent as it is (the chat-template stage off)."""
    on_gpu = engine.gpus_per_replica > 0
    engine_kwargs = engine_arguments(engine, seed)
    bundle = {"CPU": engine.cpus_per_replica}
    if on_gpu:
        bundle["GPU"] = engine.gpus_per_replica
    return vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=engine_kwargs,
        batch_size=engine.batch_size,
        concurrency=engine.replicas,
        max_concurrent_batches=engine.max_concurrent_batches,
        accelerator_type=engine.accelerator_type,
        placement_group_config={"bundle_per_worker": bundle},
        runtime_env=None if on_gpu else cpu_runtime_env(engine),
        # vLLM tokenizes and detokenizes inside the engine; separate Ray stages would only add
        # actors competing for the same cores.
        tokenize_stage=False,
        detokenize_stage=False,
        # Templating is light: a sliver of a CPU, so it never waits behind the engine for a core. Raw
        # prompts skip it and reach the engine as its `prompt`.
        chat_template_stage={"enabled": not raw, "concurrency": 1, "batch_size": engine.batch_size,
                             "num_cpus": LIGHT_CPUS},
        # Needs Ray's Prometheus metrics stack, which only the `ray[default]` dashboard brings up.
        log_engine_metrics=False,
        # One bad row (a prompt longer than max_model_len) must not fail the pass: it is kept with
        # its error (see `settle`).
        should_continue_on_error=True,
    )


def generate_vllm(ds: ray.data.Dataset, engine: EngineConfig, request: Request, model_path: str, *,
                  raw: bool = False, services: EngineServices | None = None, folder: str = "",
                  model_name: str = "") -> ray.data.Dataset:
    """Through the run's engine that stays up when `services` is given, else through engines of this pass alone
    (Ray Data's vLLM processor)."""
    if services is not None:
        return services.generate(ds, engine, request, model=model_name or model_path, model_path=model_path,
                                 engine_kwargs=engine_arguments(engine, request.seed), raw=raw, folder=folder)
    on_gpu = engine.gpus_per_replica > 0
    max_tokens = request.max_tokens

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "sampling_params": sampling_params(request, row_seed(request, row) if on_gpu else None)}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {key: value for key, value in row.items() if key in _input_columns}
        out["generated_text"] = row["generated_text"]
        out["num_input_tokens"] = int(row["num_input_tokens"])
        out["num_generated_tokens"] = int(row["num_generated_tokens"])
        # ray.data.llm does not surface vLLM's finish reason; hitting the budget exactly means "length".
        out["finish_reason"] = "length" if out["num_generated_tokens"] >= max_tokens else "stop"
        return out

    def settle(row: dict[str, Any]) -> dict[str, Any]:
        """Give rows the engine failed on (which skip `postprocess`) the same columns as the others,
        with `finish_reason` "error" and the engine's message in `engine_error`."""
        error = row.pop("__inference_error__", "")
        if not error:
            return {**row, "engine_error": None}
        out = {key: value for key, value in row.items() if key in _input_columns}
        return {**out, "generated_text": "", "num_input_tokens": 0, "num_generated_tokens": 0,
                "finish_reason": "error", "engine_error": error}

    _input_columns = set(ds.columns())
    config = processor_config(engine, model_path, request.seed, raw)
    # With the remote args of the chat-template stage, Ray Data fuses `preprocess` into that stage's actor: no
    # task worker processes (each importing Ray Data) to start on every pass beside the engine's.
    preprocess_kwargs = {"num_cpus": LIGHT_CPUS, **({} if raw or config.runtime_env is None
                                                     else {"runtime_env": config.runtime_env})}
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                preprocess_map_kwargs=preprocess_kwargs,
                                postprocess_map_kwargs={"num_cpus": LIGHT_CPUS})
    # Ray Data restarts a dead replica without end by default: a replica that keeps dying would loop the pass.
    processor.get_stage_by_name("vLLMEngineStage").map_batches_kwargs["max_restarts"] = engine.max_restarts
    return processor(ds).map(settle, num_cpus=LIGHT_CPUS)
