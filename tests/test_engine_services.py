"""Engines that stay up: one engine per model and engine arguments, shared by the passes of a run, released before
training and at the end of the run; hosted by plain Ray actors (the CPU default) or by Ray Serve LLM (GPUs). The
tests that count replica processes run as a driver with one run does: no process kept from an earlier run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ray.util.state import list_actors

from conftest import cluster_rows, tiny_recipe
from sphuatuo.engines.serving import EngineServices
from sphuatuo.pipeline import run_pipeline
from sphuatuo.stages import questions
from sphuatuo.stages.self_play import teacher_cot
from sphuatuo.store.manifest import load_manifest
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow


def _engines_up() -> list[str]:
    from ray import serve

    apps = [name for name in serve.status().applications if name.startswith("sphuatuo-")]
    replicas = [actor.name for actor in list_actors(filters=[("state", "=", "ALIVE")])
                if actor.class_name == "EngineReplica"]
    return apps + replicas


@pytest.mark.usefixtures("no_processes_between_runs")
@pytest.mark.parametrize("host", ["actors", "serve"])
def test_teacher_and_judge_of_one_model_share_one_engine_that_is_gone_after_the_run(
        tmp_path: Path, ray_cluster: dict[str, str], host: str) -> None:
    # The tiny recipe's teacher and judge are the same model with the same engine arguments. Two passes (replies,
    # verdicts) on four questions: a Serve LLM engine on CPU runs them at half the speed of an actor's.
    recipe = tiny_recipe(tmp_path / "run", **{"ray.address": ray_cluster["address"], "ray.engine_host": host,
                                              "data.train": [{"path": "builtin:sample_bank", "limit": 4}],
                                              "stages.teacher_cot.retry_with_reference": False})
    run_pipeline(recipe, stages=(questions, teacher_cot))

    run = RunRoot(recipe.run_root)
    engines = load_manifest(run, recipe).stages["teacher_cot"].details["engines"]
    rows = run.read_rows("teacher_cot", "first")
    assert [start["model"] for start in engines["starts"]] == ["builtin:tiny"]
    assert engines["starts"][0]["seconds"] > 0
    assert engines["reuses"] == 1  # the judge pass found the teacher's engine up
    assert rows and all(row["finish_reason"] in ("stop", "length") for row in rows)
    assert all(row["num_generated_tokens"] > 0 and row["generated_text"].startswith("<think>") for row in rows)
    assert _engines_up() == []


@pytest.mark.usefixtures("no_processes_between_runs")
def test_a_teacher_and_a_judge_of_different_engines_both_stay_up_on_two_cores(tmp_path: Path,
                                                                               ray_cluster: dict[str, str]) -> None:
    # One engine argument apart, teacher and judge are two engines of one core each, and the session's cluster has
    # two: the passes take turns (replies, verdicts, hinted replies, verdicts) with both engines up, none evicted.
    # Both start side by side before the first pass: every new reply goes to the LLM judge.
    recipe = tiny_recipe(tmp_path / "run", **{"ray.address": ray_cluster["address"],
                                              "models.judge.engine.max_model_len": 512})
    run_pipeline(recipe, stages=(questions, teacher_cot))

    run = RunRoot(recipe.run_root)
    engines = load_manifest(run, recipe).stages["teacher_cot"].details["engines"]
    assert [start["folder"] for start in engines["starts"]] == ["teacher_cot/first_generated", "teacher_cot/first_raw"]
    assert engines["starts"][0]["seconds"] == engines["starts"][1]["seconds"]
    assert run.read_text("run.log").count(" up side by side in ") == 1
    assert engines["reuses"] == 2  # the hinted replies and their verdicts
    assert "shut down" not in run.read_text("run.log").split("stage teacher_cot: done")[0]
    assert _engines_up() == []


@pytest.mark.usefixtures("no_processes_between_runs")
def test_a_released_cpu_replica_hosts_the_next_engine_in_its_process_and_the_run_ends_it(
        tmp_path: Path, ray_cluster: dict[str, str]) -> None:
    """Released before training, a CPU replica drops its engine and keeps its process; the next model's engine loads
    there (no new actor, no imports) and answers as that model; closing the services ends the process."""
    from sphuatuo.engines import Request
    from sphuatuo.passes.generation import generate_pass
    from sphuatuo.stages import StageContext
    from sphuatuo.store.manifest import StageRecord

    recipe = tiny_recipe(tmp_path / "run")
    services = EngineServices()
    ctx = StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord(), engines=services)
    rows = cluster_rows([{"key": f"q{i}"} for i in range(4)])
    request = Request(temperature=0.0, top_p=1.0, max_tokens=16)
    try:
        for folder, model in (("tiny", "builtin:tiny"), ("think", "builtin:tiny-think")):
            engine = recipe.models.teacher.model_copy(update={"model": model})
            generate_pass(ctx, rows, folder, engine=engine, request=request,
                          messages=lambda row: [{"role": "user", "content": f"Question {row['key']}"}])
            if folder == "tiny":
                (first,) = _replica_pids()
                services.release_all()  # as a run does before a training stage
                assert _replica_pids() == [first]  # the engine is gone, its process is not
        assert _replica_pids() == [first]
        starts = services.take_log()["starts"]
        assert [(start["model"], start["kept_process"]) for start in starts] == [
            ("builtin:tiny", False), ("builtin:tiny-think", True)]
        think, tiny = (ctx.run.read_column("generated_text", folder) for folder in ("think", "tiny"))
        assert all(text.startswith("<think>") for text in think) and tiny != think
    finally:
        services.close()
    deadline = time.monotonic() + 30  # Ray's state API sees a killed actor a moment later
    while _replica_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _replica_pids() == []


@pytest.mark.usefixtures("no_processes_between_runs")
def test_a_cpu_replica_runs_on_jemalloc_and_hands_its_engines_pages_back_when_released(
        tmp_path: Path, ray_cluster: dict[str, str]) -> None:
    """jemalloc keeps freed pages for reuse; a replica that drops its engine before a training stage must not keep
    the engine's memory (its 1 GiB KV cache on CPU among it)."""
    from sphuatuo.engines import Request
    from sphuatuo.passes.generation import generate_pass
    from sphuatuo.stages import StageContext
    from sphuatuo.store.manifest import StageRecord

    recipe = tiny_recipe(tmp_path / "run")
    services = EngineServices()
    ctx = StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord(), engines=services)
    try:
        generate_pass(ctx, cluster_rows([{"key": f"q{i}"} for i in range(4)]), "tiny", engine=recipe.models.teacher,
                      request=Request(temperature=0.0, top_p=1.0, max_tokens=16),
                      messages=lambda row: [{"role": "user", "content": f"Question {row['key']}"}])
        (pid,) = _replica_pids()
        assert "libjemalloc.so" in Path(f"/proc/{pid}/maps").read_text()
        holding = _resident_mib(pid)
        services.release_all()
        released = _resident_mib(pid)
        print(f"replica resident: {holding} MiB with its engine, {released} MiB released")  # for `pytest -s`
        assert holding - released > 512
    finally:
        services.close()


def test_a_kept_engine_is_sent_one_whole_batch_per_call_whatever_the_blocks_upstream(
        tmp_path: Path, kept_engines: EngineServices) -> None:
    """Ray Data bundles blocks until a bundle holds a batch: twelve rows in blocks of three, in batches of four, would
    reach the replica as 4 + 2 and 4 + 2, each bundle's last 2 rows holding their sender while they wait behind the
    rows queued before them (2,000 prompts measured: the engine ran out of queued rows for 176 of 236 s). The feed
    cuts the rows into blocks of one batch: three calls of four."""
    import ray.data
    from ray.util.state import list_tasks

    from sphuatuo import engines
    from sphuatuo.engines import Request

    engine = tiny_recipe(tmp_path / "run").models.teacher.model_copy(update={"batch_size": 4})
    ds = ray.data.from_items([{"messages": [{"role": "user", "content": f"Question {i}"}]} for i in range(12)],
                             override_num_blocks=4)
    rows = engines.generate(ds, engine, Request(temperature=0.0, top_p=1.0, max_tokens=4), services=kept_engines,
                            folder="feed").take_all()
    assert len(rows) == 12 and all(row["finish_reason"] != "error" for row in rows)
    (replica,) = next(iter(kept_engines.engines.values())).replicas
    filters = [("actor_id", "=", replica._actor_id.hex()), ("name", "=", "EngineReplica.generate")]
    deadline, calls = time.monotonic() + 30, []
    while len(calls) < 3 and time.monotonic() < deadline:  # Ray's state API sees a task a moment after it ends
        time.sleep(1)
        calls = list_tasks(filters=filters)
    time.sleep(2)  # and a fourth call, were there one, by now
    assert len(list_tasks(filters=filters)) == 3


def _resident_mib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) // 1024


def _replica_pids() -> list[int]:
    return [actor.pid for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            if actor.class_name == "EngineReplica"]
