"""DPO of the SFT model on the preference pairs (METHOD A.4); the frozen SFT model is the reference."""

from __future__ import annotations

from sphuatuo.stages import StageContext
from sphuatuo.stages.training import model_of, train_stage
from sphuatuo.train.dpo import dpo_worker

NAME = "dpo"


def run(ctx: StageContext) -> None:
    pairs = ctx.run.read_rows("preference_pairs", "pairs")
    ctx.record.rows_in = len(pairs)
    examples = [{key: pair[key] for key in ("id", "prompt", "chosen", "rejected", "strategy")} for pair in pairs]
    train_stage(ctx, NAME, ctx.recipe.stages.dpo, examples, dpo_worker, model_of(ctx, "sft"))
