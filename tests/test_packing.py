"""SFT `packing`: TRL packs several examples into each row, padding-free, and the per-step sample order still names
every example a step trained on. Without packing, a micro-batch trains padding-free with the padded batch's loss.

The first test builds the SFT trainer in this process (no Ray, no training); the second trains with packing through
the SFT stage on one Ray Train worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_stages import _accepted_teacher_rows, _context
from transformers import AutoTokenizer

from conftest import tiny_recipe
from sphuatuo.parsing.replies import format_cot
from sphuatuo.stages import questions
from sphuatuo.stages.self_play import sft
from sphuatuo.store.run_root import RunRoot
from sphuatuo.train.lengths import example_length
from sphuatuo.train.recording import PackedIdsMixin, RecordedTrainerMixin

EXAMPLES = 8
MAX_LENGTH = 128


def _rows() -> list[dict]:
    # Uneven lengths, as chains of thought are, so best-fit packing fills rows with several examples.
    return [{"id": f"q{i}", "prompt": [{"role": "user", "content": f"Question {i}: which vitamin prevents scurvy?"}],
             "completion": [{"role": "assistant", "content": format_cot("think " * (6 * i + 2), "A. vitamin C")}]}
            for i in range(EXAMPLES)]


def test_packed_rows_and_their_batches_name_the_examples_whose_tokens_they_hold(tiny_model: str,
                                                                                 tmp_path: Path) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    args = SFTConfig(output_dir=str(tmp_path), packing=True, packing_strategy="bfd", max_length=MAX_LENGTH,
                     completion_only_loss=True, per_device_train_batch_size=2, use_cpu=True,
                     remove_unused_columns=False, report_to="none")
    trainer_class = type("Trainer", (RecordedTrainerMixin, PackedIdsMixin, SFTTrainer), {})
    rows = _rows()
    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(tiny_model), processing_class=tokenizer,
                            args=args, train_dataset=Dataset.from_list(rows), model_parameters=0, peak_flops=None)
    unpacked = {row["id"]: row for row in trainer._prepare_dataset(Dataset.from_list(rows), tokenizer, args, False,
                                                                   None, "unpacked")}
    # What TRL trains on is what the project counts (the slow test below relies on it), none of it cut.
    lengths = [example_length(tokenizer, row, ["completion"]) for row in rows]
    assert [len(unpacked[row["id"]]["input_ids"]) for row in rows] == lengths and max(lengths) <= MAX_LENGTH

    packed = trainer.train_dataset
    assert len(packed) < EXAMPLES and max(len(row["ids"]) for row in packed) > 1
    assert sorted(example for row in packed for example in row["ids"]) == sorted(unpacked)
    for row in packed:
        # The ids are those of the tokens the row holds, in order.
        assert row["seq_lengths"] == [len(unpacked[example]["input_ids"]) for example in row["ids"]]
        assert row["input_ids"] == [token for example in row["ids"] for token in unpacked[example]["input_ids"]]
        assert row["labels"] == [label for example in row["ids"] for label in unpacked[example]["labels"]]

    # The collator queues each micro batch's examples as it builds the batch: one padding-free sequence.
    batches = list(trainer.get_train_dataloader())
    queued = list(trainer._batches)
    assert len(queued) == len(batches) and sorted(example for ids in queued for example in ids) == sorted(unpacked)
    for batch, ids in zip(batches, queued):
        assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
        assert batch["input_ids"].numel() == sum(len(unpacked[example]["input_ids"]) for example in ids)


def test_a_padding_free_micro_batch_has_the_padded_batchs_loss(tiny_model: str, tmp_path: Path) -> None:
    """SFT's default: a micro-batch's examples in one row without padding. Its loss is the padded batch's only if
    attention stays within each example (a leak across examples changes it); the padding it saves is compute."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from sphuatuo.recipe import SftStage
    from sphuatuo.train.launcher import training_arguments
    from sphuatuo.train.sft import sft_config

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rows = _rows()[::2]  # four examples of uneven length
    batches, losses = {}, {}
    for padding_free in (False, True):
        stage = SftStage(padding_free=padding_free, micro_batch_size=len(rows), max_length=MAX_LENGTH)
        args = sft_config({**training_arguments(stage, str(tmp_path), on_gpu=False), "deepspeed": None,
                           "report_to": "none"}, stage)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(tiny_model))
        batch = batches[padding_free] = next(iter(trainer.get_train_dataloader()))
        losses[padding_free] = trainer.compute_loss(model, batch).item()
    padded, flat = batches[False], batches[True]
    assert padded["input_ids"].shape[0] == len(rows) and flat["input_ids"].shape[0] == 1
    assert "attention_mask" not in flat and flat["input_ids"].numel() == padded["attention_mask"].sum()
    assert flat["input_ids"].numel() < padded["input_ids"].numel()  # the padding left out
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.slow
def test_packed_sft_trains_on_full_rows_and_records_every_example(tmp_path: Path, ray_cluster,
                                                                   tiny_model: str) -> None:
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": EXAMPLES}],
                                              "data.test_fraction": 0.0, "stages.sft.packing": True,
                                              "stages.sft.scaling": {"num_workers": 1}})
    questions.run(_context(recipe))
    run = RunRoot(recipe.run_root)
    run.write_rows(_accepted_teacher_rows(run), "teacher_cot", "first")
    ctx = _context(recipe)
    sft.run(ctx)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    lengths = {row["id"]: example_length(tokenizer, row, ["completion"]) for row in run.read_rows("sft", "data")}
    max_length = recipe.stages.sft.max_length
    assert len(lengths) == EXAMPLES and max(lengths.values()) < max_length / 2  # two fit in a row
    order = [json.loads(line) for line in run.read_text("sft", "sample_order.jsonl").splitlines()]
    # Unpacked, micro batch 1 on one worker trains one example a step: 8 steps. Packed, each row holds several.
    assert [step["step"] for step in order] == list(range(1, len(order) + 1)) and len(order) < EXAMPLES
    assert sorted(example for step in order for (ids,) in [step["ids"]] for example in ids) == sorted(lengths)
    for step in order:
        (ids,), (tokens,) = step["ids"], step["tokens"]
        # Padding-free: a step trains on exactly its examples' tokens, and they fill most of the row.
        assert len(ids) > 1 and max_length / 2 < tokens == sum(lengths[example] for example in ids) <= max_length

    log = json.loads(run.read_text("sft", "train_log.json"))
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == len(order) == ctx.record.details["steps"]
    assert all(loss == loss and 0 < loss < float("inf") for loss in losses)
    assert run.exists("sft", "model", "model.safetensors")
