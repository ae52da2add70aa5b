"""`sphuatuo bench train`: what the Ray Train + DeepSpeed SFT stage costs against bare TRL.

Same model, same examples (the student prompt over the sample bank, its explanation as the chain of
thought), same Trainer arguments, in one run:
1. bare TRL: one `SFTTrainer` in this process, no DeepSpeed, as many compute threads as one worker;
2. the SFT stage's own launch: `fit` with `sft_worker` on N Ray Train workers under ZeRO.
Both count the same tokens (the tokenized training set times the epochs) over the Trainer's own
train_runtime, so the ratio is per-worker throughput; start-up (workers, DeepSpeed) is shown apart.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from sphuatuo.data.loaders import SAMPLE_BANK, load_questions, resolve_source_path
from sphuatuo.local_models import resolve_model
from sphuatuo.parsing.replies import format_cot
from sphuatuo.prompts import get_prompt, options_block
from sphuatuo.recipe import SftStage


@dataclass(frozen=True)
class TrainBenchLine:
    trainer: str
    workers: int
    steps: int
    tokens: int
    train_seconds: float
    wall_seconds: float

    @property
    def tokens_per_s_per_worker(self) -> float:
        return self.tokens / self.workers / self.train_seconds


def bench_examples(count: int) -> list[dict[str, Any]]:
    bank = load_questions(resolve_source_path(SAMPLE_BANK)).questions
    prompt = get_prompt("self_play/student_answer")
    return [{"id": f"{q.id}#{i}",
             "prompt": prompt.training_prompt(question=q.question, options_block=options_block(q)),
             "completion": [{"role": "assistant",
                             "content": format_cot(q.explanation, f"{', '.join(q.answer)}. {q.answer_text}")}]}
            for i, q in enumerate(itertools.islice(itertools.cycle(bank), count))]


def _bare_trl(model: str, stage: SftStage, examples: list[dict[str, Any]], threads: int) -> TrainBenchLine:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sphuatuo.train.launcher import training_arguments

    torch.set_num_threads(threads)
    started = time.perf_counter()
    arguments = {**training_arguments(stage, tempfile.mkdtemp(prefix="sphuatuo-bench-"), on_gpu=False),
                 "deepspeed": None, "save_strategy": "no", "report_to": "none"}
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model, dtype="float32"),
                         args=SFTConfig(**arguments, completion_only_loss=True),
                         train_dataset=Dataset.from_list(examples),
                         processing_class=AutoTokenizer.from_pretrained(model))
    output = trainer.train()
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * int(stage.epochs)
    return TrainBenchLine("bare TRL SFTTrainer (1 process)", 1, output.global_step, tokens,
                          output.metrics["train_runtime"], time.perf_counter() - started)


def _ray_train(model: str, stage: SftStage, examples: list[dict[str, Any]], tokens: int) -> TrainBenchLine:
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
    return TrainBenchLine(f"Ray Train + DeepSpeed ZeRO-{stage.scaling.zero_stage} (SFT stage)",
                          stage.scaling.num_workers, steps, tokens, runtime, wall)


def bench_train(model: str, examples: int, epochs: int, workers: int, zero_stage: int, max_length: int,
                cpus_per_worker: float) -> list[TrainBenchLine]:
    from sphuatuo.store.runtime import apply_cpu_environment, connect_ray

    apply_cpu_environment()
    path = resolve_model(model)
    rows = bench_examples(examples)
    stage = SftStage(finetuning="full", epochs=epochs, micro_batch_size=1, grad_accumulation=1,
                     max_length=max_length, precision="fp32", learning_rate=1e-4,
                     scaling={"num_workers": workers, "zero_stage": zero_stage, "cpus_per_worker": cpus_per_worker})
    bare = _bare_trl(path, stage, rows, threads=max(1, int(cpus_per_worker)))
    connect_ray()
    return [bare, _ray_train(path, stage, rows, bare.tokens)]


def format_train_bench(lines: list[TrainBenchLine]) -> str:
    base = lines[0].tokens_per_s_per_worker
    out = [f"{'trainer':<44} {'workers':>7} {'steps':>5} {'tokens':>7} {'train s':>7} {'wall s':>7} "
           f"{'tok/s/worker':>12} {'vs bare':>7}"]
    for line in lines:
        out.append(f"{line.trainer:<44} {line.workers:>7} {line.steps:>5} {line.tokens:>7} {line.train_seconds:>7.1f} "
                   f"{line.wall_seconds:>7.1f} {line.tokens_per_s_per_worker:>12.1f} "
                   f"{line.tokens_per_s_per_worker / base:>7.2f}")
    return "\n".join(out)
