"""Engines that stay up: one per model and engine arguments, shared by every pass of a run that uses it.

A run starts an engine the first time a pass asks for its model and keeps it for the passes and stages that
follow: the teacher that is also the judge, the student that answers, corrects itself and is evaluated. Engines
are keyed by the model and every engine argument; the seed is not part of the key (see `generate_served`).
Two hosts, both fed by Ray Data so rows still stream: on GPUs a Ray Serve LLM app per engine, reached through
`ray.data.llm`'s serve-deployment processor (autoscaling between `replicas: [min, max]`); on CPU nodes plain Ray
actors holding vLLM's engine (`sphuatuo.engines.actors`, which says why). `ray.engine_host` overrides the choice.

Engines hold the devices a trainer needs, so the pipeline releases them all before a training stage, and
`EngineServices` evicts the least recently used engine when a new one would not fit in the cluster beside the
engines already up (its cores and devices, counted by the run: CPU replicas on actors hold no cores in Ray, see
`host_options`). A released CPU replica keeps its process, vLLM imported, for the run's next engine of the same
host options (`sphuatuo.engines.actors` measures it); the run closes them all at its end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar

import ray
import ray.data
from ray.data.llm import ServeDeploymentProcessorConfig, build_processor

from sphuatuo.engines import Request, cpu_runtime_env, row_seed, sampling_params
from sphuatuo.engines.actors import (
    EngineSpec,
    alive,
    generate_on_replicas,
    host_options,
    launch_replicas,
    start_replicas,
    stop_replicas,
    unload_replicas,
)
from sphuatuo.recipe import EngineConfig
from sphuatuo.store.runtime import LIGHT_CPUS

log = logging.getLogger("sphuatuo")


@dataclass
class EngineStart:
    """One engine started for a run: which model, for which pass, and how long it took to come up."""

    model: str
    folder: str
    seconds: float
    kept_process: bool = False  # loaded into the process of a released replica, not a new one


@dataclass
class PlannedEngine:
    """The engine a pass to come will ask for (the arguments of `EngineServices.generate`)."""

    engine: EngineConfig
    model: str
    model_path: str
    engine_kwargs: dict[str, Any]
    folder: str


@dataclass
class _App:
    """A Serve app of one engine."""

    name: str
    deployment: str


@dataclass
class _KeptEngine:
    model: str
    resources: dict[str, float]
    used: bool = False  # an engine started ahead counts its first pass as its start, not as a reuse
    app: _App | None = None  # hosted by Ray Serve
    replicas: list[ray.actor.ActorHandle] = field(default_factory=list)  # hosted by plain actors
    spec: EngineSpec | None = None  # what the actors hold
    host: str = ""  # their host options (`_host_key`): a released CPU replica hosts later engines of equal ones


@dataclass
class EngineServices:
    """The run's engines, by key; a log of starts and reuses that the pipeline moves into each stage's record.
    `host`: "auto" (Serve on GPUs, actors on CPU), "serve" or "actors"."""

    host: str = "auto"
    engines: OrderedDict[str, _KeptEngine] = field(default_factory=OrderedDict)
    starts: list[EngineStart] = field(default_factory=list)
    reuses: list[str] = field(default_factory=list)
    released: dict[str, list[ray.actor.ActorHandle]] = field(default_factory=dict)  # kept processes, by host options

    # A driver that runs several runs (a sweep in a notebook, the test suite) may keep this many released CPU replica
    # processes from one run for its next, whose first engines then load without a new process and vLLM's imports
    # (measured on 2 cores: an engine up in 18 s in a new process, 6.5 s for two in kept ones); 0: a run ends its own.
    processes_kept_between_runs: ClassVar[int] = 0
    _between_runs: ClassVar[dict[str, list[ray.actor.ActorHandle]]] = {}

    def __post_init__(self) -> None:
        if self.processes_kept_between_runs:
            self.released = EngineServices._between_runs

    def generate(self, ds: ray.data.Dataset, engine: EngineConfig, request: Request, *, model: str, model_path: str,
                 engine_kwargs: dict[str, Any], raw: bool, folder: str) -> ray.data.Dataset:
        """`ds` through the run's engine for `model_path` with these arguments, started (after evicting what would
        not fit beside it) when no pass of the run has started it yet, or when its replicas died."""
        kept = self._kept(engine, model, model_path, engine_kwargs, folder)
        if kept.app is None:
            return generate_on_replicas(ds, kept.replicas, kept.spec, engine, request)
        return generate_served(ds, kept.app, engine, request, raw=raw)

    def start_ahead(self, planned: list[PlannedEngine]) -> None:
        """Start the engines of the passes to come (`planned`, in the order they run) side by side, as many as fit
        in the cluster at once, evicting only engines no planned pass needs. On CPU an engine's start is mostly
        single-threaded imports, so two starts on two cores take the time of one. Engines on Serve or on GPUs
        start at their first pass, as before."""
        wanted: OrderedDict[str, PlannedEngine] = OrderedDict()
        for plan in planned:
            wanted.setdefault(_engine_key(plan.model_path, plan.engine, plan.engine_kwargs), plan)
        if any(self._host(plan.engine) != "actors" or plan.engine.gpus_per_replica for plan in wanted.values()):
            return
        chosen: list[tuple[str, PlannedEngine]] = []
        promised = {"CPU": 0.0}
        for key, plan in wanted.items():
            if key in self.engines:
                continue
            needed = _replica_resources(plan.engine)
            if not self._make_room(needed, "actors", keep=wanted, promised=promised):
                break
            chosen.append((key, plan))
            promised["CPU"] += needed["CPU"]
        if len(chosen) < 2:
            return  # one engine starts as fast at its first pass
        started = time.perf_counter()
        specs = {key: EngineSpec(key, plan.model_path, plan.engine_kwargs) for key, plan in chosen}
        kept = {key: self._take_released(plan.engine) for key, plan in chosen}
        launched = {key: launch_replicas(plan.engine, specs[key], kept[key]) for key, plan in chosen}
        ray.get([loading for _, refs in launched.values() for loading in refs])
        seconds = round(time.perf_counter() - started, 1)
        for key, plan in chosen:
            self.engines[key] = _KeptEngine(model=plan.model, resources=_replica_resources(plan.engine),
                                            replicas=launched[key][0], spec=specs[key], host=_host_key(plan.engine))
            self.starts.append(EngineStart(model=plan.model, folder=plan.folder, seconds=seconds,
                                           kept_process=bool(kept[key])))
        reused = sum(bool(processes) for processes in kept.values())
        log.info("engines for %s up side by side in %.1fs (kept for later passes; %d in kept processes)",
                 ", ".join(plan.model for _, plan in chosen), seconds, reused)

    def release_all(self) -> None:
        """Shut every engine down (before a trainer needs the devices); CPU replicas keep their processes."""
        while self.engines:
            self._release(next(iter(self.engines)))

    def close(self) -> None:
        """Shut every engine down and end every replica process (at the end of a run), but the most recently released
        ones the driver keeps for its next run (`processes_kept_between_runs`)."""
        self.release_all()
        idle = [(host, replica) for host, replicas in self.released.items() for replica in replicas]
        for host, replica in idle[:max(0, len(idle) - self.processes_kept_between_runs)]:
            self.released[host].remove(replica)
            ray.kill(replica)  # idle: its engine was shut down when it was released

    @classmethod
    def end_processes_kept_between_runs(cls) -> None:
        """End the replica processes the driver kept from its earlier runs."""
        for replicas in cls._between_runs.values():
            for replica in replicas:
                ray.kill(replica)
        cls._between_runs.clear()

    def take_log(self) -> dict[str, Any]:
        """The starts and reuses since the last call, for a stage's record."""
        entry = {"starts": [start.__dict__ for start in self.starts], "reuses": len(self.reuses)}
        self.starts, self.reuses = [], []
        return entry

    def _kept(self, engine: EngineConfig, model: str, model_path: str, engine_kwargs: dict[str, Any],
              folder: str) -> _KeptEngine:
        key = _engine_key(model_path, engine, engine_kwargs)
        if key in self.engines:
            kept = self.engines[key]
            if kept.app is not None or alive(kept.replicas):
                self.engines.move_to_end(key)
                if kept.used:
                    self.reuses.append(folder)
                kept.used = True
                return kept
            log.warning("%s: the engine kept for %s died (restarts spent); starting a new one", folder, model)
            self._release(key)
        resources, host = _replica_resources(engine), self._host(engine)
        self._make_room(resources, host)
        started = time.perf_counter()
        kept = _KeptEngine(model=model, resources=resources, used=True)
        processes: list[ray.actor.ActorHandle] = []
        if host == "serve":
            kept.app = _App(name=f"sphuatuo-{key}", deployment=f"engine-{key}")
            _start_app(kept.app, engine, model_path, engine_kwargs)
        else:
            kept.spec, kept.host = EngineSpec(key, model_path, engine_kwargs), _host_key(engine)
            processes = self._take_released(engine)
            kept.replicas = start_replicas(engine, kept.spec, processes)
        self.starts.append(EngineStart(model=model, folder=folder, seconds=round(time.perf_counter() - started, 1),
                                       kept_process=bool(processes)))
        log.info("%s: engine for %s up in %.1fs (kept for later passes%s)", folder, model, self.starts[-1].seconds,
                 "; in a kept process" if processes else "")
        self.engines[key] = kept
        return kept

    def _host(self, engine: EngineConfig) -> str:
        if self.host != "auto":
            return self.host
        return "serve" if engine.gpus_per_replica > 0 else "actors"

    def _make_room(self, needed: dict[str, float], host: str, keep: Collection[str] = (),
                   promised: dict[str, float] | None = None) -> bool:
        """Evict the least recently used engines, never those in `keep`, until `needed` fits in the cluster beside
        the engines left and the resources `promised` to engines about to start; whether it fits."""
        total = ray.cluster_resources()
        if host == "serve" or "GPU" in needed or any(kept.app is not None or "GPU" in kept.resources
                                                      for kept in self.engines.values()):
            # Engines that hold their cores in Ray (Serve's placement groups, GPU replicas) leave one CPU free for
            # the light steps of a pass (prompts, request senders, writes); CPU replicas on actors hold none.
            total["CPU"] = total.get("CPU", 0) - 1
        promised = promised or {}
        while True:
            held = {name: sum(kept.resources.get(name, 0) for kept in self.engines.values()) + promised.get(name, 0)
                    for name in needed}
            if all(held[name] + amount <= total.get(name, 0) for name, amount in needed.items()):
                return True
            spare = [key for key in self.engines if key not in keep]
            if not spare:
                return False
            self._release(spare[0])  # least recently used first

    def _release(self, key: str) -> None:
        kept = self.engines.pop(key)
        if kept.app is not None:
            from ray import serve

            serve.delete(kept.app.name)
        elif "GPU" in kept.resources:
            stop_replicas(kept.replicas)  # a new process per engine: GPU memory is surely freed with it
        else:
            # Most recently released last, as `close` keeps them.
            self.released[kept.host] = [*self.released.pop(kept.host, []), *unload_replicas(kept.replicas)]
        log.info("engine for %s shut down", kept.model)

    def _take_released(self, engine: EngineConfig) -> list[ray.actor.ActorHandle]:
        """Processes of released CPU replicas that can host `engine`'s replicas (as many as it starts)."""
        if engine.gpus_per_replica:
            return []
        pool = self.released.get(_host_key(engine), [])
        taken = []
        while pool and len(taken) < engine.min_replicas:
            replica = pool.pop()
            if alive([replica]):
                taken.append(replica)
            else:
                ray.kill(replica)
        return taken


def _engine_key(model_path: str, engine: EngineConfig, engine_kwargs: dict[str, Any]) -> str:
    kwargs = {name: value for name, value in engine_kwargs.items() if name != "seed"}
    placement = (engine.replicas, engine.cpus_per_replica, engine.gpus_per_replica, engine.cpu_threads,
                 engine.accelerator_type)
    text = json.dumps([model_path, kwargs, placement], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _host_key(engine: EngineConfig) -> str:
    return json.dumps(host_options(engine), sort_keys=True, default=str)


def _replica_resources(engine: EngineConfig) -> dict[str, float]:
    resources = {"CPU": engine.cpus_per_replica * engine.min_replicas}
    if engine.gpus_per_replica:
        resources["GPU"] = engine.gpus_per_replica * engine.tensor_parallel_size * engine.min_replicas
    return resources


def _start_app(app: _App, engine: EngineConfig, model_path: str, engine_kwargs: dict[str, Any]) -> None:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_llm_deployment

    on_gpu = engine.gpus_per_replica > 0
    if isinstance(engine.replicas, int):
        scaling: dict[str, Any] = {"num_replicas": engine.replicas}
    else:
        low, high = engine.replicas
        scaling = {"autoscaling_config": {"min_replicas": low, "initial_replicas": low, "max_replicas": high}}
    config = LLMConfig(
        model_loading_config={"model_id": app.deployment, "model_source": model_path},
        engine_kwargs=engine_kwargs,
        accelerator_type=engine.accelerator_type,
        # On CPU the engine's one bundle is its cores; on GPUs Serve LLM sizes the bundles from the parallelism.
        **({} if on_gpu else {"placement_group_config": {"bundles": [{"CPU": engine.cpus_per_replica}]},
                              "runtime_env": cpu_runtime_env(engine)}),
        deployment_config={"name": app.deployment, **scaling, "ray_actor_options": {"num_cpus": 0}},
        log_engine_metrics=False,
    )
    # Rows reach the engines through deployment handles: no HTTP proxy (and no port 8000 to hold on each node).
    serve.start(proxy_location="Disabled")
    serve.run(build_llm_deployment(config, override_serve_options={"name": app.deployment}), name=app.name,
              route_prefix=None)


def generate_served(ds: ray.data.Dataset, app: _App, engine: EngineConfig, request: Request, *,
                    raw: bool) -> ray.data.Dataset:
    """Send each row to the app as an OpenAI chat (or, for raw prompts, completion) request.

    On GPUs each row carries its own seed. On CPU the engine was seeded when it started, because vLLM-CPU
    crashes on per-request seeds once a prompt is prefilled in chunks: samples are reproducible per engine
    start, not per row.
    """
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    on_gpu = engine.gpus_per_replica > 0
    input_columns = set(ds.columns())

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        seed = row_seed(request, row) if on_gpu else None
        params = {"model": app.deployment, "stream": False, **sampling_params(request, seed)}
        if raw:
            call = {"method": "completions", "dtype": "CompletionRequest",
                    "request_kwargs": {**params, "prompt": row["prompt"]}}
        else:
            messages = [{"role": turn["role"], "content": turn["content"]} for turn in row["messages"]]
            prefilled = messages[-1]["role"] == "assistant"  # the reply continues the assistant's turn
            call = {"method": "chat", "dtype": "ChatCompletionRequest",
                    "request_kwargs": {**params, "messages": messages, "add_generation_prompt": not prefilled,
                                       "continue_final_message": prefilled}}
        return {**row, **call}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {key: value for key, value in row.items() if key in input_columns}
        choices = row.get("choices")
        if row.get("error") or choices is None or not len(choices):
            return {**out, "generated_text": "", "num_input_tokens": 0, "num_generated_tokens": 0,
                    "finish_reason": "error", "engine_error": str(row.get("error") or "no choices in the reply")}
        choice = choices[0]
        text = choice["text"] if raw else choice["message"]["content"]
        usage = row["usage"]
        return {**out, "generated_text": text or "", "num_input_tokens": int(usage["prompt_tokens"]),
                "num_generated_tokens": int(usage["completion_tokens"] or 0),
                "finish_reason": "length" if choice["finish_reason"] == "length" else "stop", "engine_error": None}

    def settle(row: dict[str, Any]) -> dict[str, Any]:
        """Rows that failed in the request (they skip `postprocess`) get the same columns, as errors."""
        error = row.pop("__inference_error__", "")
        if not error:
            return row
        out = {key: value for key, value in row.items() if key in input_columns}
        return {**out, "generated_text": "", "num_input_tokens": 0, "num_generated_tokens": 0,
                "finish_reason": "error", "engine_error": error}

    processor = build_processor(
        ServeDeploymentProcessorConfig(
            deployment_name=app.deployment, app_name=app.name, batch_size=engine.batch_size,
            concurrency=engine.max_replicas, should_continue_on_error=True,
            dtype_mapping={"ChatCompletionRequest": ChatCompletionRequest, "CompletionRequest": CompletionRequest}),
        preprocess=preprocess, postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": LIGHT_CPUS}, postprocess_map_kwargs={"num_cpus": LIGHT_CPUS})
    # The request senders wait on the engines: a sliver of a CPU each, so they never wait for the engines' cores.
    for stage in processor.stages.values():
        stage.map_batches_kwargs["num_cpus"] = LIGHT_CPUS
        stage.map_batches_kwargs["max_concurrency"] = engine.max_concurrent_batches
    return processor(ds).map(settle, num_cpus=LIGHT_CPUS)
