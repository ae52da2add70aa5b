"""Supervised fine-tuning on the teacher's chain of thought, one Ray Train worker's view.

Each example is conversational prompt-completion: the prompt is the same student prompt used at test
time (the question, not the teacher's prompt), the completion the teacher's `<think>/<answer>` text.
TRL masks the prompt tokens from the loss. With `packing`, examples are packed best-fit into rows of
`max_length` tokens without padding (long CoT of uneven length), attention kept within each example, and
each step's sample-order record names every example its packed rows held.
"""

from __future__ import annotations

from typing import Any


def sft_config(arguments: dict[str, Any], stage: Any) -> Any:
    """TRL's SFTConfig from the stage's Trainer arguments: loss on the completion only, best-fit packing."""
    from trl import SFTConfig

    return SFTConfig(**arguments, completion_only_loss=True, packing=stage.packing, packing_strategy="bfd")


def sft_worker(config: dict[str, Any]) -> None:
    from sphuatuo.recipe import SftStage
    from sphuatuo.train.launcher import prepare_worker

    setup = prepare_worker(config, SftStage)
    # Imported after prepare_worker, which runs in this worker's environment (DS_ACCELERATOR on CPU).
    from trl import SFTTrainer

    from sphuatuo.train.recording import PackedIdsMixin

    dataset = setup.dataset(["prompt", "completion"], completions=("completion",))
    args = sft_config(setup.arguments, setup.stage)
    trainer_class = type("PackedIdsSFTTrainer", (PackedIdsMixin, SFTTrainer), {})
    trainer = setup.trainer(trainer_class, args=args, train_dataset=dataset)
    setup.train_and_export(trainer)
