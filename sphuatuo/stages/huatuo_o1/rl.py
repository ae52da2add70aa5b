"""RL against the verifier (METHOD B.4): GRPO or RLOO on the RL share of the verifiable problems.

The policy starts from the SFT export (or the base student when the run has none, or when the recipe
says so) and is prompted with the open-ended question alone, as in SFT. Rewards: 0 for a broken
`## Thinking` / `## Final Response` format, 1.0 when the verifier accepts the final response, 0.1
otherwise (`sphuatuo.train.reward`).
"""

from __future__ import annotations

import json
from functools import partial

from sphuatuo.data.questions import Question
from sphuatuo.data.released import verifiable_problems
from sphuatuo.passes import Row
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import RlStage
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.huatuo_o1 import write_released
from sphuatuo.stages.training import model_of, train_stage, training_log
from sphuatuo.store.run_root import RunRoot
from sphuatuo.train.grpo import grpo_worker

NAME = "rl"
CONFIG = ("models.student.model", "stages.rl")
READS = ("verifiable_problems", "sft")


def rl_examples(prompt_name: str, problems: list[Row]) -> list[Row]:
    prompt = get_prompt(prompt_name)
    examples = []
    for row in sorted(problems, key=lambda r: r["id"]):
        question = Question.from_row(row)
        examples.append({
            "id": row["id"],
            "prompt": prompt.training_prompt(question=row["problem"]),
            "ground_truth": row["ground_truth"],
            "options": json.dumps(question.options, ensure_ascii=False),
            "answer": ",".join(question.answer),
        })
    return examples


def start_model(ctx: StageContext) -> str:
    if ctx.recipe.stages.rl.start_from == "sft":
        try:
            return model_of(ctx, "sft")
        except StageSkipped as missing:
            ctx.note(f"RL starts from the base student: {missing}")
    return model_of(ctx, "base")


def examples_of_run(stage: RlStage, run: RunRoot) -> list[Row]:
    """The RL prompts from the RL share of the problems, or the released ones; made on a worker."""
    problems = run.read_rows(NAME, "released") if stage.data else run.read_rows("verifiable_problems", "rl")
    return rl_examples(stage.prompt, problems[: stage.max_prompts])


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.rl
    count = (write_released(ctx, NAME, stage.data, verifiable_problems) if stage.data
             else ctx.run.count_rows("verifiable_problems", "rl"))
    ctx.record.rows_in = min(count, stage.max_prompts or count)
    train_stage(ctx, NAME, stage, partial(examples_of_run, stage), grpo_worker, start_model(ctx))
    rewards = [entry["reward"] for entry in training_log(ctx, NAME) if "reward" in entry]
    ctx.record.details.update(algorithm=stage.algorithm, first_reward=rewards[0] if rewards else None,
                              last_reward=rewards[-1] if rewards else None, reward_steps=len(rewards))
    if rewards:
        ctx.note(f"{stage.algorithm}: mean reward {rewards[0]:.3f} at the first step, {rewards[-1]:.3f} at the last")
