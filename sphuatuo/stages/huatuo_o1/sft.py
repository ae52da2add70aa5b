"""SFT on the verified reasoning paths (METHOD B.3).

One example per solved problem: the open-ended question as the user message, and as the assistant's
reply `## Thinking\n\n{natural reasoning}\n\n## Final Response\n\n{response}`. TRL masks the prompt
tokens from the loss. Paths found with the label revealed are used unless the recipe says otherwise.

The paths are the search's, or a released file's (`data`); `extra_data` adds the rows of another file, such as
the project-written examples of the format (`builtin:o1_format_examples`). Every example keeps its `origin`:
`search`, `released` or the extra file's own `source` (`project-written`).
"""

from __future__ import annotations

from collections import Counter
from functools import partial

from sphuatuo.data.released import sft_paths
from sphuatuo.parsing.o1 import format_o1
from sphuatuo.passes import Row
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import O1SftStage, SftStage
from sphuatuo.stages import StageContext
from sphuatuo.stages.huatuo_o1 import write_released
from sphuatuo.stages.training import fine_tune, model_of, write_examples
from sphuatuo.store.datasets import column_summary
from sphuatuo.store.run_root import RunRoot
from sphuatuo.train.sft import sft_worker

NAME = "sft"
CONFIG = ("models.student.model", "stages.sft")
READS = ("reasoning_search",)


def sft_examples(stage: O1SftStage, paths: list[Row]) -> list[Row]:
    prompt = get_prompt(stage.prompt)
    return [
        {
            "id": row["id"],
            "prompt": prompt.training_prompt(question=row["problem"]),
            "completion": [{"role": "assistant", "content": format_o1(row["complex_cot"], row["response"])}],
            "generator": row["generator"],
            "label_revealed": row["label_revealed"],
            "origin": row.get("origin", "search"),
        }
        for row in sorted(paths, key=lambda r: r["id"])
        if stage.include_label_revealed or not row["label_revealed"]
    ]


def examples_of_run(stage: O1SftStage, run: RunRoot) -> list[Row]:
    """The SFT set from the search's paths or the released ones, and the extra file's; made on a worker."""
    paths = run.read_rows(NAME, "released") if stage.data else run.read_rows("reasoning_search", "paths")
    return sft_examples(stage, paths + (run.read_rows(NAME, "extra") if stage.extra_data else []))


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.sft
    ctx.record.rows_in = (write_released(ctx, NAME, stage.data, sft_paths) if stage.data
                          else ctx.run.count_rows("reasoning_search", "paths"))
    if stage.extra_data:
        ctx.record.rows_in += write_released(ctx, NAME, stage.extra_data, sft_paths, "extra", "extra_rejects.jsonl",
                                             "the extra file")
    count = write_examples(ctx.run, NAME, partial(examples_of_run, stage))
    origins = ctx.record.details["origins"] = column_summary(
        ctx.run, [(NAME, "data")], ["origin"], lambda table: dict(Counter(table["origin"].to_pylist())))
    ctx.note("SFT examples by origin: " + (", ".join(f"{n} {origin}" for origin, n in origins.items()) or "none"))
    # The trainer sees the training fields only (the prompt choice is this stage's business).
    trainer_stage = SftStage.model_validate(stage.model_dump(include=set(SftStage.model_fields)))
    fine_tune(ctx, NAME, trainer_stage, count, sft_worker, model_of(ctx, "base"))
