"""transformers `generate` in a Ray Data actor pool: batched, left-padded, the model's chat template (or a
raw `prompt`, tokenised as it is).

For tiny CPU runs and for models vLLM cannot serve. Per-row seeds are not honoured (one torch seed
per batch); use the vllm back-end where exact per-request seeding matters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray.data
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

from sphuatuo.engines import Request, cpu_runtime_env
from sphuatuo.engines.precision import engine_dtype
from sphuatuo.recipe import EngineConfig

_DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class AllowedTokens(LogitsProcessor):
    """Constrain decoding to a fixed set of token ids (the one-token judge's "1"/"2")."""

    def __init__(self, token_ids: tuple[int, ...]):
        self.token_ids = torch.tensor(token_ids)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.token_ids] = scores[:, self.token_ids]
        return masked


class HFChatGenerator:
    """A Ray Data callable class: one model per actor, one `generate` per batch."""

    def __init__(self, model_path: str, dtype: str, request: Request, trust_remote_code: bool):
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, padding_side="left",
                                                       trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype],
                                                          trust_remote_code=trust_remote_code).eval()
        self.request = request
        self.eos_ids = {self.tokenizer.eos_token_id, *np.atleast_1d(self.model.generation_config.eos_token_id or [])}

    def _chat(self, messages: list[dict[str, str]]) -> str:
        """The chat as text in the model's template; a chat ending in an assistant turn is a prefilled reply
        to continue (as ray.data.llm does)."""
        prefilled = messages[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(
            [{"role": m["role"], "content": m["content"]} for m in messages],
            tokenize=False,
            add_generation_prompt=not prefilled,
            continue_final_message=prefilled,
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        request = self.request
        raw = "prompt" in batch
        prompts = [str(text) for text in batch["prompt"]] if raw else [self._chat(m) for m in batch["messages"]]
        # A chat template writes its own special tokens; raw text gets the tokenizer's (a BOS), as vLLM gives it.
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=raw)
        sampling = request.temperature > 0
        if request.seed is not None:
            torch.manual_seed(request.seed)
        constrained = [AllowedTokens(request.allowed_token_ids)] if request.allowed_token_ids else []
        processors = LogitsProcessorList(constrained)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=request.max_tokens,
                do_sample=sampling,
                temperature=request.temperature if sampling else None,
                top_p=request.top_p if sampling else None,
                top_k=None,
                logits_processor=processors,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        completions = output[:, inputs["input_ids"].shape[1]:]
        texts, generated, finish = [], [], []
        for row in completions.tolist():
            tokens = []
            for token in row:
                if token in self.eos_ids:
                    break
                tokens.append(token)
            # A reply that stopped on its own ends with an eos token inside the budget.
            stopped = len(tokens) < len(row) and row[len(tokens)] in self.eos_ids
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
            generated.append(len(tokens) + (1 if stopped else 0))
            finish.append("stop" if stopped else "length")
        out = {key: value for key, value in batch.items()}
        out["generated_text"] = np.array(texts, dtype=object)
        out["num_input_tokens"] = inputs["attention_mask"].sum(dim=1).numpy()
        out["num_generated_tokens"] = np.array(generated)
        out["finish_reason"] = np.array(finish, dtype=object)
        return out


def generate_hf(ds: ray.data.Dataset, engine: EngineConfig, request: Request, model_path: str) -> ray.data.Dataset:
    return ds.map_batches(
        HFChatGenerator,
        fn_constructor_kwargs={"model_path": model_path, "dtype": engine_dtype(engine), "request": request,
                               "trust_remote_code": engine.trust_remote_code},
        batch_size=engine.batch_size,
        concurrency=engine.replicas,
        num_cpus=engine.cpus_per_replica,
        num_gpus=engine.gpus_per_replica,
        runtime_env=None if engine.gpus_per_replica else cpu_runtime_env(engine),
        max_restarts=engine.max_restarts,
    )
