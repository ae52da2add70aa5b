"""Ray Train launch of a TRL trainer: one TorchTrainer per training stage.

Checkpoints go to `<run root>/checkpoints/<stage>-<fingerprint>` through Ray Train's own storage (the run root's
pyarrow filesystem: local disk, NFS, or an object store), so every node sees them and a re-run with
the same name resumes. The stage's product is one consolidated Hugging Face model directory at
`<run root>/<stage>/model`, next to `train_log.json` and `sample_order.jsonl`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from sphuatuo.recipe import TrainStage
from sphuatuo.store.credentials import shared_filesystem
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import training_environment
from sphuatuo.store.tracking import finish_worker_wandb
from sphuatuo.train.deepspeed import deepspeed_config
from sphuatuo.train.lengths import fit_to_length


def fit(
    run: RunRoot,
    stage_name: str,
    stage: TrainStage,
    worker_fn: Callable[[dict[str, Any]], None],
    worker_config: dict[str, Any],
    checkpoint_name: str | None = None,
    credentials: str = "node",
    env: dict[str, str] | None = None,
) -> None:
    """Run `worker_fn` on `stage.scaling.num_workers` Ray Train workers; raise if training fails.

    Checkpoints go to `<run root>/checkpoints/<checkpoint_name>` (default: the stage name); a stage names
    them by its fingerprint too, so a changed recipe never resumes another recipe's checkpoints. `env`: more
    variables for the workers (the trackers'), over the runtime environment's."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    scaling = stage.scaling
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    env = {**training_environment(on_gpu=scaling.use_gpu), **(env or {})}
    with shared_filesystem(run, credentials) as filesystem:  # with `driver`, renewed until training ends
        trainer = TorchTrainer(
            train_loop_per_worker=worker_fn,
            train_loop_config={**worker_config, "stage": stage.model_dump(mode="json"), "run_root": run.uri,
                               "filesystem": filesystem, "stage_name": stage_name},
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(
                name=checkpoint_name or stage_name,
                storage_path=run.fs_path("checkpoints"),
                storage_filesystem=filesystem,
                checkpoint_config=CheckpointConfig(num_to_keep=stage.keep_checkpoints),
                failure_config=FailureConfig(max_failures=stage.max_failures),
                worker_runtime_env={"env_vars": env},
            ),
        )
        trainer.fit()


def training_arguments(stage: TrainStage, output_dir: str, *, on_gpu: bool, trust_remote_code: bool = False,
                       run_name: str | None = None) -> dict[str, Any]:
    """Arguments shared by SFTConfig and DPOConfig (and the RL configs), straight from the recipe.
    `trust_remote_code` reaches what TRL loads itself: reference models, a colocated vLLM engine. `run_name`
    names the stage's tracker runs."""
    return {
        "output_dir": output_dir,
        "run_name": run_name,
        "learning_rate": stage.learning_rate,
        "num_train_epochs": stage.epochs,
        "max_steps": stage.max_steps,
        "lr_scheduler_type": stage.lr_scheduler,
        "warmup_steps": stage.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        "weight_decay": stage.weight_decay,
        "per_device_train_batch_size": stage.micro_batch_size,
        "gradient_accumulation_steps": stage.grad_accumulation,
        "max_length": stage.max_length,
        "bf16": stage.precision == "bf16",
        "gradient_checkpointing": stage.gradient_checkpointing,
        "seed": stage.seed,
        "data_seed": stage.seed,
        "logging_steps": 1,
        "logging_first_step": True,
        "save_strategy": "steps" if stage.checkpoint_every_steps else "no",
        "save_steps": stage.checkpoint_every_steps or 500,
        "save_total_limit": stage.keep_checkpoints,
        "report_to": list(stage.report_to) or "none",
        "use_liger_kernel": stage.use_liger_kernel,
        "disable_tqdm": True,
        "use_cpu": not on_gpu,
        "deepspeed": deepspeed_config(stage.scaling, on_gpu=on_gpu),
        "dataloader_num_workers": 0,
        # Under plain DDP (ZeRO stage 0) the Trainer would otherwise ask DDP to search the autograd graph for unused
        # parameters at every step (the default without gradient checkpointing); every parameter of a dense causal
        # LM, LoRA adapters included, takes part in each forward. LLaMA-Factory sets the same.
        "ddp_find_unused_parameters": False,
        # The collators read only their own keys; the `id` column must reach RecordedTrainerMixin's.
        "remove_unused_columns": False,
        "trust_remote_code": trust_remote_code,
    }


@dataclass
class WorkerSetup:
    """What every training worker builds before its TRL trainer: the same for SFT, DPO and RL.

    The model is loaded by `load_model`, after the trainer's config exists: with ZeRO-3 that config makes
    transformers build the model inside `deepspeed.zero.Init`, so each rank holds only its shard of the
    weights instead of the whole model in host memory."""

    config: dict[str, Any]
    stage: Any
    tokenizer: Any
    peft_config: Any
    arguments: dict[str, Any]

    def load_model(self) -> Any:
        import ray.train
        from transformers import AutoModelForCausalLM
        from transformers.integrations import is_deepspeed_zero3_enabled

        if self.stage.scaling.zero_stage == 3 and not is_deepspeed_zero3_enabled():
            raise RuntimeError("ZeRO-3 needs the trainer config built before the model is loaded")
        model = AutoModelForCausalLM.from_pretrained(self.config["model"], **model_loading_arguments(self.stage),
                                                     trust_remote_code=self.config["trust_remote_code"])
        local, total = parameter_counts(model)
        if ray.train.get_context().get_world_rank() == 0:
            world = ray.train.get_context().get_world_size()
            self.run.write_text(json.dumps({"model_parameters": total, "parameters_on_rank_0": local,
                                            "world_size": world, "zero_stage": self.stage.scaling.zero_stage}),
                                self.config["stage_name"], "model_init.json")
        return model

    @property
    def run(self) -> RunRoot:
        return RunRoot(self.config["run_root"], self.config["filesystem"])

    def dataset(self, columns: list[str], completions: tuple[str, ...] = ()) -> Any:
        """The stage's examples; with `completions`, those longer than `max_length` are dropped or cut from the
        left (the recipe's `overlong`), and the first worker writes what happened to `<stage>/lengths.json`."""
        import ray.train
        from datasets import Dataset

        rows = [{column: row[column] for column in ["id", *columns]} for row in self.run.read_rows(self.config["data"])]
        if completions:
            rows, report = fit_to_length(self.tokenizer, rows, completions, self.stage.max_length,
                                         self.stage.overlong)
            if ray.train.get_context().get_world_rank() == 0:
                self.run.write_text(json.dumps(report, indent=1), self.config["stage_name"], "lengths.json")
        return Dataset.from_list(rows)

    def trainer(self, trainer_class: type, **kwargs: Any) -> Any:
        """`trainer_class` (TRL's SFTTrainer or DPOTrainer) recording sample order and throughput, and
        reporting checkpoints to Ray Train."""
        from ray.train.huggingface.transformers import RayTrainReportCallback

        from sphuatuo.train.recording import RecordedTrainerMixin, gpu_peak_flops

        recorded = type(f"Recorded{trainer_class.__name__}", (RecordedTrainerMixin, trainer_class), {})
        model = self.load_model()
        trainer = recorded(model=model, processing_class=self.tokenizer, peft_config=self.peft_config,
                           model_parameters=parameter_counts(model)[1],
                           peak_flops=gpu_peak_flops(self.stage.scaling.peak_tflops_per_gpu), **kwargs)
        # After the mixin's own callback, so checkpoints carry the sample order when Ray uploads them.
        trainer.add_callback(RayTrainReportCallback())
        return trainer

    def train_and_export(self, trainer: Any) -> None:
        from ray.train.huggingface.transformers import prepare_trainer

        from sphuatuo.train.recording import TrackerParams

        if self.config.get("tracking_params"):
            trainer.add_callback(TrackerParams(self.config["tracking_params"]))
        trainer = prepare_trainer(trainer)
        checkpoint = resume_checkpoint()
        if hasattr(trainer, "load_sample_order"):  # built by `trainer()`; RL trainers sample their own data
            trainer.load_sample_order(checkpoint)
        trainer.train(resume_from_checkpoint=checkpoint)
        export_model(trainer, self.config["model"], self.run, self.config["stage_name"], self.stage.finetuning,
                     trust_remote_code=self.config["trust_remote_code"])


def prepare_worker(config: dict[str, Any], stage_type: type[TrainStage]) -> WorkerSetup:
    """Distributed init, model, tokenizer, LoRA config and Trainer arguments from the recipe stage."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    stage = stage_type.model_validate(config["stage"])
    config = {**config, "model": _local_model(config["model"], config["filesystem"])}
    on_gpu, trust_remote_code = stage.scaling.use_gpu, config["trust_remote_code"]
    init_cpu_distributed(stage)
    peft_config = None
    if stage.finetuning == "lora":
        lora = stage.lora
        peft_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=lora.target_modules, task_type="CAUSAL_LM")
    output_dir = tempfile.mkdtemp(prefix="sphuatuo-trainer-")
    if "wandb" in stage.report_to:
        os.environ["WANDB_DIR"] = output_dir  # copied into the run root after training (export_model)
    return WorkerSetup(
        config=config,
        stage=stage,
        tokenizer=AutoTokenizer.from_pretrained(config["model"], trust_remote_code=trust_remote_code),
        peft_config=peft_config,
        arguments=training_arguments(stage, output_dir, on_gpu=on_gpu, trust_remote_code=trust_remote_code,
                                     run_name=config["stage_name"]),
    )


def init_cpu_distributed(stage: TrainStage) -> None:
    """DeepSpeed over gloo for a CPU stage under ZeRO, in every worker (Ray Train's or torchrun's) before any
    Trainer config: ZeRO-3 on gloo otherwise miscounts the world size.

    DeepSpeed's CPU back-end would first JIT-compile its shared-memory all-reduce (`deepspeed_shm_comm`): 40-60 s
    on each new machine or environment, and again whenever a process finds another `ninja`. That op serves only
    DeepSpeed's inference all-reduce; training reduces through the process group. So it is marked incompatible
    and never built."""
    if stage.scaling.zero_stage and not stage.scaling.use_gpu:
        import deepspeed
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")


def model_loading_arguments(stage: TrainStage) -> dict[str, Any]:
    """`from_pretrained` arguments from the stage: its precision and, where it names one, its attention kernel."""
    attention = {"attn_implementation": stage.attn_implementation} if stage.attn_implementation else {}
    return {"dtype": "bfloat16" if stage.precision == "bf16" else "float32", **attention}


def parameter_counts(model: Any) -> tuple[int, int]:
    """(parameters held by this rank, parameters of the model): equal without ZeRO-3, whose partitioned
    parameters keep their full size in `ds_numel` and this rank's shard in `ds_tensor`."""
    local = total = 0
    for parameter in model.parameters():
        sharded = hasattr(parameter, "ds_tensor")
        local += parameter.ds_tensor.numel() if sharded else parameter.numel()
        total += parameter.ds_numel if sharded else parameter.numel()
    return local, total


def _local_model(model: str, filesystem: pafs.FileSystem) -> str:
    """A start model in the run's object store (the SFT export under `s3://`) copied to this worker's
    disk, where transformers can load it; local, NFS and hub models as they are."""
    if "://" not in model:
        return model
    local = tempfile.mkdtemp(prefix="sphuatuo-start-model-")
    pafs.copy_files(model.split("://", 1)[1], local, source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    return local


def resume_checkpoint() -> str | None:
    """The Hugging Face checkpoint inside Ray Train's latest checkpoint, copied locally, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    local = checkpoint.to_directory()
    return str(Path(local) / "checkpoint")


def export_model(trainer: Any, base_model: str, run: RunRoot, stage_name: str, finetuning: str, *,
                 trust_remote_code: bool) -> None:
    """Save one consolidated HF model directory (LoRA merged), the step log, the sample order and any
    TensorBoard events and W&B run files, from rank 0.

    Every rank calls `save_model` (ZeRO-3 gathers the shards collectively); rank 0 writes the rest.
    """
    local = tempfile.mkdtemp(prefix=f"sphuatuo-{stage_name}-")
    trainer.save_model(local)
    if trainer.args.process_index == 0:
        if finetuning == "lora":
            _merge_lora(local, base_model, trust_remote_code)
        trainer.processing_class.save_pretrained(local)
        run.write_text(json.dumps(trainer.state.log_history, indent=1), stage_name, "train_log.json")
        if hasattr(trainer, "sample_order"):
            run.write_text("".join(json.dumps(step) + "\n" for step in trainer.sample_order), stage_name,
                           "sample_order.jsonl")
        # A pickle of the Trainer's arguments: no one should have to unpickle it to load the model.
        Path(local, "training_args.bin").unlink(missing_ok=True)
        run.replace_dir(local, stage_name, "model")
        events = Path(trainer.args.output_dir, "runs")
        if events.is_dir():
            run.replace_dir(str(events), stage_name, "tensorboard")
        if "wandb" in trainer.args.report_to:
            finish_worker_wandb(trainer.args.output_dir, run, stage_name)
    shutil.rmtree(local, ignore_errors=True)


def _merge_lora(adapter_dir: str, base_model: str, trust_remote_code: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    for name in os.listdir(adapter_dir):
        if name.startswith("adapter_"):
            os.remove(os.path.join(adapter_dir, name))
    merged.save_pretrained(adapter_dir, safe_serialization=True)
