"""`sphuatuo bench train`: what the Ray Train + DeepSpeed SFT stage costs against bare TRL.

Same model, same examples (the student prompt over the sample bank, its explanation as the chain of
thought), same Trainer arguments and the same global batch and steps on every line, in one run:
1. bare TRL: one `SFTTrainer` in a process of its own, no DeepSpeed, as many compute threads as one worker, the W
   workers' micro batches accumulated;
2. the SFT stage's own launch with 1 Ray Train worker and no DeepSpeed (ZeRO stage 0): against bare, what Ray
   costs alone;
3. the same trainer and the stage's DeepSpeed config under `torchrun` with 1 process, no Ray
   (`sphuatuo.train.bare`): against bare, what DeepSpeed (over gloo, with one rank) costs;
4. the SFT stage's launch with 1 Ray Train worker under DeepSpeed: against line 3, what Ray costs beside DeepSpeed;
   against bare, what Ray and DeepSpeed cost together;
5. torchrun with W processes: against line 3, what distribution costs without Ray (on one machine, W workers
   also share its cores);
6. the SFT stage's launch with W Ray Train workers: against line 5, what Ray costs at W workers.
With `--zero-stage 0` no line runs DeepSpeed, and line 2 is line 4. Every line counts the same tokens (the
tokenized training set times the epochs) over the Trainer's own train_runtime, and gives the steady state apart:
the median of the per-step rates after the warm-up steps, recorded the same way on every line
(`RecordedTrainerMixin`). Start-up (workers, DeepSpeed; for the bare and torchrun lines their processes and
imports too) is in wall s. Every line runs with a training worker's environment, on CPU with jemalloc preloaded;
`LD_PRELOAD= sphuatuo bench train` measures glibc's malloc instead.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from sphuatuo.commands.bench_process import run_in_own_process
from sphuatuo.data.loaders import SAMPLE_BANK, load_questions, resolve_source_path
from sphuatuo.local_models import resolve_model
from sphuatuo.parsing.replies import format_cot
from sphuatuo.prompts import get_prompt, options_block
from sphuatuo.recipe import SftStage
from sphuatuo.store.runtime import training_environment


@dataclass(frozen=True)
class TrainBenchLine:
    launcher: str  # bare, ray or torchrun
    trainer: str
    workers: int
    deepspeed: bool
    steps: int
    global_batch: int
    tokens: int
    train_seconds: float
    wall_seconds: float
    steady_tokens_per_s_per_worker: float

    @property
    def tokens_per_s_per_worker(self) -> float:
        return self.tokens / self.workers / self.train_seconds


def steady_rate(log: list[dict[str, Any]], warmup_steps: int) -> float:
    """Median tokens/s per worker over the logged steps after the first `warmup_steps` (compilation, first
    allocations and DeepSpeed's first step are not the steady state)."""
    rates = sorted(entry["tokens_per_second_per_worker"] for entry in log
                   if "tokens_per_second_per_worker" in entry and entry.get("step", 0) > warmup_steps)
    if not rates:
        raise ValueError(f"no logged step after the {warmup_steps} warm-up steps: train on more examples")
    return rates[len(rates) // 2]


def bench_examples(count: int) -> list[dict[str, Any]]:
    bank = load_questions(resolve_source_path(SAMPLE_BANK)).questions
    prompt = get_prompt("self_play/student_answer")
    return [{"id": f"{q.id}#{i}",
             "prompt": prompt.training_prompt(question=q.question, options_block=options_block(q)),
             "completion": [{"role": "assistant",
                             "content": format_cot(q.explanation, f"{', '.join(q.answer)}. {q.answer_text}")}]}
            for i, q in enumerate(itertools.islice(itertools.cycle(bank), count))]


def _global_batch(stage: SftStage) -> int:
    return stage.micro_batch_size * stage.grad_accumulation * stage.scaling.num_workers


def _trainer_label(launcher: str, stage: SftStage) -> str:
    workers = stage.scaling.num_workers
    if stage.scaling.zero_stage:
        strategy = f" + DeepSpeed ZeRO-{stage.scaling.zero_stage}"
    else:
        strategy = " + DDP" if workers > 1 else ", no DeepSpeed"
    return f"{launcher}{strategy}, {workers} worker" + ("s" if workers > 1 else "")


def _bare_trl(model: str, stage: SftStage, examples: list[dict[str, Any]], threads: int,
              warmup_steps: int) -> TrainBenchLine:
    """One process, no Ray, no DeepSpeed: TRL's SFTTrainer with the stage's own recording of throughput, in a
    process of its own with a training worker's environment, as every other line."""
    record, wall = _run_bare_trainer([], model, stage, examples, threads, deepspeed=False, on_gpu=False)
    return TrainBenchLine("bare", "bare TRL SFTTrainer (1 process, no DeepSpeed)", 1, False, record["steps"],
                          _global_batch(stage), record["tokens"], record["train_seconds"], wall,
                          steady_rate(record["log"], warmup_steps))


def torchrun_line(model: str, stage: SftStage, examples: list[dict[str, Any]], threads: int,
                  warmup_steps: int, on_gpu: bool = False) -> TrainBenchLine:
    """`stage.scaling.num_workers` processes under torchrun, no Ray: the stage's trainer and DeepSpeed config
    (`sphuatuo.train.bare`) over gloo, or over NCCL with one GPU each, each process with one worker's compute
    threads."""
    workers = stage.scaling.num_workers
    record, wall = _run_bare_trainer(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(workers)],
                                     model, stage, examples, threads, deepspeed=True, on_gpu=on_gpu)
    return TrainBenchLine("torchrun", _trainer_label("torchrun", stage), workers, stage.scaling.zero_stage > 0,
                          record["steps"], _global_batch(stage),
                          record["tokens"], record["train_seconds"], wall, steady_rate(record["log"], warmup_steps))


def _run_bare_trainer(launcher: list[str], model: str, stage: SftStage, examples: list[dict[str, Any]], threads: int,
                      *, deepspeed: bool, on_gpu: bool) -> tuple[dict[str, Any], float]:
    """`python [LAUNCHER] -m sphuatuo.train.bare SPEC RECORD` with a training worker's environment (on CPU
    DS_ACCELERATOR=cpu, jemalloc, ...) and `threads` compute threads, which torchrun would otherwise
    set to 1 per process: rank 0's record and the wall seconds, processes and imports included."""
    spec = {"model": model, "stage": stage.model_dump(mode="json"), "examples": examples, "threads": threads,
            "on_gpu": on_gpu, "deepspeed": deepspeed}
    environment = {**training_environment(on_gpu=on_gpu), "OMP_NUM_THREADS": str(threads)}
    return run_in_own_process("sphuatuo.train.bare", spec, environment, launcher)


def _ray_train(model: str, stage: SftStage, examples: list[dict[str, Any]], tokens: int,
               warmup_steps: int) -> TrainBenchLine:
    """The SFT stage's own launch: `fit` with `sft_worker` on the stage's Ray Train workers under ZeRO."""
    from sphuatuo.store.run_root import RunRoot
    from sphuatuo.train.launcher import fit
    from sphuatuo.train.sft import sft_worker

    run = RunRoot(tempfile.mkdtemp(prefix="sphuatuo-bench-run-"))
    run.write_rows(examples, "bench", "data")
    started = time.perf_counter()
    fit(run, "bench", stage, sft_worker, {"model": model, "data": "bench/data", "trust_remote_code": False})
    wall = time.perf_counter() - started
    log = json.loads(run.read_text("bench", "train_log.json"))
    steps = max(entry["step"] for entry in log)
    runtime = next(entry["train_runtime"] for entry in log if "train_runtime" in entry)
    workers = stage.scaling.num_workers
    return TrainBenchLine("ray", _trainer_label("Ray Train", stage), workers, stage.scaling.zero_stage > 0, steps,
                          _global_batch(stage), tokens, runtime, wall, steady_rate(log, warmup_steps))


def bench_train(model: str, examples: int, epochs: int, workers: int, zero_stage: int, max_length: int,
                cpus_per_worker: float, warmup_steps: int = 2) -> list[TrainBenchLine]:
    """Bare TRL and Ray Train with 1 worker without DeepSpeed, then torchrun and Ray Train with 1 worker, then with
    `workers` (when more than 1), all at the same global batch (the fewer processes accumulate more micro batches)
    and so the same steps over the same examples."""
    from sphuatuo.store.runtime import apply_cpu_environment, connect_ray

    apply_cpu_environment()
    path = resolve_model(model)
    rows = bench_examples(examples)

    def stage(num_workers: int, zero: int = zero_stage) -> SftStage:
        return SftStage(finetuning="full", epochs=epochs, micro_batch_size=1, grad_accumulation=workers // num_workers,
                        max_length=max_length, precision="fp32", learning_rate=1e-4,
                        scaling={"num_workers": num_workers, "zero_stage": zero, "cpus_per_worker": cpus_per_worker})

    threads = max(1, int(cpus_per_worker))
    counts = [1, workers] if workers > 1 else [1]
    lines = [_bare_trl(path, stage(1), rows, threads=threads, warmup_steps=warmup_steps)]
    torchrun = {count: torchrun_line(path, stage(count), rows, threads=threads, warmup_steps=warmup_steps)
                for count in counts}
    connect_ray()
    if zero_stage:
        lines.append(_ray_train(path, stage(1, zero=0), rows, lines[0].tokens, warmup_steps))
    for count in counts:
        lines += [torchrun[count], _ray_train(path, stage(count), rows, lines[0].tokens, warmup_steps)]
    return lines


def format_train_bench(lines: list[TrainBenchLine]) -> str:
    """Whole-run and steady-state tokens/s per worker, each against the bare line (the first), and the costs in
    steady state, each the ratio of two lines that differ in one thing: Ray alone (Ray Train with 1 worker and no
    DeepSpeed vs bare), DeepSpeed (torchrun with 1 worker vs bare), Ray beside DeepSpeed (Ray Train vs torchrun, at 1
    worker and at W) and distribution (W torchrun workers vs 1)."""
    bare = lines[0]
    out = [f"{'trainer':<46} {'workers':>7} {'batch':>5} {'steps':>5} {'tokens':>7} {'train s':>7} {'wall s':>7} "
           f"{'tok/s/worker':>12} {'steady':>7} {'vs bare':>7} {'steady vs bare':>14}"]
    for line in lines:
        out.append(f"{line.trainer:<46} {line.workers:>7} {line.global_batch:>5} {line.steps:>5} {line.tokens:>7} "
                   f"{line.train_seconds:>7.1f} {line.wall_seconds:>7.1f} {line.tokens_per_s_per_worker:>12.1f} "
                   f"{line.steady_tokens_per_s_per_worker:>7.1f} "
                   f"{line.tokens_per_s_per_worker / bare.tokens_per_s_per_worker:>7.2f} "
                   f"{line.steady_tokens_per_s_per_worker / bare.steady_tokens_per_s_per_worker:>14.2f}")
    steady = {(line.launcher, line.workers, line.deepspeed): line.steady_tokens_per_s_per_worker for line in lines[1:]}
    if ("ray", 1, False) in steady:
        out.append(f"Ray cost alone (Ray Train, 1 worker, no DeepSpeed, vs bare TRL, steady): "
                   f"{steady['ray', 1, False] / bare.steady_tokens_per_s_per_worker:.2f}")
    if ("ray", 1, True) in steady:
        out.append(f"Ray Train + DeepSpeed, 1 worker vs bare TRL (steady): "
                   f"{steady['ray', 1, True] / bare.steady_tokens_per_s_per_worker:.2f}")
    if ("torchrun", 1, True) in steady:
        out.append(f"DeepSpeed cost (torchrun 1 worker vs bare, steady): "
                   f"{steady['torchrun', 1, True] / bare.steady_tokens_per_s_per_worker:.2f}")
    for launcher, workers, deepspeed in sorted(steady):
        if launcher == "torchrun" and ("ray", workers, deepspeed) in steady:
            out.append(f"Ray cost at {workers} worker{'s' if workers > 1 else ''} (Ray Train vs torchrun, steady): "
                       f"{steady['ray', workers, deepspeed] / steady['torchrun', workers, deepspeed]:.2f}")
    torchrun = {workers: rate for (launcher, workers, _), rate in steady.items() if launcher == "torchrun"}
    many = max(torchrun, default=1)
    if many > 1 and 1 in torchrun:
        out.append(f"distribution without Ray ({many} torchrun workers vs 1, per worker, steady): "
                   f"{torchrun[many] / torchrun[1]:.2f}")
    return "\n".join(out)
