"""One driver per run root: a lease file (`<run root>/lease.json`) that the running driver holds.

Two drivers on one run root would both append rows (duplicates) and train under the same checkpoint
names. `run_pipeline` takes the lease before it connects to Ray, so a second driver fails at once,
naming the holder. The holder refreshes the lease's heartbeat from a daemon thread; a lease whose
heartbeat is older than `STALE_AFTER_S` (its driver was killed, its node lost) is taken over with a
warning, at once when the holder is a process of this host that no longer exists.

Heartbeats are compared with this host's clock, so the drivers' clocks must agree to well within
`STALE_AFTER_S` (NTP does); hosts are told apart by name, so drivers on one run root need distinct
host names (containers sharing the host's name and not its process ids would confuse the pid check).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sphuatuo.store.run_root import RunRoot

log = logging.getLogger("sphuatuo")

LEASE = "lease.json"
# Seconds between heartbeats; a lease whose heartbeat is older than STALE_AFTER_S is free to take.
HEARTBEAT_S = 15.0
STALE_AFTER_S = 4 * HEARTBEAT_S
# Seconds between writing a lease and reading it back to confirm it was not overwritten meanwhile.
SETTLE_S = 1.0


class LeaseError(RuntimeError):
    """The run root is held by another driver, or this driver lost it."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, since when, and when it last said it was alive (UTC ISO times)."""

    host: str
    pid: int
    started_at: str
    heartbeat_at: str

    def is_me(self) -> bool:
        return (self.host, self.pid) == (socket.gethostname(), os.getpid())

    def heartbeat_age_s(self) -> float:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(self.heartbeat_at)).total_seconds()

    def is_dead_here(self) -> bool:
        """A process of this host that no longer exists (its pid cannot be signalled)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, since {self.started_at}, last heartbeat "
                f"{self.heartbeat_age_s():.0f}s ago")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Lease:
    """The run root's lease for this process: `acquire`, keep alive in the background, `release`.

    Use as a context manager. The same host and pid taking it again is fine (a run re-entered in
    one process, or a lease left by a dead process whose pid this one now has).
    """

    def __init__(self, run: RunRoot, *, heartbeat_s: float | None = None, stale_after_s: float | None = None,
                 settle_s: float | None = None):
        """The timings default to the module constants at the time of the call (tests shorten them)."""
        self.run = run
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.stale_after_s = STALE_AFTER_S if stale_after_s is None else stale_after_s
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        self.holder: Holder | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> Holder | None:
        """The lease's current holder, or None when no driver holds the run root."""
        if not self.run.exists(LEASE):
            return None
        text = self.run.read_text(LEASE)
        try:
            holder = Holder(**json.loads(text))
            holder.heartbeat_age_s()  # a time it cannot compare is as unreadable as bad JSON
        except (ValueError, TypeError) as err:
            raise LeaseError(f"cannot read the lease {self.run.join(LEASE)} ({err}); if no driver is running "
                             f"on this run root, delete that file") from err
        return holder

    def _write(self, holder: Holder) -> None:
        self.run.write_text(json.dumps(asdict(holder), indent=1), LEASE)

    def acquire(self) -> None:
        """Take the lease, or raise LeaseError naming the driver that holds it."""
        current = self.read()
        if current is not None and not current.is_me():
            if current.is_dead_here():
                log.warning("run root %s: taking over the lease of a driver that is gone (%s)", self.run.uri,
                            current.describe())
            elif current.heartbeat_age_s() > self.stale_after_s:
                log.warning("run root %s: taking over a stale lease (%s; stale after %.0fs)", self.run.uri,
                            current.describe(), self.stale_after_s)
            else:
                raise LeaseError(f"run root {self.run.uri} is in use by another driver ({current.describe()}); "
                                 f"wait for it to finish, or if it is gone, for its lease to go stale "
                                 f"(after {self.stale_after_s:.0f}s without a heartbeat)")
        now = _now()
        mine = Holder(socket.gethostname(), os.getpid(), now, now)
        self._write(mine)
        # Write, wait, read back: of two drivers taking a free or stale lease together, the later write
        # wins and the other sees it here and fails. The race left: a driver that read the old lease,
        # then stalled for more than `settle_s` before writing, can overwrite a lease already confirmed.
        # The heartbeat's own read-back then stops the overwritten driver at its next stage. Closing it
        # needs a conditional write (create-if-absent, compare-and-swap), which pyarrow filesystems lack.
        time.sleep(self.settle_s)
        confirmed = self.read()
        if confirmed is None or not confirmed.is_me():
            taker = confirmed.describe() if confirmed else "someone who then released it"
            raise LeaseError(f"run root {self.run.uri} was taken by another driver at the same time ({taker})")
        self.holder = mine
        self.lost = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="sphuatuo-lease", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        """One heartbeat: if the lease is still this driver's, write the time now into it."""
        if self.holder is None or self.lost:
            return
        current = self.read()
        if current is None:
            log.warning("run root %s: the lease file was removed while this driver held it; writing it again",
                        self.run.uri)
        elif not current.is_me():
            self.lost = f"the lease of run root {self.run.uri} was taken over by another driver ({current.describe()})"
            log.error(self.lost)
            return
        self.holder = Holder(self.holder.host, self.holder.pid, self.holder.started_at, _now())
        self._write(self.holder)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.refresh()
            except Exception as err:  # noqa: BLE001 - a missed heartbeat is retried at the next one
                log.warning("run root %s: lease heartbeat failed (%s: %s)", self.run.uri, type(err).__name__, err)

    def check(self) -> None:
        """Raise LeaseError if another driver has taken the lease (call before writing a stage)."""
        if self.lost:
            raise LeaseError(self.lost)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file, if it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.holder is None:
            return
        self.holder = None
        current = self.read()
        if current is not None and current.is_me():
            self.run.fs.delete_file(self.run.fs_path(LEASE))  # the lease this driver wrote itself

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
