"""HuatuoGPT-o1 pieces without Ray: reply parsing, the search's bookkeeping on known verdicts, the reward,
its verifiers (a sequence-classification model and a causal LM built locally), recipes and prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from sphuatuo.parsing.o1 import (
    format_o1,
    last_conclusion,
    parse_chain,
    parse_filter_verdict,
    parse_json_object,
    parse_natural_reasoning,
    parse_problem,
    parse_true_false,
    previous_reasoning,
    render_chain,
)
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import O1Recipe, Recipe, RecipeError, load_recipe
from sphuatuo.stages.huatuo_o1.search import (
    INIT,
    LABEL,
    SearchPlan,
    SearchState,
    advance,
    choose_strategy,
    solved_counts,
)
from sphuatuo.train.reward import ClassifierVerifier, ExactMatchVerifier, LLMVerifier, O1Reward, o1_rewards

REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("backtracking", "exploring_new_paths", "verification", "correction")


def chain_reply(conclusion: str, continuation: bool = False) -> str:
    steps = [{"action": "Inner Thinking", "title": "Recall", "content": "think"},
             {"action": "Final Conclusion", "content": conclusion},
             {"action": "Verification", "content": "check"}]
    if continuation:
        steps = [{"action": "Verification", "content": "The conclusion was wrong."}, *steps]
    return "Sure!\n```json\n" + json.dumps({"CoT": steps}, indent=1) + "\n```"


# ---- parsing ---------------------------------------------------------------------------------


def test_json_recovery_from_fences_raw_newlines_and_trailing_commas() -> None:
    assert parse_json_object('```json\n{"a": "line one\nline two",}\n```').value == {"a": "line one\nline two"}
    assert parse_json_object('Here: {"a": [1, 2,],} done').value == {"a": [1, 2]}
    assert parse_json_object("no json here").error == "no JSON object in the reply"
    assert parse_json_object('{"a": }').error.startswith("invalid JSON")
    assert parse_problem('{"Open-ended Verifiable Question": "Q?", "Ground-True Answer": "N-acetylcysteine"}'
                         ).value == ("Q?", "N-acetylcysteine")
    assert "exactly the keys" in parse_problem('{"Open-ended Verifiable Question": "Q?"}').error
    assert parse_problem('{"Open-ended Verifiable Question": "Q?", "Ground-True Answer": " "}').error
    assert parse_natural_reasoning('{"NaturalReasoning": "hmm,\\nwait"}').value == "hmm,\nwait"


@pytest.mark.parametrize(("reply", "verdict"), [
    ("Pass", "Pass"), ('"Too Simple"', "Too Simple"), ("**Ambiguous Answer** - it asks for the incorrect option",
                                                       "Ambiguous Answer"),
    ("Evaluation: Not Reformulatable.", "Not Reformulatable"), ("This question would pass.", "Pass"),
    ("I cannot say", None), ("Either Too Simple or Ambiguous Answer", None),
])
def test_filter_verdicts(reply: str, verdict: str | None) -> None:
    assert parse_filter_verdict(reply).value == verdict


def test_chain_checks_and_rendering() -> None:
    chain = parse_chain(chain_reply("Vitamin C")).value
    assert last_conclusion(chain) == "Vitamin C"
    assert json.loads(previous_reasoning(chain))[-1]["action"] == "Final Conclusion"
    assert render_chain(chain) == "### Recall\nthink\n\n### Conclusion\nVitamin C\n\n### Verification\ncheck"
    wrong_order = json.dumps({"CoT": [{"action": "Final Conclusion", "content": "x"},
                                      {"action": "Verification", "content": "y"}]})
    assert "last three steps" in parse_chain(wrong_order).error
    assert "unknown action" in parse_chain('{"CoT": [{"action": "Guess", "content": "x"}]}').error
    assert parse_true_false("True") is True and parse_true_false("**false**") is False
    assert parse_true_false("maybe") is None
    assert format_o1(" a ", "b\n") == "## Thinking\n\na\n\n## Final Response\n\nb"


def test_plain_text_fallback_for_small_generators() -> None:
    from sphuatuo.recipe import ReasoningSearchStage
    from sphuatuo.stages.huatuo_o1.reasoning_search import read_chain, read_natural

    text = "Scurvy means collagen fails.\n\nSo the answer is Vitamin C."
    strict, lenient = ReasoningSearchStage(), ReasoningSearchStage(plain_text_fallback=True)
    assert read_chain(strict, text).value is None and read_chain(strict, text).error == "no JSON object in the reply"
    fallback = read_chain(lenient, text)
    assert last_conclusion(fallback.value) == "So the answer is Vitamin C."
    assert fallback.error == "read as plain text: no JSON object in the reply"
    assert read_chain(lenient, chain_reply("x")).error is None  # JSON replies are read as JSON
    assert read_chain(lenient, "  ").value is None
    assert read_natural(strict, "hmm").error and read_natural(lenient, " hmm ").value == "hmm"


# ---- search bookkeeping ------------------------------------------------------------------------


def run_search(plan: SearchPlan, verdicts: list[bool | None]) -> SearchState:
    """Drive one item through `advance` with the given verdicts, one per step, while it searches."""
    state = SearchState(id="q1")
    for verdict in verdicts:
        assert state.status == "searching"
        steps = None if verdict is None else parse_chain(chain_reply(f"answer {len(state.trace)}",
                                                                     continuation=state.step != INIT)).value
        state = advance(plan, state, steps, verdict, "unparsable" if verdict is None else None)
    return state


def test_search_solved_at_depth_two_never_backtracks_first() -> None:
    plan = SearchPlan(max_depth=3, max_attempts=3, reveal_label=False, strategies=STRATEGIES, seed=0)
    state = run_search(plan, [False, False, True])
    assert state.status == "solved" and state.solved_at == "2" and not state.label_revealed
    assert [(t["attempt"], t["depth"]) for t in state.trace] == [(0, 0), (0, 1), (0, 2)]
    assert state.trace[0]["step"] == INIT and state.trace[1]["step"] != "backtracking"
    # The chain grew by each continuation, whose leading Verification replaced the previous last one.
    assert [s["content"] for s in state.chain if s["action"] == "Final Conclusion"] == [
        "answer 0", "answer 1", "answer 2"]
    for attempt in range(5):
        assert choose_strategy(plan, "any", attempt, 1) != "backtracking"
    drawn = {choose_strategy(plan, f"q{i}", 0, 2) for i in range(40)}
    assert drawn == set(STRATEGIES)  # backtracking is allowed from the second retry on
    assert choose_strategy(plan, "q7", 1, 2) == choose_strategy(plan, "q7", 1, 2)  # seeded: a resume agrees


def test_search_restarts_attempts_from_the_initial_reasoning_then_discards() -> None:
    plan = SearchPlan(max_depth=2, max_attempts=2, reveal_label=False, strategies=STRATEGIES)
    state = run_search(plan, [False, False, False])
    assert (state.attempt, state.depth) == (1, 1)  # attempt 2 begins at depth 1 …
    assert [s["content"] for s in state.chain if s["action"] == "Final Conclusion"] == ["answer 0"]  # … from init
    state = run_search(plan, [False] * 5)
    assert state.status == "failed" and state.reason == "not verified in 2 attempts of depth 2"
    assert len(state.trace) == 1 + 2 * 2 and state.solved_at is None


def test_label_reveal_is_flagged_and_still_verified() -> None:
    plan = SearchPlan(max_depth=1, max_attempts=1, reveal_label=True, strategies=STRATEGIES)
    state = run_search(plan, [False, False])
    assert state.step == LABEL and state.label_revealed and state.key == "q1:label"
    solved = advance(plan, state, parse_chain(chain_reply("gold", True)).value, True)
    assert solved.status == "solved" and solved.solved_at == LABEL
    rejected = advance(plan, state, parse_chain(chain_reply("still wrong", True)).value, False)
    assert rejected.status == "failed" and rejected.reason == "not verified even with the label revealed"
    assert solved_counts([solved, rejected, run_search(plan, [True]),
                          run_search(plan, [False, True])]) == {"0": 1, "1": 1, LABEL: 1}


def test_unparsable_init_is_asked_again_and_keys_are_unique() -> None:
    plan = SearchPlan(max_depth=3, max_attempts=2, reveal_label=False, strategies=STRATEGIES)
    state = run_search(plan, [None])
    assert state.step == INIT and state.chain == () and state.trace[0]["parse_error"] == "unparsable"
    keys = set()
    state = SearchState(id="q1")
    while state.status == "searching":
        keys.add(state.key)
        state = advance(plan, state, None, None)
    assert len(keys) == len(state.trace) == 1 + 2 * 3


# ---- reward and verifiers ----------------------------------------------------------------------

PROBLEM = {"ground_truth": "N-acetylcysteine", "answer": "C",
           "options": json.dumps({"A": "Naloxone", "B": "Flumazenil", "C": "N-acetylcysteine", "D": "Atropine"})}


def test_o1_reward_on_known_cases() -> None:
    good = "## Thinking\n\nGlutathione is depleted.\n\n## Final Response\n\nGive N-acetylcysteine."
    wrong = "## Thinking\n\nOpioid?\n\n## Final Response\n\nNaloxone."
    cases = [
        (good, 1.0), (wrong, 0.1),
        ("Give N-acetylcysteine.", 0.0),  # no headings
        (good + "\n\n## Final Response\n\nC", 0.0),  # two final responses
        ("## Final Response\n\nC\n\n## Thinking\n\nx", 0.0),  # wrong order
        ("## Thinking\n\nx\n\n## Thinking\n\ny\n\n## Final Response\n\nC", 0.0),  # two thinkings
    ]
    rewards = o1_rewards([text for text, _ in cases], [PROBLEM] * len(cases), ExactMatchVerifier())
    assert rewards == [expected for _, expected in cases]
    open_ended = {"ground_truth": "Oxytocin", "options": "{}", "answer": ""}
    assert ExactMatchVerifier().verify(["It is oxytocin.", "Vasopressin"], [open_ended] * 2) == [True, False]
    trl_call = O1Reward(ExactMatchVerifier())(prompts=[[], []],
                                              completions=[[{"role": "assistant", "content": good}], "no format"],
                                              ground_truth=[PROBLEM["ground_truth"]] * 2,
                                              options=[PROBLEM["options"]] * 2, answer=["C", "C"])
    assert trl_call == [1.0, 0.0]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> str:
    """A sequence classifier on the tiny Qwen2 architecture with a zero head: p(True) is exactly 0.5."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model, num_labels=2)
    model = AutoModelForSequenceClassification.from_config(config)
    torch.nn.init.zeros_(model.score.weight)
    out = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


def test_classifier_verifier_thresholds_p_true(tiny_classifier: str) -> None:
    responses, problems = ["Give N-acetylcysteine.", "Naloxone"], [PROBLEM, PROBLEM]
    low = ClassifierVerifier(tiny_classifier, threshold=0.4, max_length=256)
    assert low.true_probabilities(responses, problems) == pytest.approx([0.5, 0.5])
    assert low.verify(responses, problems) == [True, True]
    assert ClassifierVerifier(tiny_classifier, threshold=0.6, max_length=256).verify(responses, problems) == [
        False, False]
    reply = "## Thinking\n\nx\n\n## Final Response\n\nNaloxone"
    assert o1_rewards([reply, "bad"], problems, low) == [1.0, 0.0]


def test_llm_verifier_compares_true_and_false_logits(tiny_model: str) -> None:
    verifier = LLMVerifier(tiny_model, "huatuo_o1/verify", max_length=512)
    verdicts = verifier.verify(["N-acetylcysteine", "Naloxone"], [PROBLEM, PROBLEM])
    assert len(verdicts) == 2 and all(isinstance(v, bool) for v in verdicts)
    with torch.no_grad():  # equal logits for "True" and "False": a tie is not an acceptance
        verifier.model.lm_head.weight[verifier.true_id] = verifier.model.lm_head.weight[verifier.false_id]
    assert verifier.verify(["N-acetylcysteine"], [PROBLEM]) == [False]


# ---- recipes and prompts -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["huatuo_o1_demo.yaml", "huatuo_o1_7b.yaml"])
def test_o1_recipes_validate(name: str) -> None:
    recipe = load_recipe(REPO / "pipelines" / name)
    assert isinstance(recipe, O1Recipe) and isinstance(recipe, Recipe) and recipe.recipe == "huatuo_o1"
    for prompt in (recipe.stages.reasoning_search.init_prompt, recipe.stages.evaluate.prompt,
                   recipe.stages.verifiable_problems.filter_prompt):
        get_prompt(prompt)


def test_o1_recipe_errors_name_the_field(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "pipelines" / "huatuo_o1_demo.yaml").read_text())
    raw["stages"]["reasoning_search"]["strategies"] = ["backtracking"]
    raw["stages"]["rl"]["verifier"] = {"kind": "classifier"}
    raw["stages"]["teacher_cot"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    problems = "\n".join(err.value.problems)
    assert "stages.reasoning_search: Value error, strategies needs one besides backtracking" in problems
    assert "stages.rl.verifier: Value error, verifier kind 'classifier' needs `model`" in problems
    assert "stages.teacher_cot: unknown field" in problems
    path.write_text(yaml.safe_dump({**raw, "recipe": "huatuo"}))
    with pytest.raises(RecipeError, match="recipe: unknown recipe 'huatuo' \\(known: self_play, huatuo_o1\\)"):
        load_recipe(path)


def test_o1_search_prompts_render_with_the_chain() -> None:
    reasoning = previous_reasoning(parse_chain(chain_reply("x")).value)
    for strategy in STRATEGIES:
        text = get_prompt(f"huatuo_o1/search_{strategy}").render_user(question="Q?", reasoning=reasoning)
        assert "<previous reasoning>" in text and '"action": "Verification"' in text
    label = get_prompt("huatuo_o1/search_label").render_user(question="Q?", reasoning=reasoning, label="GOLD")
    assert 'the labeled answer is "GOLD"' in label


def test_o1_plan_lists_every_stage() -> None:
    from sphuatuo.commands.plan import plan

    result = plan(load_recipe(REPO / "pipelines" / "huatuo_o1_7b.yaml"))
    assert [(s.stage, s.role) for s in result.stages][-5:] == [
        ("reasoning_search", "teacher"), ("reasoning_search", "judge"), ("sft", "trainer"), ("rl", "trainer"),
        ("evaluate", "student")]
    assert result.fits and "at most 10 steps per problem" in " ".join(result.stages[-5].notes)


RELEASED = Path(__file__).parent / "fixtures" / "released"


def test_the_released_sft_paths_load_with_bad_records_rejected() -> None:
    from sphuatuo.data.released import sft_paths

    released = sft_paths(str(RELEASED / "medical_o1_sft_sample.json"))
    assert len(released.rows) == 4 and released.rows[1]["problem"].startswith("Which vitamin")
    assert released.rows[1]["complex_cot"].endswith("vitamin C.") and released.rows[1]["response"].startswith("Vit")
    assert {row["label_revealed"] for row in released.rows} == {False}
    (reject,) = released.rejects
    assert reject.row == 5 and reject.reason == "missing or empty: Question"


def test_the_released_verifiable_problems_load_as_open_ended_problems() -> None:
    from sphuatuo.data.questions import Question
    from sphuatuo.data.released import verifiable_problems

    released = verifiable_problems(str(RELEASED / "medical_o1_verifiable_problem_sample.jsonl"))
    assert [row["ground_truth"] for row in released.rows] == ["Duodenal atresia", "Radial nerve", "N-acetylcysteine"]
    question = Question.from_row(released.rows[0])
    assert not question.is_multiple_choice and question.reference == "Duodenal atresia"
    assert released.rows[0]["problem"] == question.question
    (reject,) = released.rejects
    assert reject.row == 4 and reject.reason == "missing or empty: Ground-True Answer"


def test_the_project_written_o1_examples_are_labelled_well_formed_and_answer_their_options() -> None:
    from sphuatuo.data.loaders import SAMPLE_BANK, load_questions, resolve_source_path
    from sphuatuo.data.released import sft_paths
    from sphuatuo.parsing.replies import extract_answer, split_thinking_response

    examples = sft_paths("builtin:o1_format_examples")
    rows = examples.rows
    assert not examples.rejects and len(rows) == 64 and len({row["id"] for row in rows}) == 64
    assert {row["origin"] for row in rows} == {"project-written"}
    assert {row["generator"] for row in rows} == {"project-written:builtin:o1_format_examples"}
    assert {row["id"].split("-")[1] for row in rows} == {"en", "zh"}
    bank = {question.question for question in load_questions(resolve_source_path(SAMPLE_BANK)).questions}
    multiple_choice = 0
    for row in rows:
        assert row["problem"] not in bank and not any(row["problem"].endswith(q) for q in bank), row["id"]
        parsed = split_thinking_response(format_o1(row["complex_cot"], row["response"]))
        assert parsed.parse_error is None and parsed.think and parsed.answer, row["id"]
        assert len(parsed.think) + len(parsed.answer) < 240, row["id"]  # short: it must fit the demo's RL budget
        lines = row["problem"].split("\n")
        if lines[0] == "Please answer the following multiple-choice question:":
            options = dict(line.split(". ", 1) for line in lines[2:])
            letter = row["response"].removeprefix("The answer is ").removeprefix("答案是")[0]
            assert f"{letter}. {options[letter]}" in row["response"], row["id"]
            assert extract_answer(parsed.answer, options) == {letter}, row["id"]
            multiple_choice += 1
    assert multiple_choice == 16


def test_sft_examples_keep_each_row_origin() -> None:
    from sphuatuo.data.released import sft_paths
    from sphuatuo.pipeline import stage_fingerprint
    from sphuatuo.stages.huatuo_o1 import sft

    recipe = load_recipe(REPO / "pipelines" / "huatuo_o1_demo.yaml")
    assert recipe.stages.sft.extra_data == "builtin:o1_format_examples"
    searched = {"id": "sample-en-003", "problem": "Q?", "complex_cot": "Hmm.", "response": "A.", "generator": "g",
                "label_revealed": True}
    released = sft_paths(str(RELEASED / "medical_o1_sft_sample.json")).rows
    examples = sft.sft_examples(recipe.stages.sft, [searched, *released, *sft_paths(recipe.stages.sft.extra_data).rows])
    origins = {example["id"]: example["origin"] for example in examples}
    assert origins["sample-en-003"] == "search" and origins["o1fmt-zh-024"] == "project-written"
    assert [origins[row["id"]] for row in released] == ["released"] * 4
    components = stage_fingerprint(recipe, sft, {}).components
    assert len(components["stages.sft.extra_data@identity"]) == 16  # the file's content, not only its name


def test_a_search_state_survives_its_row() -> None:
    plan = SearchPlan(max_depth=1, max_attempts=1, reveal_label=True, strategies=STRATEGIES)
    step = [{"action": "Final Conclusion", "content": "scurvy"}, {"action": "Verification", "content": "False"}]
    state = advance(plan, SearchState(id="q1"), step, False)
    assert SearchState.of_row(json.loads(json.dumps({"id": "q1", **state.columns()}))) == state


def test_the_generators_tries_are_booked_in_the_run_root(tmp_path: Path) -> None:
    """The filter's and the rewrite's bookkeeping, on replies written by hand: a reply that parses is an item's
    outcome, an unreadable one is asked again, the last try's is rejected with its reply; what the filter passes
    is rewritten, and the problems are split between the search and RL."""
    from sphuatuo.data.questions import Question
    from sphuatuo.recipe import VerifiableProblemsStage
    from sphuatuo.stages.huatuo_o1 import verifiable_problems as vp
    from sphuatuo.store.run_root import RunRoot

    run = RunRoot(str(tmp_path))
    items = [Question(id=f"q{i}", question=f"Which vitamin {i}?", options={"A": "C", "B": "D"}, answer=("A",)).to_row()
             for i in range(3)]

    def replies(step: str, attempt: int, texts: dict[str, str]) -> None:
        run.write_rows([{**row, "key": f"{row['id']}:{attempt}", "generated_text": texts[row["id"]],
                         "finish_reason": "stop"} for row in items if row["id"] in texts],
                       vp.NAME, step, f"try_{attempt}")

    replies("filter", 0, {"q0": "Pass", "q1": "Too Simple", "q2": "no idea"})
    assert vp._parse_try(run, "filter", 0, last=False) == 1  # q2 is asked again
    assert [row["id"] for row in run.read_rows(vp.NAME, "filter", "todo_1")] == ["q2"]
    replies("filter", 1, {"q2": "Pass"})
    assert vp._parse_try(run, "filter", 1, last=True) == 0
    assert vp._filtered(run) == {"Pass": 2, "Too Simple": 1}
    assert sorted(row["id"] for row in run.read_rows(vp.NAME, "rewrite", "todo_0")) == ["q0", "q2"]

    problem = json.dumps({"Open-ended Verifiable Question": "Which vitamin prevents scurvy?",
                          "Ground-True Answer": "Vitamin C"})
    replies("rewrite", 0, {"q0": problem, "q2": "{broken"})
    assert vp._parse_try(run, "rewrite", 0, last=True) == 0
    stage = VerifiableProblemsStage(rl_share=0.0)
    written = vp._write_problems(run, stage, 0, {"generator": "by hand", "prompt_version": "v1"})
    assert written["problems"] == 1 and written["rl"] == 0 and written["rewrite_tries"] == {"1": 2}
    [searched] = run.read_rows(vp.NAME, "search")
    assert (searched["id"], searched["problem"], searched["ground_truth"]) == (
        "q0", "Which vitamin prevents scurvy?", "Vitamin C")
    assert searched["filter_verdict"] == "Pass" and searched["generator"] == "by hand"
    rejects = {row["id"]: row for row in run.read_rows(vp.NAME, "rejects")}
    assert rejects["q1"]["reason"] == "Too Simple" and rejects["q1"]["reply"] == "Too Simple"
    assert rejects["q2"]["step"] == "rewrite" and rejects["q2"]["reason"].startswith("unreadable after 1 tries")
    assert written["rejected_by_step"] == {"filter": 1, "rewrite": 1}
