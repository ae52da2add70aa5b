"""Row-level progress of a generation pass: rows done of total, rows/s, output tokens/s and ETA.

A tqdm bar when the driver has a terminal; otherwise (under `ray job submit`, in CI) a log line every
`every_s` seconds, so the job's log shows how far a ten-hour teacher pass has got. Ray Data's own bars
count blocks per operator; this one counts the rows that reached the run root.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger("sphuatuo")


@dataclass(frozen=True)
class Throughput:
    rows: int
    output_tokens: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class RowProgress:
    def __init__(self, label: str, total: int, *, every_s: float = 30.0, interactive: bool | None = None):
        self.label = label
        self.total = total
        self.every_s = every_s
        self.rows = 0
        self.output_tokens = 0
        self.started = time.perf_counter()
        self._last_log = self.started
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = tqdm(total=total, desc=label, unit="row", dynamic_ncols=True) if interactive else None

    def update(self, rows: int, output_tokens: int = 0) -> None:
        self.rows += rows
        self.output_tokens += output_tokens
        if self._bar is not None:
            self._bar.update(rows)
            self._bar.set_postfix_str(f"{self.throughput().tokens_per_s:.0f} tok/s", refresh=False)
        now = time.perf_counter()
        if self._bar is None and now - self._last_log >= self.every_s:
            self._last_log = now
            log.info(self.status())

    def throughput(self) -> Throughput:
        return Throughput(self.rows, self.output_tokens, time.perf_counter() - self.started)

    def eta_s(self) -> float | None:
        rate = self.throughput().rows_per_s
        return (self.total - self.rows) / rate if rate > 0 else None

    def status(self) -> str:
        done = self.throughput()
        eta = self.eta_s()
        share = self.rows / self.total if self.total else 1.0
        return (f"{self.label}: {self.rows}/{self.total} rows ({share:.0%}), {done.rows_per_s:.2f} rows/s, "
                f"{done.tokens_per_s:.0f} output tok/s, ETA {format_duration(eta) if eta is not None else '?'}")

    def close(self) -> Throughput:
        if self._bar is not None:
            self._bar.close()
        done = self.throughput()
        log.info("%s: %d rows in %s, %.2f rows/s, %.0f output tok/s", self.label, done.rows,
                 format_duration(done.seconds), done.rows_per_s, done.tokens_per_s)
        return done
