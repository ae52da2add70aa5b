"""Passes: resumable steps over rows that stages compose (generate replies, decide verdicts).

A pass reads nothing from a stage: it is given its rows, the folder it writes under the run root, and
the stage record whose details it adds to (throughput). It never imports `sphuatuo.stages`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

if TYPE_CHECKING:
    from sphuatuo.engines.serving import EngineServices

Row = dict[str, Any]


class PassTarget(Protocol):
    """Where a pass writes: the run root and the record of the stage it runs for (a StageContext is one), and
    the run's engines that stay up, if any."""

    run: RunRoot
    record: StageRecord
    engines: EngineServices | None
