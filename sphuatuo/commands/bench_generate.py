"""`sphuatuo bench generate`: what the Ray Data generation stage costs against the bare engine.

Same prompts (the student prompt over the sample bank), same model and the same engine arguments on every
side (dtype, scheduler limits, compute threads, eager or not: printed above the table), in one run:
1. bare vLLM, `LLM.chat` in a process of its own with a CPU engine actor's environment (compute threads,
   allocator), or on the GPU (the ceiling);
2. the `vllm` back-end with engines of the pass's own (`ray.keep_engines_up: false`): Ray Data + `ray.data.llm`,
   engine replicas as actors started for the pass;
3. the `vllm` back-end as a run uses it by default (`ray.keep_engines_up: true`): Ray Data feeding an engine that
   the run keeps up (`sphuatuo.engines.serving`, on this device's default host);
4. the `hf` back-end: transformers `generate` in a Ray Data actor pool;
5. three passes with one model (generate, a one-token judge, generate again) as a stage runs them: with
   engines of each pass's own, and with one engine that stays up (`sphuatuo.engines.serving`).

Each of 1-4 gives a whole-pass line (engine start included: for bare vLLM, from its process's launch, vLLM's
import included, as a Ray line's engine actor imports it) and a steady-state line (less the start-up), and
each line's ratio is against the bare line of the same kind; the three-pass lines are against engines per
pass. Two workloads: `fixed` (greedy, every reply up to `--max-tokens`) and `long-tail` (sampled, natural
stops, budget 4x: replies of mixed lengths, so the last rows of a pass run nearly alone).

Bare vLLM runs once more after the last round, so every Ray line sits between two bare passes and is set against
their mean: on a virtual machine the same bare pass ran 35% slower ten minutes later, while the Ray lines between
ran steadier, and a ratio against the one bare pass before a line measured the drift as much as the line.
`--rounds N` runs the whole sequence N times, so bare and Ray lines alternate, and the median of N per-round ratios,
with their range, is what to read.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sphuatuo.commands.bench_process import run_in_own_process
from sphuatuo.data.loaders import SAMPLE_BANK, load_questions, resolve_source_path
from sphuatuo.engines import Request, cpu_engine_environment
from sphuatuo.engines.precision import cpu_dtype
from sphuatuo.local_models import resolve_model
from sphuatuo.prompts import Messages, get_prompt, options_block
from sphuatuo.recipe import EngineConfig, SamplingConfig

if TYPE_CHECKING:
    from sphuatuo.engines.serving import EngineServices

WORKLOADS = ("fixed", "long-tail")


@dataclasses.dataclass(frozen=True)
class BenchLine:
    engine: str
    kind: str  # "whole" | "steady" | "passes": the bare (or per-pass) line of the same kind is its baseline
    workload: str
    rows: int
    seconds: float
    output_tokens: int
    round: int = 1  # `--rounds`: each round's lines are set against that round's baselines
    closing: bool = False  # the bare pass after the last round (its round is one past the last)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def name(self) -> str:
        """The engine label less its measured part (the seconds of start-up in parentheses at its end)."""
        return re.sub(r" \([^)]*\)$", "", self.engine)


def bench_prompts(count: int) -> list[Messages]:
    bank = load_questions(resolve_source_path(SAMPLE_BANK)).questions
    prompt = get_prompt("self_play/student_answer")
    return [prompt.messages(question=q.question, options_block=options_block(q))
            for q in itertools.islice(itertools.cycle(bank), count)]


def workload_sampling(workload: str, max_tokens: int) -> SamplingConfig:
    if workload == "fixed":
        return SamplingConfig(temperature=0.0, max_tokens=max_tokens)
    return SamplingConfig(temperature=0.7, top_p=0.9, max_tokens=4 * max_tokens, seed=0)


def bare_vllm_pass(engine: EngineConfig, prompts: list[Messages], sampling: SamplingConfig,
                   launched_at: float) -> dict[str, float]:
    """`LLM.chat` over `prompts` in this process: the seconds to the engine ready and to the last reply, counted
    from `launched_at` (when this process was launched, by the wall clock), and the output tokens. So the bare
    engine's start includes the process and vLLM's import, as a Ray line's includes its engine actor's."""
    started = time.perf_counter() - (time.time() - launched_at)
    from vllm import LLM, SamplingParams

    from sphuatuo.engines.vllm import engine_arguments

    llm = LLM(model=engine.model, **engine_arguments(engine, sampling.seed))
    ready = time.perf_counter()
    params = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens)
    outputs = llm.chat(prompts, params, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
    finished = time.perf_counter()
    return {"start_seconds": ready - started, "seconds": finished - started,
            "tokens": sum(len(o.outputs[0].token_ids) for o in outputs)}


def _bare_vllm(engine: EngineConfig, prompts: list[Messages], sampling: SamplingConfig, workload: str,
               label: str = "bare vLLM") -> list[BenchLine]:
    """`bare_vllm_pass` in a process of its own (`python -m sphuatuo.commands.bench_generate SPEC RECORD`), on CPU
    with the environment the Ray lines' engine actors get: the same threads, the same allocator."""
    spec = {"engine": engine.model_dump(mode="json"), "prompts": prompts, "sampling": sampling.model_dump(mode="json"),
            "launched_at": time.time()}
    environment = {} if engine.gpus_per_replica else cpu_engine_environment(engine)
    record, _ = run_in_own_process("sphuatuo.commands.bench_generate", spec, environment)
    return [BenchLine(f"{label} (own process, incl. import + engine start)", "whole", workload, len(prompts),
                      record["seconds"], record["tokens"]),
            BenchLine(f"{label} (own process, engine ready)", "steady", workload, len(prompts),
                      record["seconds"] - record["start_seconds"], record["tokens"])]


def _ray_pass(engine: EngineConfig, prompts: list[Messages], sampling: SamplingConfig,
              services: EngineServices | None = None) -> tuple[int, float, int]:
    """One Ray Data pass, streamed as the stages run it: rows, seconds, output tokens."""
    import pyarrow.compute as pc
    import ray.data

    from sphuatuo import engines

    started = time.perf_counter()
    ds = engines.generate(ray.data.from_items([{"key": i, "messages": m} for i, m in enumerate(prompts)]),
                          engine, Request.from_config(sampling), services=services, folder="bench")
    rows, tokens = 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows += batch.num_rows
        tokens += pc.sum(batch["num_generated_tokens"]).as_py() or 0
    return rows, time.perf_counter() - started, tokens


def _ray_stage(engine: EngineConfig, prompts: list[Messages], sampling: SamplingConfig,
               workload: str) -> list[BenchLine]:
    """The whole pass, and the pass less its start-up (actor, engine load, first token), which a one-row pass
    measures: the steady state a long pass converges to."""
    _, startup, _ = _ray_pass(engine, prompts[:1], SamplingConfig(temperature=0.0, max_tokens=1))
    rows, seconds, tokens = _ray_pass(engine, prompts, sampling)
    return [BenchLine(f"{engine.backend}, engine per pass (incl. actor + engine start)", "whole", workload, rows,
                      seconds, tokens),
            BenchLine(f"{engine.backend}, engine per pass (less {startup:.0f} s start-up)", "steady", workload, rows,
                      max(seconds - startup, 1e-3), tokens)]


def _kept_engine(engine: EngineConfig, prompts: list[Messages], sampling: SamplingConfig,
                 workload: str) -> list[BenchLine]:
    """A pass through an engine the run keeps up: its start (a one-row pass that brings the engine up), and the
    pass on the engine once up, which is the steady state; the whole pass is the two together."""
    from sphuatuo.engines.serving import EngineServices

    services = EngineServices()
    try:
        _, startup, _ = _ray_pass(engine, prompts[:1], SamplingConfig(temperature=0.0, max_tokens=1), services)
        rows, seconds, tokens = _ray_pass(engine, prompts, sampling, services)
    finally:
        services.close()
    label = f"{engine.backend}, engine kept up"
    return [BenchLine(f"{label} (incl. {startup:.0f} s engine start)", "whole", workload, rows, startup + seconds,
                      tokens),
            BenchLine(f"{label} (engine already up)", "steady", workload, rows, seconds, tokens)]


def _three_passes(engine: EngineConfig, prompts: list[Messages], sampling: SamplingConfig,
                  workload: str) -> list[BenchLine]:
    """A stage's shape: generate, judge (one token each), generate again, with one model; first with engines
    of each pass's own, then with one engine that stays up for all three."""
    from sphuatuo.engines.serving import EngineServices

    judge = SamplingConfig(temperature=0.0, max_tokens=1)
    lines = []
    for label, services in (("engines per pass", None), ("one engine kept up", EngineServices())):
        passes = [_ray_pass(engine, prompts, step, services) for step in (sampling, judge, sampling)]
        if services is not None:
            services.close()
        lines.append(passes_line(label, workload, passes))
    return lines


def passes_line(label: str, workload: str, passes: list[tuple[int, float, int]]) -> BenchLine:
    """The three-pass line: the passes' rows, seconds and output tokens (as `_ray_pass` gives them) added up."""
    rows, seconds, tokens = (sum(column) for column in zip(*passes, strict=True))
    return BenchLine(f"3 passes (generate, judge, generate), {label}", "passes", workload, rows, seconds, tokens)


def bench_engine(model: str, dtype: str, batch_size: int, cpus: float, cpu_threads: int | None,
                 device: str) -> EngineConfig:
    """The one engine configuration every line runs: on CPU, `auto` resolved to this CPU's dtype and every
    engine given the same compute threads (default: every core); on a GPU, one GPU per replica."""
    on_gpu = device == "gpu"
    if not on_gpu and dtype == "auto":
        dtype = cpu_dtype().dtype
    return EngineConfig(model=resolve_model(model), dtype=dtype, max_model_len=2048, batch_size=batch_size,
                        cpus_per_replica=cpus, gpus_per_replica=1 if on_gpu else 0,
                        cpu_threads=None if on_gpu else cpu_threads or os.cpu_count() or 1)


def bench_header(engine: EngineConfig) -> str:
    from sphuatuo.engines.vllm import engine_arguments

    args = engine_arguments(engine, None)
    threads = f", compute threads {engine.cpu_threads}" if engine.cpu_threads else ""
    return (f"every engine: dtype {args['dtype']}, max_num_seqs {args['max_num_seqs']}, max_num_batched_tokens "
            f"{args['max_num_batched_tokens']}, enforce_eager {args['enforce_eager']}, prefix caching "
            f"{args['enable_prefix_caching']}{threads}")


def bench_generate(engine: EngineConfig, prompts: int, max_tokens: int, *, with_hf: bool = True,
                   multi_pass: bool = True, workloads: tuple[str, ...] = WORKLOADS, rounds: int = 1) -> list[BenchLine]:
    """Per workload and round: bare vLLM first (the baseline), then the Ray Data back-ends and the three-pass
    lines."""
    from sphuatuo.store.runtime import apply_cpu_environment, connect_ray

    apply_cpu_environment()
    messages = bench_prompts(prompts)
    lines: list[BenchLine] = []
    for workload in workloads:
        sampling = workload_sampling(workload, max_tokens)
        for number in range(1, rounds + 1):
            measured = _bare_vllm(engine, messages, sampling, workload)
            connect_ray()
            measured += _ray_stage(engine, messages, sampling, workload)
            measured += _kept_engine(engine, messages, sampling, workload)
            if with_hf:
                measured += _ray_stage(engine.model_copy(update={"backend": "hf"}), messages, sampling, workload)
            if multi_pass:
                measured += _three_passes(engine, messages, sampling, workload)
            lines += [dataclasses.replace(line, round=number) for line in measured]
        # The bare pass after the last round: the last round's lines too have a bare pass on either side.
        lines += [dataclasses.replace(line, round=rounds + 1, closing=True)
                  for line in _bare_vllm(engine, messages, sampling, workload, label="bare vLLM again")]
    return lines


# The kinds whose baseline is a bare pass, which also runs after the last round: a line of these kinds is set
# against the bare passes before and after it.
BRACKETED_KINDS = ("whole", "steady")


def format_bench(lines: list[BenchLine], header: str = "") -> str:
    """The table, a line per measurement; with several rounds, a round column, and after the table each line's
    median ratio over the rounds with its range. The bare pass after the last round is a round of its own."""
    firsts: dict[tuple[str, str, int], float] = {}
    for line in lines:
        firsts.setdefault((line.workload, line.kind, line.round), line.tokens_per_s)

    def baseline(line: BenchLine) -> float:
        before = firsts[(line.workload, line.kind, line.round)]
        after = firsts.get((line.workload, line.kind, line.round + 1)) if line.kind in BRACKETED_KINDS else None
        return before if after is None else (before + after) / 2

    rounds = max((line.round for line in lines if not line.closing), default=1)
    round_column = f" {'round':>5}" if rounds > 1 else ""
    out = [header] if header else []
    out.append(f"{'engine':<58} {'workload':>9}{round_column} {'rows':>5} {'seconds':>8} {'rows/s':>7} "
               f"{'out tok/s':>9} {'vs base':>8}")
    ratios: dict[tuple[str, str, str], list[float]] = {}
    for line in lines:
        number = f" {'-' if line.closing else line.round:>5}" if rounds > 1 else ""
        measured = (f"{line.engine:<58} {line.workload:>9}{number} {line.rows:>5} {line.seconds:>8.1f} "
                    f"{line.rows / line.seconds:>7.2f} {line.tokens_per_s:>9.1f}")
        if line.closing:  # a baseline only: the lines before it are set against it
            out.append(f"{measured} {'-':>8}")
            continue
        ratio = line.tokens_per_s / baseline(line)
        ratios.setdefault((line.name, line.kind, line.workload), []).append(ratio)
        out.append(f"{measured} {ratio:>8.2f}")
    out.append("vs base: against the first line of the same kind and workload in the same round (whole pass: bare "
               "vLLM incl. engine start; steady state: bare vLLM with its engine ready; three passes: engines per "
               "pass); whole pass and steady state: against the mean of that bare line and the next one (the next "
               "round's, or the one after the last round), so a bare line's own ratio is the drift between the two")
    if rounds > 1:
        out.append(f"median vs base over {rounds} rounds (lowest - highest):")
        for (name, kind, workload), values in ratios.items():
            out.append(f"  {name}, {kind}, {workload}: {statistics.median(values):.2f} "
                       f"({min(values):.2f} - {max(values):.2f})")
    return "\n".join(out)


def main(spec_path: str, record_path: str) -> None:
    """The bare line's process: the spec's engine, prompts and sampling through `bare_vllm_pass`, its record
    written as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    record = bare_vllm_pass(EngineConfig.model_validate(spec["engine"]), spec["prompts"],
                            SamplingConfig.model_validate(spec["sampling"]), spec["launched_at"])
    Path(record_path).write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
