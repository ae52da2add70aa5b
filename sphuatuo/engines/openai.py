"""Any OpenAI-compatible chat endpoint (its completions endpoint for raw prompts), through Ray's own
`ray.data.llm` HTTP processor: `replicas` actors each send their batch's requests, with exponential backoff
on 429/408/5xx and timeouts.

The API key never enters a recipe, a row, the manifest, a log line, a Ray runtime environment (which the
GCS stores and the dashboard shows) or a task argument. The HTTP session that sends it is built inside
each request actor, which finds the key on its node: in the environment variable `api_key_env` (set on
every node, e.g. from a Kubernetes Secret), in the file `api_key_file` (a mounted secret), or, when only
the driver has the variable, behind an object-store reference the driver made with `ray.put`. Whichever way
it came, the actor's `sphuatuo` logger masks it from then on.
"""

from __future__ import annotations

import os
import re
from typing import Any

import aiohttp
import ray
import ray.data
from ray.data.llm import HttpRequestProcessorConfig, build_processor

from sphuatuo.engines import Request, row_seed
from sphuatuo.recipe import EngineConfig
from sphuatuo.store import secrets
from sphuatuo.store.runtime import LIGHT_CPUS


class ChatSession:
    """Builds the aiohttp session inside each request actor: a picklable factory that holds no key, only where
    the actor finds it (see the module's docstring)."""

    def __init__(self, api_key_env: str | None, api_key_file: str | None, key_ref: ray.ObjectRef | None,
                 timeout_s: float):
        self.api_key_env = api_key_env
        self.api_key_file = api_key_file
        self.key_ref = key_ref
        self.timeout_s = timeout_s

    def api_key(self) -> str | None:
        """The key as this process finds it; from then on this process's logs mask it, however it came."""
        key = self._find_key()
        if key:
            secrets.hold(key)
        return key

    def _find_key(self) -> str | None:
        if self.api_key_env and os.environ.get(self.api_key_env):
            return os.environ[self.api_key_env]
        if self.api_key_file:
            try:
                with open(self.api_key_file, encoding="utf-8") as f:
                    return f.read().strip()
            except OSError as err:
                raise RuntimeError(f"cannot read the API key file {self.api_key_file} where the request actor runs: "
                                   f"{type(err).__name__}") from None
        if self.key_ref is not None:
            return ray.get(self.key_ref)
        if self.api_key_env:
            raise RuntimeError(f"the API key variable {self.api_key_env} is set neither on the node the request actor "
                               "runs on nor in the driver; set it on every node or use api_key_file")
        return None

    def __call__(self) -> aiohttp.ClientSession:
        key = self.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout_s))


def _payload(row: dict[str, Any], model: str, request: Request, server: str) -> dict[str, Any]:
    """The chat request (a completions request for a raw `prompt`); server extensions (vLLM's, SGLang's) only
    go to servers declared to have them."""
    payload: dict[str, Any] = {"model": model, "temperature": request.temperature, "top_p": request.top_p,
                               "max_tokens": request.max_tokens}
    if request.seed is not None:
        payload["seed"] = row_seed(request, row)
    if "prompt" in row:
        return {**payload, "prompt": row["prompt"]}
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    payload["messages"] = messages
    extended = server in ("vllm", "sglang")
    if messages[-1]["role"] == "assistant" and extended:
        # Continue a prefilled reply: vLLM and SGLang servers take these chat-template switches.
        payload.update(continue_final_message=True, add_generation_prompt=False)
    if request.allowed_token_ids and server == "vllm":
        payload["allowed_token_ids"] = list(request.allowed_token_ids)
    if request.verdict_words and request.verdict_via == "choice":
        if server == "vllm":
            payload["structured_outputs"] = {"choice": list(request.verdict_words)}
        elif server == "sglang":
            payload["regex"] = "(" + "|".join(re.escape(word) for word in request.verdict_words) + ")"
    if request.verdict_words and request.verdict_via == "logprobs":
        payload.update(logprobs=True, top_logprobs=20)
    return payload


def likelier_word(choice: dict[str, Any], words: tuple[str, ...]) -> str | None:
    """Of `words`, the one the first generated token most likely begins (the standard API's top_logprobs)."""
    content = (choice.get("logprobs") or {}).get("content") or []
    if not content:
        return None
    candidates = sorted(content[0].get("top_logprobs") or [], key=lambda c: -c["logprob"])
    for candidate in candidates:
        token = candidate["token"].strip().lower()
        for word in words:
            if token and word.lower().startswith(token):
                return word
    return None


def reply_columns(response: Any, url: str, request: Request, *, raw: bool) -> dict[str, Any]:
    """The generation columns of one server reply. A reply that carries no completion (an error body, no
    choices, a choice without its text) is a row error: kept with the server's words, retried, counted."""
    choices = response.get("choices") if isinstance(response, dict) else None
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    text = choice.get("text") if raw else (choice.get("message") or {}).get("content")
    if not isinstance(text, str):
        problem = (f"answered without choices: {response.get('error') or response}"
                   if isinstance(response, dict) and not choices else f"answered without a completion: {response}")
        return {"generated_text": "", "num_input_tokens": 0, "num_generated_tokens": 0, "finish_reason": "error",
                "engine_error": f"{url} {problem}"[:1000]}
    if request.verdict_words and request.verdict_via == "logprobs":
        text = likelier_word(choice, request.verdict_words) or text
    usage = response.get("usage") or {}
    return {"generated_text": text, "num_input_tokens": int(usage.get("prompt_tokens") or 0),
            "num_generated_tokens": int(usage.get("completion_tokens") or 0),
            "finish_reason": "length" if choice.get("finish_reason") == "length" else "stop", "engine_error": None}


def generate_openai(ds: ray.data.Dataset, engine: EngineConfig, request: Request, model: str, *,
                    raw: bool = False) -> ray.data.Dataset:
    """`raw`: rows carry a `prompt` for the completions endpoint (no chat template), else `messages` for the chat
    endpoint."""
    if raw and request.verdict_words:
        raise ValueError("a one-token verdict is read from the chat endpoint; raw prompts go to completions")
    url = f"{engine.base_url.rstrip('/')}/{'completions' if raw else 'chat/completions'}"
    input_columns = set(ds.columns())

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "payload": _payload(row, model, request, engine.server)}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        out = {key: value for key, value in row.items() if key in input_columns}
        return {**out, **reply_columns(row["http_response"], url, request, raw=raw)}

    # Only the driver has the key: once into the object store, fetched by the actors (never a runtime env).
    key_ref = None
    if engine.api_key_env and engine.api_key_env in os.environ and not engine.api_key_file:
        key_ref = ray.put(os.environ[engine.api_key_env])
    config = HttpRequestProcessorConfig(
        url=url,
        batch_size=engine.batch_size,
        concurrency=engine.replicas,
        qps=engine.qps,
        max_retries=engine.max_retries,
        base_retry_wait_time_in_s=1.0,
        session_factory=ChatSession(engine.api_key_env, engine.api_key_file, key_ref, engine.request_timeout_s),
        http_request_stage={"num_cpus": LIGHT_CPUS},
    )
    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess,
                                preprocess_map_kwargs={"num_cpus": LIGHT_CPUS},
                                postprocess_map_kwargs={"num_cpus": LIGHT_CPUS})
    return processor(ds)
