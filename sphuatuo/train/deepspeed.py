"""DeepSpeed configs for the training stages, handed to the HF Trainer as a dict.

Batch sizes, clipping and precision are "auto" so the Trainer's arguments stay the single source of
truth. On CPU there is no optimizer block: the Trainer's torch AdamW is used, which spares compiling
DeepSpeed's CPU Adam (hence `zero_allow_untested_optimizer`).
"""

from __future__ import annotations

from typing import Any

from sphuatuo.recipe import TrainScaling

CPU_REDUCE_BUCKET_ELEMENTS = 5_000_000


def deepspeed_config(scaling: TrainScaling, *, on_gpu: bool) -> dict[str, Any] | None:
    """ZeRO-2 or ZeRO-3 with optional CPU offload (None for stage 0: plain DDP)."""
    if scaling.zero_stage == 0:
        return None
    # Both serve GPUs (overlap with CUDA streams; one gradient buffer against memory fragmentation). On CPU the
    # copy into that buffer took a third of a ZeRO-2 step under glibc's malloc: off, SmolLM2-135M with one rank
    # trains 58.2 tokens/s steady against 40.5, with the same losses (`sphuatuo bench train`'s torchrun line, fp32,
    # 2-core EPYC); under jemalloc it still gains nothing (80.0 off, 78.0 on; Ray Train 79.9 against 73.5).
    zero: dict[str, Any] = {"stage": scaling.zero_stage, "overlap_comm": on_gpu, "contiguous_gradients": on_gpu}
    if not on_gpu:
        # Gradients are flattened into a new buffer per bucket before each reduction. glibc maps a buffer of the
        # default bucket (5e8 elements, the whole of a small model) afresh each time, and page-faulting it in cost
        # more than the copy (0.25 s against 0.05 s for SmolLM2-135M's gradient); buckets of 20 MB in fp32 are
        # served again from pages already touched. The Ray Train line of `sphuatuo bench train` with one ZeRO-2
        # rank: 59.9 tokens/s steady against 54.4.
        zero["reduce_bucket_size"] = CPU_REDUCE_BUCKET_ELEMENTS
    if scaling.zero_stage == 3:
        # Gather full weights when the Trainer saves, so the exported model is whole.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if scaling.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if scaling.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scaling.offload_optimizer:
        # Offloaded states need DeepSpeed's own CPU Adam, which it picks for this block.
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                           "weight_decay": "auto"}}
    return config
