"""What each optimizer step consumed and how fast: the sample order and the throughput of a training run.

`RecordedTrainer(SFTTrainer)` (or DPOTrainer) tags every micro batch with the ids of its examples as
the data collator builds it, and every logged step with tokens/s per worker and, on GPUs, the model
FLOPs utilisation. The sample order lives in each checkpoint next to the Trainer's own state, so a
run resumed after a lost worker continues the same record, and a test can compare it with an
uninterrupted run's.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

SAMPLE_ORDER_FILE = "sample_order.json"
PACKED_IDS = "ids"

# Dense bf16 tensor-core peaks (FLOP/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("A6000", 155e12),
    ("L4", 121e12),
    ("A10", 125e12),
)


def gpu_peak_flops(override_tflops: float | None) -> float | None:
    """The per-GPU peak for MFU: the recipe's override, else the table; None off GPU or for an unknown GPU."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def model_flops_utilisation(parameters: int, tokens_per_s: float, peak_flops: float) -> float:
    """MFU from the 6·N·tokens estimate of a forward and backward pass (attention's own FLOPs not counted)."""
    return 6 * parameters * tokens_per_s / peak_flops


def _gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class _IdCollator:
    """Wraps the trainer's collator: queues the ids of each batch it builds, in order."""

    def __init__(self, collator: Any, queue: deque[list[str]]):
        self.collator = collator
        self.queue = queue

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        self.queue.append([example for feature in features for example in _example_ids(feature)])
        return self.collator(features)


def _example_ids(feature: dict[str, Any]) -> list[str]:
    """The examples a row holds: those of a packed row (PackedIdsMixin), else its own `id` if it has one."""
    if PACKED_IDS in feature:
        return [str(example) for example in feature[PACKED_IDS]]
    return [str(feature["id"])] if "id" in feature else []


class PackedIdsMixin:
    """Put before TRL's SFTTrainer. Its packing keeps only `input_ids` and `labels` and concatenates examples into
    rows, so the `id` column would be lost: here every token is tagged with its example's index, TRL's
    `pack_dataset` moves the tags with the tokens, and each packed row gets the `ids` of the examples it holds.
    It overrides TRL's private `_prepare_dataset` (TRL 1.16's signature); tests/test_packing.py catches a change."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, packing: bool, formatting_func: Any,
                         dataset_name: str) -> Any:
        # TRL's preparation without its packing step (tokenized, labelled, cut to max_length; `id` kept) ...
        prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        if not packing:
            return prepared
        from trl.data_utils import pack_dataset

        # ... then TRL's packing step (with `shuffle_dataset`, the call above shuffled the examples before it).
        ids = prepared["id"]
        tagged = prepared.map(lambda row, index: {"example": [index] * len(row["input_ids"])}, with_indices=True)
        packed = pack_dataset(tagged.select_columns(["input_ids", "labels", "example"]), args.max_length,
                              args.packing_strategy)
        # An example's tokens are one run of its tag (`bfd_split` may put its pieces in several rows).
        packed = packed.map(lambda row: {PACKED_IDS: [ids[index] for index, _ in itertools.groupby(row["example"])]},
                            remove_columns=["example"])
        return packed.shuffle(seed=args.seed) if args.shuffle_dataset else packed


class RecordedTrainerMixin:
    """Put before a TRL trainer class. The dataset needs an `id` column; `remove_unused_columns` must be
    False so the collator sees it (TRL's collators read only their own keys)."""

    def __init__(self, *args: Any, model_parameters: int, peak_flops: float | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._batches: deque[list[str]] = deque()
        self._step_ids: list[str] = []
        self._step_tokens = 0
        self._window_tokens = 0
        self._window_start = time.perf_counter()
        self._model_parameters = model_parameters
        self._peak_flops = peak_flops
        self.sample_order: list[dict[str, Any]] = []
        # Accelerate fetches one batch ahead, so ids are queued when collated and claimed when trained.
        self.data_collator = _IdCollator(self.data_collator, self._batches)
        self.add_callback(_SampleOrderCallback(self))

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        self._step_ids.extend(self._batches.popleft())
        mask = inputs.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        self._step_tokens += tokens
        self._window_tokens += tokens
        return super().training_step(model, inputs, *args, **kwargs)

    def _end_step(self, step: int) -> None:
        """Called on every rank at each optimizer step: rank 0 keeps the step's ids from all ranks."""
        ranks = _gather({"ids": self._step_ids, "tokens": self._step_tokens, "pid": os.getpid()})
        self.sample_order.append({"step": step, "ids": [r["ids"] for r in ranks],
                                  "tokens": [r["tokens"] for r in ranks], "worker_pids": [r["pid"] for r in ranks]})
        self._step_ids, self._step_tokens = [], 0

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            seconds = time.perf_counter() - self._window_start
            tokens = _gather(self._window_tokens)
            per_worker = sum(tokens) / len(tokens) / seconds
            logs["tokens_per_second_per_worker"] = round(per_worker, 2)
            if self._peak_flops:
                logs["mfu"] = round(model_flops_utilisation(self._model_parameters, per_worker, self._peak_flops), 4)
            self._window_tokens, self._window_start = 0, time.perf_counter()
        super().log(logs, *args, **kwargs)

    def load_sample_order(self, checkpoint_dir: str | None) -> None:
        """On resume: the record up to the checkpoint the run restarts from."""
        if checkpoint_dir and Path(checkpoint_dir, SAMPLE_ORDER_FILE).exists():
            self.sample_order = json.loads(Path(checkpoint_dir, SAMPLE_ORDER_FILE).read_text())


class _SampleOrderCallback(TrainerCallback):
    def __init__(self, trainer: RecordedTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._window_start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._end_step(state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Registered in the trainer's __init__, so before RayTrainReportCallback (added after it):
        # the file is in the checkpoint that Ray uploads.
        if state.is_world_process_zero:
            folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
            (folder / SAMPLE_ORDER_FILE).write_text(json.dumps(self.trainer.sample_order))


class TrackerParams(TrainerCallback):
    """Adds the pipeline run's identity (recipe, kind, stage, fingerprint, group) to the stage's W&B run config on
    rank 0, once transformers' WandbCallback (registered before this one) has started that run. The stage's
    MLflow run gets the same as tags from its environment (MLFLOW_TAGS)."""

    def __init__(self, params: dict[str, str]):
        self.params = params

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and "wandb" in args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.run.config.update({"sphuatuo": self.params}, allow_val_change=True)
