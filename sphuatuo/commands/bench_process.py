"""A benchmark's line in a process of its own: `python [LAUNCHER] -m MODULE SPEC RECORD`, the spec and the record
JSON files, the process given the environment of the worker it stands beside (threads, allocator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def run_in_own_process(module: str, spec: dict[str, Any], environment: dict[str, str],
                       launcher: Sequence[str] = ()) -> tuple[dict[str, Any], float]:
    """The record the module wrote, and the wall seconds, process start and imports included. `environment` is set
    over this process's own."""
    with tempfile.TemporaryDirectory(prefix="sphuatuo-bench-") as folder:
        spec_path, record_path = Path(folder, "spec.json"), Path(folder, "record.json")
        spec_path.write_text(json.dumps(spec))
        started = time.perf_counter()
        # The process's logs go to stderr: stdout carries the table.
        subprocess.run([sys.executable, *launcher, "-m", module, str(spec_path), str(record_path)],
                       env={**os.environ, **environment}, stdout=sys.stderr, check=True)
        wall = time.perf_counter() - started
        return json.loads(record_path.read_text()), wall
