"""Passes: resumable steps over rows that stages compose (generate replies, decide verdicts).

A pass reads nothing from a stage: it is given its rows, the folder it writes under the run root, and
the stage record whose details it adds to (throughput). It never imports `sphuatuo.stages`.
"""

from __future__ import annotations

from typing import Any, Protocol

from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

Row = dict[str, Any]


class PassTarget(Protocol):
    """Where a pass writes: the run root and the record of the stage it runs for (a StageContext is one)."""

    run: RunRoot
    record: StageRecord
