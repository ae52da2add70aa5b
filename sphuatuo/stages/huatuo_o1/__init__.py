"""The HuatuoGPT-o1 recipe (METHOD B): verifiable problems -> verifier-guided reasoning search -> SFT -> RL.

Roles: teacher = the search generator (GPT-4o in the paper), judge = the verifier, student = the policy.
`search` is the search's control (strategy choice and bookkeeping), free of Ray and engines. A run can start
at the search, at SFT or at RL from the datasets the authors released (`data:` of those stages), copied into
the run by `write_released`.
"""

from __future__ import annotations

from collections.abc import Callable

from sphuatuo.data.loaders import rejects_jsonl
from sphuatuo.data.released import Released
from sphuatuo.stages import StageContext
from sphuatuo.store.datasets import near_driver
from sphuatuo.store.run_root import RunRoot


def write_released(ctx: StageContext, folder: str, location: str, load: Callable[[str], Released],
                   kept: str = "released", rejects: str = "released_rejects.jsonl",
                   what: str = "the released file") -> int:
    """Copy the rows of a released file to `<folder>/<kept>`, where the stage's steps read them on Ray's workers;
    its bad records go to `<folder>/<rejects>`, counted and noted. The file is read where its path is valid and the
    driver gets the counts (`near_driver`, as the questions stage reads question files). Returns how many rows
    were kept."""
    kept_count, rejected = near_driver(_copy_released, ctx.run, location, load, (folder, kept), (folder, rejects),
                                       locations=[location], credentials=ctx.recipe.storage.credentials)
    ctx.record.rows_rejected += rejected
    ctx.note(f"{kept_count} rows from {what} {location}, {rejected} rejected")
    return kept_count


def _copy_released(run: RunRoot, location: str, load: Callable[[str], Released], kept: tuple[str, str],
                   rejects: tuple[str, str]) -> tuple[int, int]:
    released = load(location)
    run.write_text(rejects_jsonl(released.rejects), *rejects)
    run.write_rows(released.rows, *kept)
    return len(released.rows), len(released.rejects)
