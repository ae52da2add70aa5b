"""Inference back-ends behind one interface.

`generate(ds, engine, sampling)` takes a Ray Dataset whose rows carry a `messages` column (OpenAI chat
format), or a `prompt` column of raw text to send without the chat template, and returns it with four
columns added:

    generated_text, num_input_tokens, num_generated_tokens, finish_reason ("stop" | "length" | "error")

A row the vLLM engine fails on (say, a prompt longer than max_model_len) does not fail the pass: it
comes back with finish_reason "error" and the engine's message in `engine_error`.

The chat template is the model's own (applied by the engine), so a model is prompted the same way
when it is trained, sampled and evaluated. Raw prompts exist for the one protocol that asks for them
(the SP paper's test, `sphuatuo.stages.evaluate`): vLLM and transformers tokenise the text as it is;
an OpenAI-compatible server gets it on its completions endpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray.data

from sphuatuo.local_models import resolve_model
from sphuatuo.recipe import EngineConfig, SamplingConfig
from sphuatuo.store.runtime import cpu_allocator, process_environment

if TYPE_CHECKING:
    from sphuatuo.engines.serving import EngineServices

GENERATION_COLUMNS = ("generated_text", "num_input_tokens", "num_generated_tokens", "finish_reason")


@dataclass(frozen=True)
class Request:
    """Sampling for every row of one `generate` call."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None
    allowed_token_ids: tuple[int, ...] | None = None
    # A verdict between two words on an OpenAI-compatible server: by its constrained `choice`, or by the
    # standard API's `logprobs` (the likelier word among the first token's top log-probabilities).
    verdict_words: tuple[str, str] | None = None
    verdict_via: str | None = None

    @classmethod
    def from_config(cls, sampling: SamplingConfig, allowed_token_ids: Sequence[int] | None = None) -> Request:
        return cls(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            allowed_token_ids=tuple(allowed_token_ids) if allowed_token_ids else None,
        )


def row_seed(request: Request, row: dict) -> int | None:
    """Per-request seed: the sampling seed plus the row's `sample` index, so the n samples of one
    question differ and each is reproducible."""
    return None if request.seed is None else request.seed + int(row.get("sample") or 0)


def sampling_params(request: Request, seed: int | None) -> dict[str, Any]:
    """vLLM's sampling parameters for one row (a `SamplingParams`' fields, or an OpenAI request's on vLLM)."""
    return {"temperature": request.temperature, "top_p": request.top_p, "max_tokens": request.max_tokens,
            **({"seed": seed} if seed is not None else {}),
            **({"allowed_token_ids": list(request.allowed_token_ids)} if request.allowed_token_ids else {})}


def cpu_engine_environment(engine: EngineConfig) -> dict[str, str]:
    """Environment variables of an engine process on a CPU-only node: its compute threads and the CPU allocator."""
    # Ray would set OMP_NUM_THREADS to the actor's CPU count rounded down; an engine should use its share.
    threads = str(engine.cpu_threads or max(1, math.ceil(engine.cpus_per_replica)))
    return process_environment(on_gpu=False, extra={"OMP_NUM_THREADS": threads, **cpu_allocator()})


def cpu_runtime_env(engine: EngineConfig) -> dict[str, dict[str, str]]:
    """Ray runtime environment of an engine actor on a CPU-only node."""
    return {"env_vars": cpu_engine_environment(engine)}


def generate(
    ds: ray.data.Dataset,
    engine: EngineConfig,
    request: Request,
    *,
    model: str | None = None,
    services: EngineServices | None = None,
    folder: str = "",
) -> ray.data.Dataset:
    """Run every row's `messages` (or raw `prompt`) through `model` (default: the engine's own) and add the
    outputs. vLLM engines come from the run's `services` (started once, kept for later passes) when given;
    `folder` names the pass in their log."""
    model_path = resolve_model(model or engine.model)
    raw = "prompt" in ds.columns()
    if engine.backend == "vllm":
        from sphuatuo.engines.vllm import generate_vllm

        return generate_vllm(ds, engine, request, model_path, raw=raw, services=services, folder=folder,
                             model_name=model or engine.model)
    if engine.backend == "openai":
        from sphuatuo.engines.openai import generate_openai

        return generate_openai(ds, engine, request, model_path, raw=raw)
    from sphuatuo.engines.hf import generate_hf

    return generate_hf(ds, engine, request, model_path)


@dataclass(frozen=True)
class ComingPass:
    """A pass still to run, as `generate` will be called for it: its engine, request and folder, and the model
    when not the engine's own."""

    engine: EngineConfig
    request: Request
    folder: str
    model: str | None = None


def start_ahead(passes: Sequence[ComingPass], services: EngineServices | None) -> None:
    """Start the run's kept vLLM engines for the coming `passes`, in the order they run, side by side
    (`EngineServices.start_ahead`); each pass then finds its engine up. Nothing to do without kept engines;
    passes on the other back-ends start nothing."""
    if services is None:
        return
    from sphuatuo.engines.serving import PlannedEngine
    from sphuatuo.engines.vllm import engine_arguments

    services.start_ahead([PlannedEngine(engine=p.engine, model=p.model or p.engine.model,
                                        model_path=resolve_model(p.model or p.engine.model),
                                        engine_kwargs=engine_arguments(p.engine, p.request.seed), folder=p.folder)
                          for p in passes if p.engine.backend == "vllm"])
