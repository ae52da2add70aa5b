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

from sphuatuo.data.released import sft_paths
from sphuatuo.parsing.o1 import format_o1
from sphuatuo.passes import Row
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import O1SftStage, SftStage
from sphuatuo.stages import StageContext
from sphuatuo.stages.huatuo_o1 import released_rows
from sphuatuo.stages.training import model_of, train_stage
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


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.sft
    paths = (released_rows(ctx, NAME, stage.data, sft_paths) if stage.data
             else ctx.run.read_rows("reasoning_search", "paths"))
    if stage.extra_data:
        paths += released_rows(ctx, NAME, stage.extra_data, sft_paths, "extra_rejects.jsonl", "the extra file")
    ctx.record.rows_in = len(paths)
    examples = sft_examples(stage, paths)
    origins = Counter(example["origin"] for example in examples)
    ctx.record.details["origins"] = dict(origins)
    ctx.note("SFT examples by origin: " + (", ".join(f"{n} {origin}" for origin, n in origins.items()) or "none"))
    # The trainer sees the training fields only (the prompt choice is this stage's business).
    trainer_stage = SftStage.model_validate(stage.model_dump(include=set(SftStage.model_fields)))
    train_stage(ctx, NAME, trainer_stage, examples, sft_worker, model_of(ctx, "base"))
