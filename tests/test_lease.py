"""One driver per run root: the lease is taken, refreshed, released; a second driver fails at once
naming the holder, before it connects to Ray; a stale lease is taken over with a warning.

Real lease files on the local filesystem; "another driver" is a lease written with another host or
pid, as that driver would have written it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

import sphuatuo.pipeline as pipeline
import sphuatuo.store.lease as lease_module
from conftest import tiny_recipe
from sphuatuo.cli import main
from sphuatuo.store.lease import LEASE, Holder, Lease, LeaseError
from sphuatuo.store.run_root import RunRoot


@pytest.fixture(autouse=True)
def _quick_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    """No settling pause, and a heartbeat that never fires unless a test asks for one."""
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.0)
    monkeypatch.setattr(lease_module, "HEARTBEAT_S", 3600.0)
    monkeypatch.setattr(lease_module, "STALE_AFTER_S", 60.0)


def _iso(seconds_ago: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat(timespec="milliseconds")


def _foreign_lease(root: Path, *, host: str = "other-node", pid: int = 4242, heartbeat_ago: float = 1.0) -> None:
    """The lease another driver would have written."""
    RunRoot(str(root)).write_text(json.dumps({"host": host, "pid": pid, "started_at": "2025-01-02T03:04:05+00:00",
                                              "heartbeat_at": _iso(heartbeat_ago)}), LEASE)


def _holder(root: Path) -> dict:
    return json.loads((root / LEASE).read_text())


def test_lease_is_taken_refreshed_and_released(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path))
    lease = Lease(run)
    lease.acquire()
    taken = _holder(tmp_path)
    assert (taken["host"], taken["pid"]) == (socket.gethostname(), os.getpid())
    assert taken["started_at"] == taken["heartbeat_at"]

    time.sleep(0.01)
    lease.refresh()
    refreshed = _holder(tmp_path)
    assert refreshed["started_at"] == taken["started_at"] and refreshed["heartbeat_at"] > taken["heartbeat_at"]

    lease.release()
    assert not (tmp_path / LEASE).exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_heartbeat_thread_refreshes_the_lease_until_released(tmp_path: Path) -> None:
    with Lease(RunRoot(str(tmp_path)), heartbeat_s=0.05) as lease:
        first = _holder(tmp_path)["heartbeat_at"]
        deadline = time.monotonic() + 5
        while _holder(tmp_path)["heartbeat_at"] == first:
            assert time.monotonic() < deadline, "no heartbeat in 5 s"
            time.sleep(0.02)
        assert lease._thread is not None and lease._thread.daemon
    assert lease._thread is None and not (tmp_path / LEASE).exists()


def test_same_process_takes_its_own_lease_again(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path))
    Lease(run).acquire()  # never released, as after a crash in this process
    with Lease(run):
        assert _holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LEASE).exists()


def test_second_driver_fails_at_once_naming_the_holder(tmp_path: Path) -> None:
    _foreign_lease(tmp_path, host="other-node", pid=4242, heartbeat_ago=2)
    with pytest.raises(LeaseError, match=r"in use by another driver \(host other-node, pid 4242, since "
                                         r"2025-01-02T03:04:05\+00:00, last heartbeat 2s ago\)"):
        Lease(RunRoot(str(tmp_path))).acquire()
    assert _holder(tmp_path)["pid"] == 4242  # untouched


def test_live_process_of_this_host_holds_the_lease(tmp_path: Path) -> None:
    _foreign_lease(tmp_path, host=socket.gethostname(), pid=os.getppid())
    with pytest.raises(LeaseError, match=rf"pid {os.getppid()}"):
        Lease(RunRoot(str(tmp_path))).acquire()


def test_stale_lease_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _foreign_lease(tmp_path, host="other-node", pid=4242, heartbeat_ago=61)
    with caplog.at_level(logging.WARNING, logger="sphuatuo"), Lease(RunRoot(str(tmp_path))):
        assert _holder(tmp_path)["pid"] == os.getpid()
    [warning] = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert "taking over a stale lease (host other-node, pid 4242, since 2025-01-02T03:04:05+00:00" in warning
    assert "stale after 60s" in warning


def test_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    _foreign_lease(tmp_path, host=socket.gethostname(), pid=dead_pid, heartbeat_ago=1)
    with caplog.at_level(logging.WARNING, logger="sphuatuo"), Lease(RunRoot(str(tmp_path))):
        assert _holder(tmp_path)["pid"] == os.getpid()
    assert any(f"a driver that is gone (host {socket.gethostname()}, pid {dead_pid}" in r.message
               for r in caplog.records)


def test_driver_whose_lease_was_taken_over_stops_and_leaves_it(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path))
    lease = Lease(run)
    lease.acquire()
    _foreign_lease(tmp_path, host="other-node", pid=4242)  # another driver took it (ours looked stale)
    lease.refresh()
    with pytest.raises(LeaseError, match=r"taken over by another driver \(host other-node, pid 4242"):
        lease.check()
    lease.release()
    assert _holder(tmp_path)["pid"] == 4242  # the new holder's lease is kept


def test_write_then_read_back_loses_to_a_concurrent_taker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunRoot(str(tmp_path))
    # Another driver writes its lease while this one waits to confirm its own.
    monkeypatch.setattr(lease_module.time, "sleep", lambda s: _foreign_lease(tmp_path, host="other-node", pid=7))
    with pytest.raises(LeaseError, match=r"taken by another driver at the same time \(host other-node, pid 7"):
        Lease(run).acquire()
    assert _holder(tmp_path)["pid"] == 7


def test_unreadable_lease_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / LEASE).write_text("{not json")
    with pytest.raises(LeaseError, match=rf"cannot read the lease {tmp_path / LEASE}"):
        Lease(RunRoot(str(tmp_path))).acquire()
    assert (tmp_path / LEASE).read_text() == "{not json"


def test_holder_ages_are_measured_from_the_heartbeat() -> None:
    holder = Holder("h", 1, _iso(100), _iso(30))
    assert 29 < holder.heartbeat_age_s() < 32


def _refuse_ray(*args: object, **kwargs: object) -> None:
    raise AssertionError("connect_ray was called on a held run root")


def test_run_pipeline_on_a_held_root_fails_before_connecting_ray(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setattr(pipeline, "connect_ray", _refuse_ray)  # raises if the run gets that far
    connected = ray.is_initialized()  # the session's other tests may have connected this process already
    root = tmp_path / "run"
    _foreign_lease(root, host="other-node", pid=4242)
    with pytest.raises(LeaseError, match=r"host other-node, pid 4242"):
        pipeline.run_pipeline(tiny_recipe(root), stages=())
    assert ray.is_initialized() == connected
    assert sorted(p.name for p in root.iterdir()) == [LEASE]  # no manifest, no run.log


def test_run_pipeline_releases_its_lease_also_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_cluster(*args: object, **kwargs: object) -> None:
        assert (tmp_path / "run" / LEASE).exists()  # held while the run runs
        raise ConnectionError("no cluster")

    monkeypatch.setattr(pipeline, "connect_ray", no_cluster)
    with pytest.raises(ConnectionError):
        pipeline.run_pipeline(tiny_recipe(tmp_path / "run"), stages=())
    assert not (tmp_path / "run" / LEASE).exists()
    assert (tmp_path / "run" / "run.log").exists()


def test_sphuatuo_run_prints_the_holder_and_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(pipeline, "connect_ray", _refuse_ray)
    root = tmp_path / "run"
    _foreign_lease(root, host="other-node", pid=4242)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tiny_recipe(root).model_dump(mode="json")))

    assert main(["run", str(recipe_file)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: run root {root} is in use by another driver (host other-node, pid 4242")
    assert "Traceback" not in err
