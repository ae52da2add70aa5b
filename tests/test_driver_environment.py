"""The driver's own environment, checked in a fresh driver process joined to the session's cluster."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

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
