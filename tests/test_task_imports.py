"""The modules whose functions Ray Data runs as row-wise tasks (stages, passes, data loaders, the run root's
storage) import neither torch, transformers nor vLLM. A task worker loads a function's module before its first row:
with transformers and torch that took a fresh worker 5-6 s here, and the Self-Play shape run's student answers 12.2 s
instead of 4.1."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import sphuatuo.data
import sphuatuo.passes
import sphuatuo.stages
import sphuatuo.store
from conftest import REPO

HEAVY = ("torch", "transformers", "vllm")


def test_row_wise_modules_leave_torch_transformers_and_vllm_unimported() -> None:
    modules = [module.name for package in (sphuatuo.stages, sphuatuo.passes, sphuatuo.data, sphuatuo.store)
               for module in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    assert "sphuatuo.passes.verdict" in modules and "sphuatuo.stages.huatuo_o1.rl" in modules
    code = ("import importlib, sys\n"
            "for name in sys.argv[2:]: importlib.import_module(name)\n"
            "print(sorted(name for name in sys.argv[1].split(',') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, ",".join(HEAVY), *modules], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"
