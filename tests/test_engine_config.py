"""What a recipe's engine section becomes in Ray's `ray.data.llm` vLLM processor config: every knob a
vLLM user sets reaches the engine or the actor pool, and GPU-only settings stay off CPU engines."""

from __future__ import annotations

from sphuatuo.engines import Request, row_seed
from sphuatuo.engines.vllm import processor_config
from sphuatuo.recipe import EngineConfig


def test_gpu_engine_knobs_reach_the_processor() -> None:
    engine = EngineConfig(model="/models/qwq-32b", replicas=[1, 4], tensor_parallel_size=2, gpus_per_replica=1,
                          batch_size=32, max_concurrent_batches=4, gpu_memory_utilization=0.85,
                          enable_prefix_caching=False, accelerator_type="H100", max_model_len=16384,
                          dtype="bfloat16", engine_kwargs={"max_num_seqs": 128})
    config = processor_config(engine, "/models/qwq-32b", seed=0)
    assert config.get_concurrency() == {"min_size": 1, "max_size": 4}
    assert (config.batch_size, config.max_concurrent_batches, config.accelerator_type) == (32, 4, "H100")
    kwargs = config.engine_kwargs
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["gpu_memory_utilization"] == 0.85
    assert kwargs["enable_prefix_caching"] is False and kwargs["max_model_len"] == 16384
    assert kwargs["max_num_seqs"] == 128 and kwargs["dtype"] == "bfloat16"
    assert kwargs["enforce_eager"] is False and "seed" not in kwargs  # GPUs seed each request
    assert config.runtime_env is None


def test_cpu_engine_is_eager_seeded_engine_wide_and_threads_its_share() -> None:
    engine = EngineConfig(model="builtin:tiny", cpus_per_replica=1, cpu_threads=2)
    config = processor_config(engine, "/cache/tiny", seed=7)
    kwargs = config.engine_kwargs
    assert kwargs["enforce_eager"] is True and kwargs["seed"] == 7 and "gpu_memory_utilization" not in kwargs
    assert config.runtime_env["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert config.get_concurrency(autoscaling_enabled=False) == {"size": 1}


def test_each_sample_of_a_question_gets_its_own_seed() -> None:
    request = Request(temperature=0.7, top_p=0.9, max_tokens=16, seed=100)
    assert [row_seed(request, {"sample": k}) for k in range(3)] == [100, 101, 102]
    assert row_seed(request, {}) == 100
    assert row_seed(Request(temperature=0.0, top_p=1.0, max_tokens=16), {"sample": 2}) is None


def test_scheduler_limits_are_the_device_kinds_vllm_defaults_unless_the_recipe_sets_them() -> None:
    cpu = processor_config(EngineConfig(model="builtin:tiny"), "/cache/tiny", seed=0).engine_kwargs
    assert (cpu["max_num_seqs"], cpu["max_num_batched_tokens"]) == (256, 4096)
    h100 = EngineConfig(model="m", gpus_per_replica=1, tensor_parallel_size=2, accelerator_type="H100")
    assert h100.scheduler_limits == (1024, 16384)
    assert EngineConfig(model="m", gpus_per_replica=1, accelerator_type="A100-80G").scheduler_limits == (256, 8192)
    assert EngineConfig(model="m", gpus_per_replica=1, max_num_seqs=64).scheduler_limits == (64, 8192)
    legacy = EngineConfig(model="m", gpus_per_replica=1, engine_kwargs={"max_num_batched_tokens": 4096})
    assert legacy.scheduler_limits == (256, 4096)


def test_server_extensions_go_only_to_servers_that_have_them() -> None:
    from sphuatuo.engines.openai import _payload

    row = {"messages": [{"role": "user", "content": "Is it 1 or 2?"}, {"role": "assistant", "content": "<think>"}]}
    judged = Request(temperature=0.0, top_p=1.0, max_tokens=1, allowed_token_ids=(16, 17), verdict_words=("1", "2"),
                     verdict_via="logprobs")
    hosted = _payload(row, "gpt-4o", judged, "openai")
    assert hosted["logprobs"] is True and hosted["top_logprobs"] == 20
    extensions = {"continue_final_message", "add_generation_prompt", "allowed_token_ids", "structured_outputs"}
    assert not extensions & set(hosted)
    vllm = _payload(row, "m", judged, "vllm")
    assert vllm["continue_final_message"] is True and vllm["allowed_token_ids"] == [16, 17]
    choice = Request(temperature=0.0, top_p=1.0, max_tokens=8, verdict_words=("True", "False"), verdict_via="choice")
    assert _payload(row, "m", choice, "vllm")["structured_outputs"] == {"choice": ["True", "False"]}
    assert _payload(row, "m", choice, "sglang")["regex"] == "(True|False)"


def test_the_likelier_verdict_word_is_read_from_the_top_logprobs() -> None:
    from sphuatuo.engines.openai import likelier_word

    def choice(*tokens: tuple[str, float]) -> dict:
        return {"logprobs": {"content": [{"top_logprobs": [{"token": t, "logprob": p} for t, p in tokens]}]}}

    assert likelier_word(choice(("The", -0.1), (" 2", -1.5), ("1", -2.0)), ("1", "2")) == "2"
    assert likelier_word(choice(("Tr", -0.3), ("False", -0.5)), ("True", "False")) == "True"
    assert likelier_word(choice(("maybe", -0.1)), ("1", "2")) is None
    assert likelier_word({"logprobs": None}, ("1", "2")) is None


def test_a_server_reply_without_a_completion_is_a_row_error_with_the_servers_words() -> None:
    from sphuatuo.engines.openai import reply_columns

    url, plain = "http://server/v1/chat/completions", Request(temperature=0.0, top_p=1.0, max_tokens=8)
    good = reply_columns({"choices": [{"message": {"content": "B"}, "finish_reason": "length"}],
                          "usage": {"prompt_tokens": 9, "completion_tokens": 8}}, url, plain, raw=False)
    assert good == {"generated_text": "B", "num_input_tokens": 9, "num_generated_tokens": 8,
                    "finish_reason": "length", "engine_error": None}
    assert reply_columns({"choices": [{"text": "B"}]}, url, plain, raw=True)["generated_text"] == "B"
    malformed = {
        "error body": ({"error": {"message": "model overloaded"}}, "answered without choices: {'message': 'model "
                                                                   "overloaded'}"),
        "empty choices": ({"choices": []}, "answered without choices"),
        "no message": ({"choices": [{"index": 0, "finish_reason": "stop"}]}, "answered without a completion"),
        "refusal": ({"choices": [{"message": {"content": None, "refusal": "I can't"}}]}, "'refusal': \"I can't\""),
        "not an object": (["B"], "answered without a completion: ['B']"),
    }
    for case, (response, words) in malformed.items():
        columns = reply_columns(response, url, plain, raw=False)
        assert columns["finish_reason"] == "error" and columns["generated_text"] == "", case
        assert columns["engine_error"].startswith(url) and words in columns["engine_error"], case
    # A chat reply is no completions reply.
    assert reply_columns({"choices": [{"message": {"content": "B"}}]}, url, plain, raw=True)["finish_reason"] == "error"


def test_a_hosted_judge_needs_no_tokenizer_and_refuses_token_ids() -> None:
    import pytest
    from pydantic import ValidationError

    from sphuatuo.passes.verdict import answer_judge, verdict_request
    from sphuatuo.recipe import JudgeConfig

    hosted = EngineConfig(backend="openai", model="gpt-4o", base_url="https://api.openai.com/v1")
    request = verdict_request(JudgeConfig(kind="llm", engine=hosted), answer_judge("self_play/judge"))
    assert (request.verdict_via, request.max_tokens, request.allowed_token_ids) == ("logprobs", 1, None)
    with pytest.raises(ValidationError, match="needs a local engine"):
        JudgeConfig(kind="llm", engine=hosted, constrain="token_ids")
    with pytest.raises(ValidationError, match="needs a server that offers it"):
        JudgeConfig(kind="llm", engine=hosted, constrain="choice")
    server = hosted.model_copy(update={"server": "vllm"})
    assert JudgeConfig(kind="llm", engine=server).constraint == "choice"
    assert JudgeConfig(kind="llm", engine=EngineConfig(model="builtin:tiny")).constraint == "token_ids"
