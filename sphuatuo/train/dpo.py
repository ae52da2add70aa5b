"""Direct preference optimisation on (corrected, original) pairs, one Ray Train worker's view.

The policy starts from the SFT export and the reference model is a frozen copy of it (TRL builds the
copy when `ref_model` is None; under LoRA the reference is the adapter-free base, i.e. the same
weights).
"""

from __future__ import annotations

from typing import Any


def dpo_worker(config: dict[str, Any]) -> None:
    from sphuatuo.recipe import DpoStage
    from sphuatuo.train.launcher import prepare_worker

    setup = prepare_worker(config, DpoStage)
    # Imported after prepare_worker, which runs in this worker's environment (DS_ACCELERATOR on CPU).
    from trl import DPOConfig, DPOTrainer

    stage = setup.stage
    dataset = setup.dataset(["prompt", "chosen", "rejected"], completions=("chosen", "rejected"))
    args = DPOConfig(**setup.arguments, beta=stage.beta, loss_type=[stage.loss_type],
                     precompute_ref_log_probs=stage.precompute_ref_log_probs)
    trainer = setup.trainer(DPOTrainer, ref_model=None, args=args, train_dataset=dataset)
    setup.train_and_export(trainer)
