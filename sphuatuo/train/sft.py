"""Supervised fine-tuning on the teacher's chain of thought, one Ray Train worker's view.

Each example is conversational prompt-completion: the prompt is the same student prompt used at test
time (the question, not the teacher's prompt), the completion the teacher's `<think>/<answer>` text.
TRL masks the prompt tokens from the loss. With `packing`, examples are packed best-fit into rows of
`max_length` tokens without padding (long CoT of uneven length), attention kept within each example, and
each step's sample-order record names every example its packed rows held. Without packing, each micro-batch is
still one row without padding (`padding_free`): the padded batch's loss, with no compute spent on padding (the o1
demo's SFT on 2 CPU cores: 93.5 -> 63.4 s of training, the same loss at every step).
"""

from __future__ import annotations

from typing import Any


def sft_config(arguments: dict[str, Any], stage: Any) -> Any:
    """TRL's SFTConfig from the stage's Trainer arguments: loss on the completion only, best-fit packing or
    padding-free micro-batches."""
    from trl import SFTConfig

    # A micro-batch of one example has no padding to leave out (TRL warns that it saves nothing); packing is
    # padding-free in any case.
    padding_free = stage.padding_free and stage.micro_batch_size > 1
    if padding_free and not stage.packing:
        # TRL cuts nothing without packing and so refuses a max_length here; every example already fits it
        # (`fit_to_length` dropped or cut the longer ones by the same token count).
        arguments = {**arguments, "max_length": None}
    return SFTConfig(**arguments, completion_only_loss=True, packing=stage.packing, packing_strategy="bfd",
                     padding_free=padding_free)


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
