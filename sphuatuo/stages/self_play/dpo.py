"""DPO of the SFT model on the preference pairs (METHOD A.4); the frozen SFT model is the reference.

One DPO model per pair strategy, each from the same SFT model: with one strategy it is `dpo`, with
several (an ablation) `dpo_<strategy>`, so the evaluation puts them side by side.
"""

from __future__ import annotations

from functools import partial

from sphuatuo.passes import Row
from sphuatuo.recipe import Recipe
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.training import model_of, train_stage
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot
from sphuatuo.train.dpo import dpo_worker

NAME = "dpo"
CONFIG = ("stages.dpo", "stages.preference_pairs.strategies")
READS = ("preference_pairs", "sft")


def outputs(recipe: Recipe) -> tuple[str, ...]:
    """The run-root folders this stage writes: one model per pair strategy."""
    return tuple(recipe.stages.dpo_models())


def pairs_of(strategy: str, run: RunRoot) -> list[Row]:
    """One strategy's preference pairs, read on one of Ray's workers (see `train_stage`)."""
    return [{key: pair[key] for key in ("id", "prompt", "chosen", "rejected", "strategy")}
            for pair in run.read_rows("preference_pairs", "pairs") if pair["strategy"] == strategy]


def run(ctx: StageContext) -> None:
    ctx.record.rows_in = ctx.run.count_rows("preference_pairs", "pairs")
    start = model_of(ctx, "sft")
    runs = ctx.record.details.setdefault("runs", {})
    for name, strategy in ctx.recipe.stages.dpo_models().items():
        if runs.get(name, {}).get("status") == "done" and ctx.run.exists(name, "model", "config.json"):
            continue  # trained before this stage was interrupted
        examples = partial(pairs_of, strategy)
        sub = StageContext(recipe=ctx.recipe, run=ctx.run, record=StageRecord(fingerprint=ctx.record.fingerprint),
                           engines=ctx.engines, tracking=ctx.tracking)
        try:
            train_stage(sub, name, ctx.recipe.stages.dpo, examples, dpo_worker, start)
        except StageSkipped as reason:
            runs[name] = {"strategy": strategy, "status": "skipped", "pairs": 0, "reason": str(reason)}
            ctx.note(f"{name}: skipped: {reason}")
            continue
        details = sub.record.details
        for note in details.pop("notes", []):
            ctx.note(f"{name}: {note}")
        runs[name] = {"strategy": strategy, "status": "done", "pairs": sub.record.rows_out, **details}
    ctx.record.rows_out = sum(r["pairs"] for r in runs.values() if r["status"] == "done")
    if not ctx.record.rows_out:
        raise StageSkipped("zero preference pairs for every strategy; nothing to train")
