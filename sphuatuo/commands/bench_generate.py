"""`sphuatuo bench generate`: what the Ray Data generation stage costs against the bare engine.

Same prompts (the student prompt over the sample bank), same model, greedy decoding, in one run:
1. bare vLLM, `LLM.chat` in this process (the ceiling);
2. the `vllm` back-end as the stages run it: Ray Data + `ray.data.llm`, engine replicas as actors;
3. the `hf` back-end: transformers `generate` in a Ray Data actor pool.
Each line reports wall time with and without the engine's start-up, so a short run does not hide
the steady-state cost, and the ratio of output tokens/s against bare vLLM.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from dataclasses import dataclass

from sphuatuo.data.loaders import SAMPLE_BANK, load_questions, resolve_source_path
from sphuatuo.engines import Request
from sphuatuo.engines.precision import cpu_dtype
from sphuatuo.local_models import resolve_model
from sphuatuo.prompts import Messages, get_prompt, options_block
from sphuatuo.recipe import EngineConfig, SamplingConfig


@dataclass(frozen=True)
class BenchLine:
    engine: str
    rows: int
    seconds: float
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def bench_prompts(count: int) -> list[Messages]:
    bank = load_questions(resolve_source_path(SAMPLE_BANK)).questions
    prompt = get_prompt("self_play/student_answer")
    return [prompt.messages(question=q.question, options_block=options_block(q))
            for q in itertools.islice(itertools.cycle(bank), count)]


def _bare_vllm(model: str, prompts: list[Messages], max_tokens: int, dtype: str,
               max_model_len: int) -> tuple[BenchLine, BenchLine]:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(model=model, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=0)
    ready = time.perf_counter()
    outputs = llm.chat(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False,
                       add_generation_prompt=False, continue_final_message=True)
    finished = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return (BenchLine("bare vLLM (in process, engine ready)", len(prompts), finished - ready, tokens),
            BenchLine("bare vLLM (in process, incl. engine start)", len(prompts), finished - started, tokens))


def _ray_pass(engine: EngineConfig, prompts: list[Messages], max_tokens: int) -> tuple[int, float, int]:
    """One Ray Data pass, streamed as the stages run it: rows, seconds, output tokens."""
    import pyarrow.compute as pc
    import ray.data

    from sphuatuo import engines

    request = Request.from_config(SamplingConfig(temperature=0.0, max_tokens=max_tokens))
    ds = engines.generate(ray.data.from_items([{"key": i, "messages": m} for i, m in enumerate(prompts)]),
                          engine, request)
    started = time.perf_counter()
    rows, tokens = 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
        tokens += pc.sum(batch["num_generated_tokens"]).as_py() or 0
    return rows, time.perf_counter() - started, tokens


def _ray_stage(backend: str, model: str, prompts: list[Messages], max_tokens: int, dtype: str,
               max_model_len: int, batch_size: int, cpus: float, cpu_threads: int) -> list[BenchLine]:
    """The whole pass, and the pass less its start-up (actor, engine load, first token), which a
    one-row pass measures: the steady state a long pass converges to."""
    engine = EngineConfig(backend=backend, model=model, dtype=dtype, max_model_len=max_model_len,
                          batch_size=batch_size, cpus_per_replica=cpus, cpu_threads=cpu_threads)
    _, startup, _ = _ray_pass(engine, prompts[:1], 1)
    rows, seconds, tokens = _ray_pass(engine, prompts, max_tokens)
    return [BenchLine(f"{backend} via Ray Data (incl. actor + engine start)", rows, seconds, tokens),
            BenchLine(f"{backend} via Ray Data (less {startup:.0f} s start-up)", rows, max(seconds - startup, 1e-3),
                      tokens)]


def bench_generate(model: str, prompts: int, max_tokens: int, dtype: str, batch_size: int, cpus: float,
                   with_hf: bool, cpu_threads: int | None = None) -> list[BenchLine]:
    """Bare vLLM first (the baseline), then the Ray Data back-ends. On CPU, each engine gets the same
    compute threads (`cpu_threads`, default: every core), so the ratios measure the pipeline, not
    a thread count."""
    from sphuatuo.store.runtime import apply_cpu_environment, connect_ray

    apply_cpu_environment()
    path = resolve_model(model)
    messages = bench_prompts(prompts)
    max_model_len = 2048
    threads = cpu_threads or os.cpu_count() or 1
    # Both sides run the same dtype: the one `auto` picks for this CPU, unless one is given.
    dtype = cpu_dtype().dtype if dtype == "auto" else dtype
    lines = list(_bare_vllm(path, messages, max_tokens, dtype, max_model_len))

    connect_ray()
    lines += _ray_stage("vllm", path, messages, max_tokens, dtype, max_model_len, batch_size, cpus, threads)
    if with_hf:
        lines += _ray_stage("hf", path, messages, max_tokens, dtype, max_model_len, batch_size, cpus, threads)
    return lines


def format_bench(lines: list[BenchLine]) -> str:
    base = lines[0].tokens_per_s
    out = [f"{'engine':<58} {'rows':>5} {'seconds':>8} {'rows/s':>7} {'out tok/s':>9} {'vs bare':>8}"]
    for line in lines:
        out.append(f"{line.engine:<58} {line.rows:>5} {line.seconds:>8.1f} {line.rows / line.seconds:>7.2f} "
                   f"{line.tokens_per_s:>9.1f} {line.tokens_per_s / base:>8.2f}")
    return "\n".join(out)
