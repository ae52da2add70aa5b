"""Both protocols side by side: the Chinese Self-Play prompt family chosen by `prompt_language`, the named
evaluation protocols (their settings, scoring rules and raw prompts), and the report's protocol table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import yaml

from conftest import REPO, tiny_recipe
from sphuatuo.commands.report import write_report
from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.engines.openai import _payload
from sphuatuo.pipeline import recipe_stages, run_pipeline, stage_fingerprint
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import O1Recipe, ProtocolName, SamplingConfig, load_recipe
from sphuatuo.stages import evaluate, questions
from sphuatuo.stages.evaluate import PROTOCOLS, protocol_folder, protocol_label, score
from sphuatuo.stages.self_play.student_answers import student_prompt
from sphuatuo.store.manifest import StageRecord, load_manifest, save_manifest
from sphuatuo.store.run_root import RunRoot

PROMPTS = REPO / "sphuatuo" / "prompts"
SELF_PLAY = list(yaml.safe_load((PROMPTS / "self_play.yaml").read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------
# The Chinese family and prompt_language
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", SELF_PLAY)
def test_every_chinese_template_parses_and_matches_its_english_twin(key: str) -> None:
    english, chinese = get_prompt(f"self_play/{key}"), get_prompt(f"self_play_zh/{key}")
    assert chinese.fields == english.fields and chinese.assistant_prefix == english.assistant_prefix
    assert len(chinese.examples) == len(english.examples)
    values = {field: f"<{field}>" for field in chinese.fields}
    rendered = chinese.render_user(**values)
    assert all(value in rendered for value in values.values())
    messages = chinese.messages(**values)
    assert [m["role"] for m in messages] == [m["role"] for m in english.messages(**values)]
    assert any("\u4e00" <= char <= "\u9fff" for char in (chinese.system or "") + chinese.user)


def test_the_chinese_family_keeps_the_formats_and_says_what_it_is() -> None:
    assert set(yaml.safe_load((PROMPTS / "self_play_zh.yaml").read_text(encoding="utf-8"))) == set(SELF_PLAY)
    header = (PROMPTS / "self_play_zh.yaml").read_text(encoding="utf-8").split("\n\n")[0]
    assert "project's Chinese versions" in header and "NOT the seed's text" in header
    for key in ("teacher_cot", "student_answer", "self_correction", "answer_correction"):
        system = get_prompt(f"self_play_zh/{key}").system or ""
        assert "<think></think>" in system and "<answer></answer>" in system
    judge = get_prompt("self_play_zh/judge")
    assert "1" in judge.system and "2" in judge.system and "{reply}" in judge.user
    # The gold answer shows only through the hint block, which teacher_cot leaves empty unless revealed.
    teacher = get_prompt("self_play_zh/teacher_cot")
    assert "参考" not in teacher.render_user(question="Q", options_block="A. x", reference_hint="")
    assert "C" in get_prompt("self_play_zh/reference_hint").render_user(reference="C")


def test_prompt_language_zh_resolves_every_self_play_prompt_and_moves_the_fingerprints(tmp_path: Path) -> None:
    english, chinese = tiny_recipe(tmp_path), tiny_recipe(tmp_path, prompt_language="zh")
    stages = chinese.stages
    assert stages.teacher_cot.prompt == "self_play_zh/teacher_cot"
    assert stages.teacher_cot.hint_prompt == "self_play_zh/reference_hint"
    assert stages.student_answers.prompt == stages.evaluate.prompt == "self_play_zh/student_answer"
    assert stages.preference_pairs.prompt == "self_play_zh/self_correction"
    assert stages.preference_pairs.answer_prompt == "self_play_zh/answer_correction"
    assert chinese.models.judge.prompt == "self_play_zh/judge"
    assert english.stages.teacher_cot.prompt == "self_play/teacher_cot" and english.prompt_language == "en"
    # The manifest stores the resolved names, and reading them back resolves to the same.
    dumped = chinese.model_dump(mode="json")
    assert type(chinese).model_validate(dumped).model_dump(mode="json") == dumped
    # en is the switch back: a zh name in an English recipe is resolved to the English twin.
    back = tiny_recipe(tmp_path, **{"stages.evaluate.prompt": "self_play_zh/student_answer"})
    assert back.stages.evaluate.prompt == "self_play/student_answer"

    teacher = recipe_stages(type(chinese))[1]
    fingerprint = stage_fingerprint(chinese, teacher, {})
    assert fingerprint.components["stages.teacher_cot.prompt"] == "self_play_zh/teacher_cot"
    assert "stages.teacher_cot.hint_prompt@version" in fingerprint.components
    assert fingerprint.digest != stage_fingerprint(english, teacher, {}).digest


def test_prompt_language_leaves_other_families_alone() -> None:
    raw = yaml.safe_load((REPO / "pipelines" / "huatuo_o1_demo.yaml").read_text())
    recipe = O1Recipe.model_validate({**raw, "prompt_language": "zh"})
    assert recipe.stages.sft.prompt == "huatuo_o1/question" and recipe.stages.evaluate.prompt == "huatuo_o1/eval"
    assert recipe.models.judge.prompt == "self_play_zh/judge"


def test_the_demo_stays_english() -> None:
    recipe = load_recipe(REPO / "pipelines" / "demo.yaml")
    assert recipe.prompt_language == "en" and recipe.stages.teacher_cot.prompt.startswith("self_play/")


# ---------------------------------------------------------------------------------------------
# Protocols
# ---------------------------------------------------------------------------------------------


def test_every_protocol_the_recipe_accepts_is_defined_and_each_says_what_it_samples() -> None:
    assert set(PROTOCOLS) == set(get_args(ProtocolName))
    stage = SamplingConfig(temperature=0.3, top_p=0.95, max_tokens=2048, seed=7)
    assert PROTOCOLS["project"].sampling_for(stage) == stage
    strict = PROTOCOLS["strict"].sampling_for(stage)
    assert (strict.temperature, strict.top_p, strict.max_tokens) == (0.0, 1.0, 2048)
    paper = PROTOCOLS["sp_paper"].sampling_for(stage)
    assert (paper.temperature, paper.top_p, paper.max_tokens, paper.seed) == (0.7, 0.9, 450, 7)
    assert not PROTOCOLS["sp_paper"].chat_template and PROTOCOLS["project"].chat_template
    assert PROTOCOLS["o1_paper"].sampling_for(stage).temperature == 0.5
    assert protocol_label("sp_paper", PROTOCOLS["sp_paper"].settings(stage)) == \
        "sp_paper (T 0.7, top_p 0.9, 450 tokens, raw prompt)"
    # A shrunk run caps every budget, the paper's too, and its label says what ran; a larger cap changes nothing.
    assert PROTOCOLS["sp_paper"].sampling_for(stage, 128).max_tokens == 128
    assert protocol_label("sp_paper", PROTOCOLS["sp_paper"].settings(stage, 128)) == \
        "sp_paper (T 0.7, top_p 0.9, 128 tokens, raw prompt)"
    assert PROTOCOLS["sp_paper"].sampling_for(stage, 4096) == paper
    assert protocol_folder("sft", "project") == "evaluate/sft"
    assert protocol_folder("sft", "strict") == "evaluate/sft@strict"


def test_protocols_are_distinct_and_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="protocols lists one twice"):
        tiny_recipe(tmp_path, **{"stages.evaluate.protocols": ["project", "project"]})
    with pytest.raises(ValueError, match="protocols"):
        tiny_recipe(tmp_path, **{"stages.evaluate.protocols": ["paper"]})
    assert tiny_recipe(tmp_path).stages.evaluate.protocols == ["project"]


def _row(reply: str, verdict: bool, truncated: bool = False, answer: str = "B") -> dict:
    question = Question(id=f"q{abs(hash((reply, truncated))) % 10**6}", question="Which?",
                        options={"A": "a", "B": "b", "C": "c"}, answer=[answer], source="bank")
    return {**question.to_row(), "generated_text": reply, "verdict": verdict, "truncated": truncated}


def test_each_scoring_rule_on_hand_made_replies() -> None:
    rows = [
        _row("The answer is B. Checking again: the answer is A.", False),  # first right, last wrong
        _row("The answer is A. No: the answer is B.", True),  # first wrong, last right
        _row("<think>B looks right, so the answer is B and", True, truncated=True),  # cut before concluding
        _row("", False),  # empty: wrong under every rule
    ]
    last, strict, either = score(rows, "last"), score(rows, "strict"), score(rows, "either")
    assert (last["correct"], strict["correct"], either["correct"]) == (2, 1, 3)
    # The reply cut inside <think> commits to nothing (sphuatuo.parsing.replies): no first match, unparsable.
    assert last["first_match_accuracy"] == 0.25 and strict["first_match_accuracy"] == 0.25
    assert either["accuracy"] == 0.75 and either["by"]["source"]["bank"]["accuracy"] == 0.75
    assert all(result["unparsable"] == 2 and result["truncated"] == 1 for result in (last, strict, either))
    assert score(rows) == last
    # o1_paper is max(first, last): never below the last match, nor below the first.
    assert either["accuracy"] >= max(last["accuracy"], last["first_match_accuracy"])


def test_a_raw_prompt_is_the_template_as_text_without_the_reply_prefix() -> None:
    question = Question(id="q1", question="Which vitamin?", options={"A": "C", "B": "D"}, answer=["A"])
    row = question.to_row()
    raw = student_prompt("self_play/student_answer", row, chat_template=False)
    chat = student_prompt("self_play/student_answer", row)
    assert isinstance(raw, str) and isinstance(chat, list)
    template = get_prompt("self_play/student_answer")
    assert raw == f"{template.system}\n\nWhich vitamin?\nA. C\nB. D\n"
    assert "<think>\n" not in raw.split("</think>")[-1] and chat[-1]["content"] == "<think>\n"
    teacher = get_prompt("self_play_zh/teacher_cot").raw_prompt(question="Q", options_block="A. x", reference_hint="")
    assert teacher.count("<answer>") == 2 and teacher.endswith("Q\nA. x\n")  # the one-shot example, then the question


def test_raw_prompts_go_to_the_completions_api_without_chat_fields() -> None:
    request = Request(temperature=0.7, top_p=0.9, max_tokens=450, seed=3)
    payload = _payload({"prompt": "Q?\n", "sample": 1}, "m", request, "vllm")
    assert payload == {"model": "m", "temperature": 0.7, "top_p": 0.9, "max_tokens": 450, "seed": 4, "prompt": "Q?\n"}
    chat = _payload({"messages": [{"role": "user", "content": "Q?"}]}, "m", request, "vllm")
    assert "prompt" not in chat and chat["messages"] == [{"role": "user", "content": "Q?"}]


def test_the_hf_engine_tokenises_a_raw_prompt_as_it_is(tiny_model: str) -> None:
    from sphuatuo.engines.hf import HFChatGenerator

    generator = HFChatGenerator(tiny_model, "float32", Request(temperature=0.0, top_p=1.0, max_tokens=4),
                                trust_remote_code=False)
    text = "Which vitamin prevents scurvy?\nA. C\nB. D\n"
    raw = generator({"prompt": np.array([text], dtype=object), "key": np.array(["k"])})
    chat = generator({"messages": np.array([[{"role": "user", "content": text}]], dtype=object),
                      "key": np.array(["k"])})
    expected = len(generator.tokenizer(text)["input_ids"])
    assert raw["num_input_tokens"][0] == expected < chat["num_input_tokens"][0]
    assert raw["num_generated_tokens"][0] > 0


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _result(correct: int, n: int, first: float) -> dict:
    from sphuatuo.stages.evaluate import wilson_interval

    return {"n": n, "correct": correct, "accuracy": correct / n, "ci95": wilson_interval(correct, n),
            "first_match_accuracy": first, "unparsable": 0, "truncated": 0, "by": {}}


def test_the_report_sets_the_protocols_side_by_side_with_their_settings_and_intervals(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "run", **{"stages.evaluate.protocols": ["project", "sp_paper", "o1_paper"]})
    run = RunRoot(recipe.run_root)
    stage = recipe.stages.evaluate
    protocols = {name: {"settings": PROTOCOLS[name].settings(stage.sampling), "models": {}}
                 for name in stage.protocols}
    protocols["project"]["models"] = {"base": _result(3, 10, 0.2), "sft": _result(6, 10, 0.5)}
    protocols["sp_paper"]["models"] = {"base": _result(2, 10, 0.2), "sft": _result(4, 10, 0.4)}
    protocols["o1_paper"]["models"] = {"base": _result(5, 10, 0.4), "sft": _result(7, 10, 0.6)}
    manifest = load_manifest(run, recipe)
    manifest.stages["evaluate"] = StageRecord(status="done", details={"models": protocols["project"]["models"],
                                                                       "protocols": protocols})
    save_manifest(run, manifest)
    report = Path(write_report(run)).read_text()
    assert "| protocol | model | questions | accuracy | 95% CI | first-match accuracy |" in report
    assert "| project (T 0, top_p 1, 32 tokens, chat template) | sft | 10 | 60.0% | 31.3% – 83.2% | 50.0% |" in report
    assert "| sp_paper (T 0.7, top_p 0.9, 450 tokens, raw prompt) | base | 10 | 20.0% | 5.7% – 51.0% | 20.0% |" \
        in report
    assert "| o1_paper (T 0.5, top_p 1, 32 tokens, chat template) | sft | 10 | 70.0% |" in report
    assert "- **o1_paper**: HuatuoGPT-o1's released scorer" in report
    assert "right when its first or its last answer statement is" in report
    assert "In detail, under `project`:" in report and "| base | 10 | 30.0% |" in report


# ---------------------------------------------------------------------------------------------
# The real thing, on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_three_protocols_on_the_tiny_model_each_in_the_manifest_and_the_report(tmp_path: Path, ray_cluster) -> None:
    recipe = tiny_recipe(tmp_path / "run", **{
        "models.student": {"backend": "vllm", "model": "builtin:tiny", "max_model_len": 1024, "batch_size": 8},
        "stages.evaluate.models": ["base"], "stages.evaluate.protocols": ["project", "sp_paper", "shuffled"]})
    run = run_pipeline(recipe, stages=(questions, evaluate))
    details = json.loads(run.read_text("manifest.json"))["stages"]["evaluate"]["details"]
    assert list(details["protocols"]) == ["project", "sp_paper", "shuffled"]
    n = len(run.read_rows("questions", "test"))
    for name, entry in details["protocols"].items():
        result = entry["models"]["base"]
        assert result["n"] == n > 0 and result["ci95"][0] <= result["accuracy"] <= result["ci95"][1]
    assert details["models"]["base"] == details["protocols"]["project"]["models"]["base"]
    assert details["protocols"]["sp_paper"]["settings"]["max_tokens"] == 450

    project, paper = run.read_rows("evaluate", "base"), run.read_rows("evaluate", "base@sp_paper")
    assert {row["chat_template"] for row in project} == {True} and {row["chat_template"] for row in paper} == {False}
    assert all(0 < row["num_generated_tokens"] <= 450 for row in paper)
    # Without the chat template (and its system and turn markers) the same question is a different prompt.
    by_id = {row["id"]: row for row in project}
    assert all(row["num_input_tokens"] != by_id[row["id"]]["num_input_tokens"] for row in paper)

    report = Path(write_report(run)).read_text()
    assert "| project (T 0, top_p 1, 32 tokens, chat template) | base |" in report
    assert "| sp_paper (T 0.7, top_p 0.9, 450 tokens, raw prompt) | base |" in report
    # The permutation check: the same items, their options in another order, the gold letters moved along.
    shuffled = {row["id"]: row for row in run.read_rows("evaluate", "base@shuffled")}
    assert sorted(shuffled) == sorted(by_id) and any(shuffled[i]["options"] != by_id[i]["options"] for i in by_id)
    assert "Permutation check (the same items, options shuffled):" in report and "- base: " in report


def test_shuffled_options_keep_each_text_and_move_the_gold_letters_with_it() -> None:
    from sphuatuo.stages.evaluate import shuffle_options

    question = Question(id="q7", question="Which?", options={"A": "alpha", "B": "beta", "C": "gamma", "D": "delta"},
                        answer=["B", "D"])
    row = {**question.to_row(), "key": "q7"}
    shuffled = Question.from_row(shuffle_options(row, seed=0))
    assert sorted(shuffled.options.values()) == sorted(question.options.values())
    assert shuffled.options != question.options  # another order (this seed and id)
    assert {shuffled.options[letter] for letter in shuffled.answer} == {"beta", "delta"}
    assert shuffle_options(row, seed=0) == shuffle_options(row, seed=0)  # fixed by seed and id
    open_ended = Question(id="o", question="What?", reference="x").to_row()
    assert shuffle_options(open_ended, seed=0) == open_ended


def test_the_permutation_check_flags_an_accuracy_that_moves_with_option_order() -> None:
    from sphuatuo.stages.evaluate import permutation_check

    def result(accuracy: float, low: float, high: float) -> dict:
        return {"accuracy": accuracy, "ci95": [low, high]}

    protocols = {"project": {"models": {"base": result(0.30, 0.20, 0.42), "sft": result(0.50, 0.40, 0.60)}},
                 "shuffled": {"models": {"base": result(0.12, 0.06, 0.21), "sft": result(0.47, 0.37, 0.57)}}}
    lines = permutation_check(protocols)
    assert lines[0].startswith("base: 30.0% as asked")
    assert lines[0].endswith("FAILS: the accuracy depends on option order")
    assert lines[1].endswith("holds")
    assert permutation_check({"project": protocols["project"]}) == []
