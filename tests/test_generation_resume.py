"""What a resubmitted generation pass decides from its folder alone, before any engine starts: rows the
engine failed on are retried unless a pass within its `max_error_share` kept them, and the share is checked
again over the whole folder, so a pass that failed never turns into one that passed. Real Parquet files on
a local run root; the engine itself is never reached (tests/test_stages.py runs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cluster_rows, tiny_recipe
from sphuatuo.engines import Request
from sphuatuo.passes import Row
from sphuatuo.passes.generation import PassFailed, generate_pass
from sphuatuo.prompts import PromptInput
from sphuatuo.stages import StageContext
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

ROWS = [{"key": f"q{i}", "text": "what is scurvy?"} for i in range(3)] + [{"key": "long", "text": "scurvy " * 400}]
TOO_LONG = "prompt of 801 tokens is longer than the maximum model length of 128"


def _reply(row: Row, error: str | None = None) -> Row:
    return {**row, "generated_text": "" if error else "vitamin C", "num_input_tokens": 8,
            "num_generated_tokens": 0 if error else 3, "finish_reason": "error" if error else "stop",
            "engine_error": error, "model": "tiny"}


def _resubmit(ctx: StageContext, share: float) -> int:
    def no_engine(row: Row) -> PromptInput:  # defined here, so that it pickles by value for Ray's workers
        raise AssertionError(f"{row['key']} was sent to the engine")

    engine = ctx.recipe.models.teacher.model_copy(update={"max_attempts": 2, "max_error_share": share})
    return generate_pass(ctx, cluster_rows(ROWS), "probe", engine=engine,
                         request=Request(temperature=0.0, top_p=1.0, max_tokens=4), messages=no_engine)


@pytest.mark.slow
def test_a_failed_pass_is_not_done_on_resubmit_and_its_error_share_is_checked_again(tmp_path: Path,
                                                                                     ray_cluster) -> None:
    recipe = tiny_recipe(tmp_path / "run")
    ctx = StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord())
    ctx.run.write_rows([_reply(row) for row in ROWS[:3]], "probe")
    errors = [{**_reply(ROWS[3], TOO_LONG), "attempt": attempt} for attempt in (1, 2)]
    ctx.run.write_rows(errors, "probe_errors")
    # A pass that failed keeps its failed rows out of the folder: the resubmit sends them again, and only them.
    with pytest.raises(Exception, match="long was sent to the engine") as sent:
        _resubmit(ctx, share=0.25)
    assert "q0 was sent" not in str(sent.value)

    # Error rows in the folder (an earlier version wrote them before failing) are checked, not taken as done.
    ctx.run.write_rows([_reply(ROWS[3], TOO_LONG)], "probe", part=1)
    with pytest.raises(PassFailed, match=r"probe: 1 of 4 rows failed in the engine after 2 attempts \(25%, more "
                                         r"than max_error_share 10%\); commonest: 1 x prompt of 801 tokens"):
        _resubmit(ctx, share=0.1)
    # Within the share the pass is finished: nothing is generated again.
    assert _resubmit(ctx, share=0.25) == 0
