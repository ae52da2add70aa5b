"""Row-level progress of a generation pass, as a job log shows it (no terminal)."""

from __future__ import annotations

import logging

import pytest

from sphuatuo.store.progress import RowProgress, format_duration


def test_log_lines_give_rows_done_rate_and_eta(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    clock = iter([0.0, 10.0, 10.0, 10.0, 40.0, 40.0, 40.0, 40.0, 40.0])
    monkeypatch.setattr("sphuatuo.store.progress.time.perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="sphuatuo")
    progress = RowProgress("teacher_cot/first_generated", total=100, every_s=5, interactive=False)
    progress.update(25, output_tokens=2500)  # t = 10 s
    assert caplog.messages[-1] == ("teacher_cot/first_generated: 25/100 rows (25%), 2.50 rows/s, "
                                   "250 output tok/s, ETA 0m30s")
    progress.update(75, output_tokens=7500)  # t = 40 s
    done = progress.close()
    assert (done.rows, done.output_tokens, done.seconds) == (100, 10000, 40.0)
    assert caplog.messages[-1] == "teacher_cot/first_generated: 100 rows in 0m40s, 2.50 rows/s, 250 output tok/s"


def test_durations_read_like_a_progress_bar() -> None:
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 * 2 + 125)] == ["0m00s", "1m00s", "1m01s", "2h02m"]
