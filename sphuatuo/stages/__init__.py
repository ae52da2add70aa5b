"""Stages: each reads datasets from the run root and writes one (Parquet) under it.

`questions`, `evaluate` and `training` serve both recipes; `self_play/` and `huatuo_o1/` hold each
recipe's own stages, in the order the recipe's config class lists them (`Recipe.STAGES`).

A stage is a module with `NAME` (its folder in the run root), `CONFIG` (the recipe fields it reads, as
dotted paths), `READS` (the stages whose outputs it reads), `run(ctx)`, and optionally `outputs(recipe)`
(its run-root folders, when they are not just `NAME`). CONFIG and READS make its fingerprint
(`sphuatuo.pipeline.stage_fingerprint`).

The contract every stage keeps:
- rows carry the stable `id` of their question, so any training example traces back to it;
- a stage whose fingerprint is unchanged is reused; inside a stage, the keys already written are skipped;
- bad input goes to rejects with its reason, unparsable model output is kept with `parse_error` set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sphuatuo.recipe import Recipe
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.tracking import Tracking

if TYPE_CHECKING:
    from sphuatuo.engines.serving import EngineServices

log = logging.getLogger("sphuatuo")


class StageSkipped(Exception):
    """A stage had nothing to do (for example zero input rows); the message says why."""


class StageFailed(Exception):
    """A stage's error share passed the recipe's threshold, or a required input is missing."""


@dataclass
class StageContext:
    recipe: Recipe
    run: RunRoot
    record: StageRecord
    engines: EngineServices | None = None  # the run's engines that stay up (None: each pass starts its own)
    tracking: Tracking | None = None  # the pipeline run's trackers; None: a stage run on its own reports nowhere

    def note(self, message: str) -> None:
        """Log a line and keep it in the manifest for the report."""
        log.info(message)
        self.record.details.setdefault("notes", []).append(message)
