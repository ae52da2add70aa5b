"""The driver's own environment, checked in a fresh driver process joined to the session's cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap

import pytest

from conftest import REPO
from sphuatuo.store.runtime import JEMALLOC_CONF, LOCAL_CLUSTER_ENVIRONMENT

pytestmark = pytest.mark.slow

DRIVER = textwrap.dedent("""
    import threading, time
    import ray.data
    from sphuatuo.store.runtime import connect_ray
    connect_ray()
    assert ray.data.range(8).map_batches(lambda batch: batch).count() == 8
    time.sleep(1)
    print(sorted(thread.name for thread in threading.enumerate()))
""")


def test_a_driver_runs_ray_data_without_the_usage_poller_thread(ray_head) -> None:
    """Ray Data's usage poller logs a traceback every 10 s from a thread, which on CPython 3.11 < 3.11.8 can break
    an import on the main thread (runtime.DRIVER_ENVIRONMENT); a sphuatuo driver never starts it."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_DATA_USAGE_DISABLED"}
    env.update(RAY_ADDRESS=ray_head["address"], PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", DRIVER], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = done.stdout.strip().splitlines()[-1]
    assert "MainThread" in threads and "data-usage-metrics-poller" not in threads


LOCAL_TRAINING_DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import psutil, ray
    from sphuatuo.recipe import SftStage
    from sphuatuo.store.run_root import RunRoot
    from sphuatuo.store.runtime import LIGHT_CPUS, connect_ray
    from sphuatuo.train.launcher import fit
    connect_ray(num_cpus=2)

    @ray.remote(num_cpus=LIGHT_CPUS)  # as a pass's row-wise steps ask
    def worker_pid():
        time.sleep(1)
        return os.getpid()

    def record_environment(config):  # a short training's time, and what its process runs on
        time.sleep(3)
        seen = {"jemalloc_mapped": "libjemalloc.so" in Path("/proc/self/maps").read_text(),
                "MALLOC_CONF": os.environ.get("MALLOC_CONF"), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR")}
        RunRoot(config["run_root"], config["filesystem"]).write_text(json.dumps(seen), config["stage_name"], "env.json")

    before = set(ray.get([worker_pid.remote() for _ in range(6)]))
    fit(RunRoot(sys.argv[1]), "environment", SftStage(scaling={"num_workers": 1, "zero_stage": 0}), record_environment,
        {})
    time.sleep(3)  # idle workers past Ray's soft limit end a second after they idle
    helpers = sorted({actor["ActorClassName"] for actor in ray._private.state.actors().values()})
    print(f"trained with {helpers}; workers still there: {sum(map(psutil.pid_exists, before))} of {len(before)}")
""")


def test_training_on_a_local_cluster_is_quiet_on_jemalloc_and_the_next_pass_finds_its_workers_waiting(tmp_path) -> None:
    """The local cluster `sphuatuo run` starts has no dashboard, so no State API, which Ray Train's placement-group
    cleaner queries once a second, warning at each failure: the driver's console shows none of that. The training
    worker runs on Ray's jemalloc, as every CPU trainer (it keeps a step's buffers for the next step). And the task
    workers of the passes before a training stage are still there for the passes after it (with Ray's default
    soft limit on a 2-core machine, 1 of 6 was left, and the next pass started new ones, each importing its
    libraries again). Nor does the training start Ray Train's preemption watcher, which one machine has no use for."""
    # A fresh driver's environment: the local cluster's settings are connect_ray's to set, not this session's, and
    # the allocator the workers' (a driver's own LD_PRELOAD or MALLOC_CONF would win).
    env = {key: value for key, value in os.environ.items()
           if key not in {"RAY_ADDRESS", "LD_PRELOAD", "MALLOC_CONF", *LOCAL_CLUSTER_ENVIRONMENT}}
    with tempfile.TemporaryDirectory(dir="/tmp") as ray_folder:  # short: Ray's socket paths must fit in 107 bytes
        env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=ray_folder)
        done = subprocess.run([sys.executable, "-c", LOCAL_TRAINING_DRIVER, str(tmp_path / "run")], env=env,
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "trained" in done.stdout, done.stderr[-3000:]
    last_line = done.stdout.strip().splitlines()[-1]
    helpers, kept, started = re.fullmatch(r"trained with (.*); workers still there: (\d+) of (\d+)",
                                          last_line).groups()
    assert kept == started and int(started) >= 3
    assert "TrainController" in helpers and "PreemptionWatcher" not in helpers, helpers
    assert "Failed to query Ray Train Controller" not in done.stdout + done.stderr
    seen = json.loads((tmp_path / "run" / "environment" / "env.json").read_text())
    assert seen == {"jemalloc_mapped": True, "MALLOC_CONF": JEMALLOC_CONF, "DS_ACCELERATOR": "cpu"}
