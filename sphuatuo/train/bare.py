"""The SFT stage's trainer without Ray, for `sphuatuo bench train`'s baselines and `sphuatuo bench gpu`.

`train_sft` builds TRL's SFTTrainer from the stage's own Trainer arguments (`training_arguments`, DeepSpeed
config included) with the stage's recording of throughput (`RecordedTrainerMixin`), as `sft_worker` does
under Ray Train. The bench runs it as `python -m sphuatuo.train.bare SPEC RECORD` without DeepSpeed (the bare
TRL line) and, as one rank each, under `torchrun --nproc-per-node W -m sphuatuo.train.bare SPEC RECORD` with the
stage's DeepSpeed over gloo (the line that isolates what Ray Train costs); `bench gpu` runs the same on a GPU,
where it needs neither Ray nor vLLM. SPEC and RECORD are JSON files: the bench writes the first, rank 0 the
second.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from sphuatuo.recipe import SftStage
from sphuatuo.train.launcher import init_cpu_distributed, model_loading_arguments, parameter_counts, training_arguments


def train_sft(model: str, stage: SftStage, examples: list[dict[str, Any]], *, threads: int,
              use_deepspeed: bool, on_gpu: bool = False) -> dict[str, Any]:
    """Fine-tune `model` on `examples` with `threads` compute threads, on the CPU or on this process's GPU;
    return rank 0's record: steps, tokens (the tokenized training set, packed rows when the stage packs, times
    the epochs), the Trainer's train_runtime and its step log (with `mfu` on a GPU of known peak)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from sphuatuo.train.recording import PackedIdsMixin, RecordedTrainerMixin, gpu_peak_flops
    from sphuatuo.train.sft import sft_config

    torch.set_num_threads(threads)
    output_dir = tempfile.mkdtemp(prefix="sphuatuo-bench-")
    arguments = {**training_arguments(stage, output_dir, on_gpu=on_gpu), "save_strategy": "no", "report_to": "none"}
    if not use_deepspeed:
        arguments["deepspeed"] = None
    args = sft_config(arguments, stage)
    # After the config, as in the Ray workers: under ZeRO-3 it makes transformers build the model partitioned.
    model_object = AutoModelForCausalLM.from_pretrained(model, **model_loading_arguments(stage))
    trainer_class = type("RecordedSFTTrainer", (RecordedTrainerMixin, PackedIdsMixin, SFTTrainer), {})
    trainer = trainer_class(model=model_object, args=args, train_dataset=Dataset.from_list(examples),
                            processing_class=AutoTokenizer.from_pretrained(model),
                            model_parameters=parameter_counts(model_object)[1],
                            peak_flops=gpu_peak_flops(stage.scaling.peak_tflops_per_gpu) if on_gpu else None)
    output = trainer.train()
    shutil.rmtree(output_dir, ignore_errors=True)
    return {"steps": output.global_step,
            "tokens": sum(len(ids) for ids in trainer.train_dataset["input_ids"]) * int(stage.epochs),
            "train_seconds": output.metrics["train_runtime"], "log": trainer.state.log_history}


def main(spec_path: str, record_path: str) -> None:
    """One process, or one torchrun rank: the spec's stage, with its DeepSpeed config unless the spec says
    `"deepspeed": false`; rank 0 writes the record."""
    spec = json.loads(Path(spec_path).read_text())
    stage = SftStage.model_validate(spec["stage"])
    if spec["deepspeed"]:
        init_cpu_distributed(stage)
    record = train_sft(spec["model"], stage, spec["examples"], threads=spec["threads"], use_deepspeed=spec["deepspeed"],
                       on_gpu=spec["on_gpu"])
    if int(os.environ.get("RANK", "0")) == 0:
        Path(record_path).write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
