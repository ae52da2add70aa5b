"""An engine replica SIGKILLed in the middle of a pass (a node lost, the OOM killer): Ray restarts it and sends its
batches in flight again, whether the replica belongs to the pass (Ray Data's processor) or is kept up for the run
(an actor of `EngineServices`), so the pass finishes with every key written exactly once. Restarts are
bounded by the role's `max_restarts`: one death more fails the pass naming the replica, and keeps the rows
written before it for the re-run. Real Ray, a real vLLM engine on the tiny model, a real kill."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import cluster_rows, tiny_recipe
from sphuatuo.engines import Request
from sphuatuo.engines.serving import EngineServices
from sphuatuo.passes.generation import PassFailed, generate_pass
from sphuatuo.stages import StageContext
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

# Enough rows that the pass outlasts the killer's poll of the folder (0.2 s) and a block's write.
KEYS = [f"q{i}" for i in range(32)]
FOLDER = "answers"


def replica_pids(replica_class: str) -> list[int]:
    """The processes of live Ray actors of `replica_class`, found by the title Ray gives an actor's process
    (`ray::EngineReplica.generate`, as `ps` shows it): at once, where Ray's state API takes a second or two."""
    pids = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::") and replica_class in title:
            pids.append(process.pid)
    return pids


class ReplicaKiller(threading.Thread):
    """SIGKILLs the pass's engine replica once `after` rows are in the folder (mid-pass: the rest are in flight
    or queued, one at a time)."""

    def __init__(self, root: RunRoot, after: int, replica_class: str):
        super().__init__(daemon=True)
        self.root, self.after, self.replica_class = root, after, replica_class
        self.rows_at_kill: int | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            written = len(self.root.read_column("key", FOLDER))
            if written >= self.after:
                replicas = replica_pids(self.replica_class)
                if replicas:
                    os.kill(replicas[0], signal.SIGKILL)
                    self.rows_at_kill = written
                    return
            time.sleep(0.2)


def _pass_with_a_kill(ctx: StageContext, max_restarts: int, kill_after: int) -> ReplicaKiller:
    # One row at a time, so the pass is still running when the killer strikes.
    engine = ctx.recipe.models.teacher.model_copy(update={"batch_size": 1, "max_concurrent_batches": 1,
                                                          "max_restarts": max_restarts})
    killer = ReplicaKiller(ctx.run, kill_after, "EngineReplica" if ctx.engines else "vLLMEngineStage")
    killer.start()
    try:
        generate_pass(ctx, cluster_rows([{"key": key} for key in KEYS]), FOLDER, engine=engine,
                      request=Request(temperature=0.0, top_p=1.0, max_tokens=32),
                      messages=lambda row: [{"role": "user", "content": f"Question {row['key']}"}])
    finally:
        killer.join(timeout=1)
        if ctx.engines:
            ctx.engines.close()
    return killer


@pytest.mark.usefixtures("no_processes_between_runs")  # the killer finds the replica by its process title
@pytest.mark.parametrize("kept_up", [False, True], ids=["engine_of_the_pass", "engine_kept_up"])
def test_a_killed_engine_replica_is_restarted_every_key_written_once_and_restarts_are_bounded(
        tmp_path: Path, ray_cluster, kept_up: bool) -> None:
    recipe = tiny_recipe(tmp_path / "run")
    assert recipe.models.teacher.backend == "vllm"
    ctx = StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord(),
                       engines=EngineServices() if kept_up else None)

    # No restart allowed: the death fails the pass, naming the replica; what was written stays.
    with pytest.raises(PassFailed, match=r"answers: an engine replica of builtin:tiny died after 0 restarts "
                                         r"\(max_restarts\); the \d+ rows written are kept"):
        _pass_with_a_kill(ctx, max_restarts=0, kill_after=2)
    kept = ctx.run.read_column("key", FOLDER)
    assert len(kept) >= 2 and len(set(kept)) == len(kept) and len(kept) < len(KEYS)

    # The re-run, with a restart allowed, loses its replica again mid-pass and still finishes.
    killer = _pass_with_a_kill(ctx, max_restarts=1, kill_after=len(kept) + 2)
    assert killer.rows_at_kill is not None and killer.rows_at_kill < len(KEYS), "the replica was not killed mid-pass"
    written = Counter(ctx.run.read_column("key", FOLDER))
    assert written == Counter(KEYS), f"every key exactly once, got {written}"
    assert ctx.run.read_column("key", f"{FOLDER}_errors") == []
    assert ctx.record.details["throughput"][FOLDER]["rows"] == len(KEYS) - len(kept)
