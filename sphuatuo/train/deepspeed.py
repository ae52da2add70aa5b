"""DeepSpeed configs for the training stages, handed to the HF Trainer as a dict.

Batch sizes, clipping and precision are "auto" so the Trainer's arguments stay the single source of
truth. On CPU there is no optimizer block: the Trainer's torch AdamW is used, which spares compiling
DeepSpeed's CPU Adam (hence `zero_allow_untested_optimizer`).
"""

from __future__ import annotations

from typing import Any


def deepspeed_config(zero_stage: int, *, on_gpu: bool) -> dict[str, Any] | None:
    """ZeRO-2 or ZeRO-3 (None for stage 0: plain DDP)."""
    if zero_stage == 0:
        return None
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    if zero_stage == 3:
        # Gather full weights when the Trainer saves, so the exported model is whole.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
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
