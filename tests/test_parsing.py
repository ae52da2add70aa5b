"""Tests for sphuatuo.parsing.replies: section splitting, answer-letter extraction, judge verdicts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sphuatuo.parsing.replies import (
    ThinkAnswer,
    extract_answer,
    first_and_last_answers,
    letters_text,
    parse_judge_verdict,
    split_think_answer,
    split_thinking_response,
)

# English drug options, Chinese diagnosis options, and a five-option set.
EN = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Clopidogrel"}
ZH = {"A": "病毒性肝炎", "B": "肝硬化", "C": "肝癌", "D": "脂肪肝"}
FIVE = {"A": "Hypertension", "B": "Diabetes mellitus", "C": "Asthma", "D": "Gout", "E": "Anemia"}
# Option texts where one is contained in another.
NESTED = {"A": "Insulin", "B": "Insulin and metformin", "C": "Metformin", "D": "Diet only"}

EXTRACT_CASES = [
    # --- English explicit statements ---
    ("answer_is", "After weighing the options, the answer is C.", EN, {"C"}),
    ("answer_is_parens", "The answer is (C).", EN, {"C"}),
    ("answer_colon", "Answer: B", EN, {"B"}),
    ("answer_colon_newline", "Answer:\nD", EN, {"D"}),
    ("answer_is_colon_bold", "The final answer is: **B. Heparin**", EN, {"B"}),
    ("answer_is_option", "So the answer is option D.", EN, {"D"}),
    ("answers_are_and", "The correct answers are B and D.", EN, {"B", "D"}),
    ("answer_comma_list", "Answer: A, C", EN, {"A", "C"}),
    ("answer_run_together", "Answer: BD", EN, {"B", "D"}),
    # "A or C" holds two options open: a list of candidates, not an answer.
    ("answer_or_is_candidates", "The answer would be A or C.", EN, set()),
    ("correct_option_is", "The correct option is C because warfarin is a vitamin K antagonist.", EN, {"C"}),
    ("choose", "Given the contraindication, I would choose B.", EN, {"B"}),
    ("letter_is_correct", "Therefore, D is correct.", EN, {"D"}),
    ("letters_are_correct", "Therefore B and D are the correct answers.", EN, {"B", "D"}),
    ("boxed", r"Final answer: $\boxed{C}$", EN, {"C"}),
    ("options_mention_multi", "Options B and D both fit the picture.", EN, {"B", "D"}),
    ("bold_letter", "After all that reasoning:\n\n**B**", EN, {"B"}),
    ("bold_letter_with_text", "My pick is **C. Warfarin** for this patient.", EN, {"C"}),
    # --- Chinese explicit statements ---
    ("zh_xuan", "综合分析，选 C", ZH, {"C"}),
    ("zh_xuanze", "应当选择C。", ZH, {"C"}),
    ("zh_answer_colon", "答案：B", ZH, {"B"}),
    ("zh_answer_ascii_colon", "答案: B", ZH, {"B"}),
    ("zh_answer_shi", "答案是B", ZH, {"B"}),
    ("zh_correct_answer_he", "正确答案是 B 和 D", ZH, {"B", "D"}),
    ("zh_answer_wei_dunhao", "答案为 A、C", ZH, {"A", "C"}),
    ("zh_gu_xuan", "肝功能异常伴腹水，故选B", ZH, {"B"}),
    ("zh_ying_xuan_run", "本题为多选题，应选 AB", ZH, {"A", "B"}),
    ("zh_correct_de_shi", "以上选项中正确的是D。", ZH, {"D"}),
    ("zh_letter_zhengque", "A项不正确，B项正确。", ZH, {"B"}),
    ("zh_not_chosen_ignored", "不选A，应选C。", ZH, {"C"}),
    ("zh_option_mention", "选项B和D都符合题意。", ZH, {"B", "D"}),
    # --- full-width characters ---
    ("fullwidth_letter_colon", "答案：Ｃ", ZH, {"C"}),
    ("fullwidth_parens", "答案是（Ｄ）", ZH, {"D"}),
    ("fullwidth_comma", "答案：Ａ，Ｃ", ZH, {"A", "C"}),
    # --- sections narrow the text ---
    (
        "final_response_overrides_reasoning",
        "## Thinking\n\nOption A looks tempting, and the answer is A at first sight, but aspirin is not an "
        "anticoagulant.\n\n## Final Response\n\nThe answer is C.",
        EN,
        {"C"},
    ),
    (
        "answer_tag_overrides_think",
        "<think>Answer: A seems right... no, A is an antiplatelet.</think><answer>C</answer>",
        EN,
        {"C"},
    ),
    ("answer_tag_last_block", "<think>x</think><answer>A</answer><answer>答案：D</answer>", EN, {"D"}),
    ("answer_tag_truncated", "<think>thinking...</think><answer>The answer is B", EN, {"B"}),
    ("answer_tag_empty", "<think>The answer is A.</think><answer> </answer>", EN, set()),
    # cut inside the reasoning: no final part, so nothing in the reasoning counts
    ("think_never_closed", "<think>Let me weigh each drug. Warfarin is", EN, set()),
    ("thinking_never_ends", "## Thinking\n\nThe answer is A, or maybe", EN, set()),
    ("final_response_zh", "## Thinking\n\n考虑A选项……\n\n## Final Response\n\n故选C。", ZH, {"C"}),
    # --- standalone letters ---
    ("standalone_letter", "B", EN, {"B"}),
    ("standalone_parens", "(B)", EN, {"B"}),
    ("standalone_dot", "B.", EN, {"B"}),
    ("standalone_paren_text", "B) Heparin, because it acts immediately.", EN, {"B"}),
    ("standalone_dot_text", "C. Warfarin", EN, {"C"}),
    ("standalone_letter_then_lines", "D\n\nExplanation: clopidogrel blocks P2Y12.", EN, {"D"}),
    ("standalone_multi", "B, D", EN, {"B", "D"}),
    ("standalone_fullwidth", "Ａ", EN, {"A"}),
    # --- option text instead of a letter ---
    ("option_text_named", "The drug of choice here is warfarin.", EN, {"C"}),
    ("option_text_zh", "患者最可能的诊断是肝硬化。", ZH, {"B"}),
    ("option_text_two", "Both heparin and clopidogrel would be reasonable.", EN, {"B", "D"}),
    ("option_text_all_ambiguous", "Aspirin, heparin, warfarin and clopidogrel all affect clotting.", EN, set()),
    ("option_text_longest_wins", "Start insulin and metformin together.", NESTED, {"B"}),
    ("option_text_word_boundary", "Check the patient's environment and hydrate.", {"A": "iron", "B": "zinc"}, set()),
    ("closest_option_typo", "Clopidogrl", EN, {"D"}),
    ("closest_option_last_line", "Thinking about it more.\nDiabetes melitus", FIVE, {"B"}),
    # --- things that must NOT count ---
    ("capital_word_not_letter", "A patient with fever should be examined first.", EN, set()),
    ("based_not_b_or_d", "Based on the data, nothing can be concluded.", EN, set()),
    ("capitalised_words_before_answer", "A patient. Based on Current Evidence, the answer is B.", EN, {"B"}),
    ("answer_followed_by_word", "The answer is Aspirin-like in effect, so maybe not.", {"X": "foo", "Y": "bar"}, set()),
    ("letter_not_in_options", "The answer is E.", EN, set()),
    ("letter_not_in_options_then_valid", "Answer: E. Hmm, E is not listed; the answer is A.", EN, {"A"}),
    ("acronym_not_run", "Answer: DNA synthesis is impaired.", EN, set()),
    ("right_atrium_not_answer", "C is the right atrium in the diagram.", FIVE, set()),
    ("empty", "", EN, set()),
    ("whitespace", "   \n\t ", EN, set()),
    ("gibberish", "qwerty zxcv lorem ipsum", EN, set()),
    ("lowercase_letter_ignored", "the answer is b", {"X": "foo", "Y": "bar"}, set()),
    ("five_options_e", "The answer is E.", FIVE, {"E"}),
    # --- last statement wins ---
    ("last_statement_wins", "At first the answer is A. On reflection, the answer is C.", EN, {"C"}),
    ("last_statement_wins_zh", "答案是A？不对，重新分析后答案是D。", ZH, {"D"}),
]


@pytest.mark.parametrize(
    ("reply", "options", "expected"),
    [pytest.param(reply, options, expected, id=case_id) for case_id, reply, options, expected in EXTRACT_CASES],
)
def test_extract_answer(reply: str, options: dict[str, str], expected: set[str]) -> None:
    result = extract_answer(reply, options)
    assert isinstance(result, frozenset)
    assert result == frozenset(expected)


def test_extract_answer_case_count() -> None:
    assert len(EXTRACT_CASES) >= 40


def test_extract_answer_no_options() -> None:
    assert extract_answer("The answer is B.", {}) == frozenset()


FIRST_LAST_CASES = [
    ("first_differs", "The answer is A. Wait, reconsider: the answer is C.", EN, {"A"}, {"C"}),
    ("first_differs_zh", "答案：B。但是考虑到腹水，正确答案是 C 和 D", ZH, {"B"}, {"C", "D"}),
    ("single_statement", "Answer: D", EN, {"D"}, {"D"}),
    ("fallback_same", "B. Heparin", EN, {"B"}, {"B"}),
    ("fallback_text_same", "Warfarin.", EN, {"C"}, {"C"}),
    ("nothing", "No idea.", EN, set(), set()),
    (
        "only_final_response_counts",
        "## Thinking\n\nThe answer is A.\n\n## Final Response\n\nAnswer: B, later revised: the answer is D.",
        EN,
        {"B"},
        {"D"},
    ),
]


@pytest.mark.parametrize(
    ("reply", "options", "first", "last"),
    [pytest.param(r, o, f, lst, id=case_id) for case_id, r, o, f, lst in FIRST_LAST_CASES],
)
def test_first_and_last_answers(reply: str, options: dict[str, str], first: set[str], last: set[str]) -> None:
    assert first_and_last_answers(reply, options) == (frozenset(first), frozenset(last))
    assert extract_answer(reply, options) == frozenset(last)


# A correction SmolLM2-135M wrote in the demo (fp32, on an AVX2-only CPU): a restated list, an answer, then a loop of
# letters that ends in no statement. The letter-list patterns once took time exponential in such a loop's length
# (the demo's verdict pass hung on this reply).
LOOPING_CORRECTION = (
    "<think>\n<answer>\nA. Oral ciprofloxacin\nB. Intravenous vancomycin\nC. Intramubristine penicillin G\n"
    "D. Intramubristine penicillin A\n\nThe answer is: D. Intramubristine penicillin A\n\nThis answer contains the "
    "letter(s) of the correct option(s) but with the letter(s) of the correct answer, and the letter(s) of the "
    "correct answer are: A, B, C, D, C, D, C, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D, D,"
)
SYPHILIS = {"A": "Oral ciprofloxacin", "B": "Intravenous vancomycin", "C": "Intramuscular gentamicin",
            "D": "Intramuscular benzathine penicillin G"}


LOOPS = ["", " D,", " D and", " D  ,  ", " (D)", " \t", " Option D", " A or B or", " answer: d,"]


def test_a_reply_that_loops_is_read_in_time_linear_in_its_length() -> None:
    # In a child process that is killed after a minute: a regex search does not stop for signals, so a hang in the
    # test's own process would hang the suite instead of failing this test. The loops take about a second together.
    script = (
        "import json, sys\n"
        "from sphuatuo.parsing.replies import first_and_last_answers\n"
        "reply, options, loops = json.load(sys.stdin)\n"
        "print(json.dumps([list(map(sorted, first_and_last_answers(reply + loop * 3000, options)))"
        " for loop in loops]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps([LOOPING_CORRECTION, SYPHILIS, LOOPS]),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    for loop, (first, last) in zip(LOOPS, json.loads(done.stdout), strict=True):
        assert first == ["D"], loop  # "The answer is: D"; the loop after it is what the last statement reads
        assert set(last) <= set(SYPHILIS), loop


SPLIT_THINK_ANSWER_CASES = [
    ("well_formed", "<think>reason</think><answer>B</answer>", ThinkAnswer("reason", "B", None)),
    (
        "whitespace",
        "  <think>\n reason \n</think>\n\n<answer>\n B \n</answer>\n",
        ThinkAnswer("reason", "B", None),
    ),
    ("tag_case_and_spaces", "<THINK>r</ think>< answer >C</Answer>", ThinkAnswer("r", "C", None)),
    ("missing_think_open", "I start inside.</think><answer>A</answer>", ThinkAnswer("I start inside.", "A", None)),
    ("missing_think_close", "<think>reason<answer>A</answer>", ThinkAnswer("reason", "A", None)),
    ("truncated_answer", "<think>r</think><answer>The answer is", ThinkAnswer("r", "The answer is", None)),
    ("truncated_in_think", "<think>still thinking", ThinkAnswer("still thinking", "", "no <answer> section")),
    ("no_answer_tag", "<think>r</think>B", ThinkAnswer("r", "", "no <answer> section")),
    ("close_without_open", "<think>r</think>B</answer>", ThinkAnswer("r", "", "no <answer> section")),
    ("no_tags", "plain reply", ThinkAnswer("plain reply", "", "no <answer> section")),
    ("empty", "", ThinkAnswer("", "", "no <answer> section")),
    ("answer_only", "<answer>D</answer>", ThinkAnswer("", "D", None)),
    (
        "multiple_answers_last",
        "<think>r</think><answer>A</answer>\n<answer>C</answer>",
        ThinkAnswer("r", "C", None),
    ),
    ("text_after_answer_close", "<think>r</think><answer>B</answer> trailing", ThinkAnswer("r", "B", None)),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [pytest.param(text, expected, id=case_id) for case_id, text, expected in SPLIT_THINK_ANSWER_CASES],
)
def test_split_think_answer(text: str, expected: ThinkAnswer) -> None:
    assert split_think_answer(text) == expected


def test_think_answer_is_frozen() -> None:
    result = split_think_answer("<think>r</think><answer>B</answer>")
    with pytest.raises(AttributeError):
        result.answer = "C"  # type: ignore[misc]


SPLIT_THINKING_RESPONSE_CASES = [
    (
        "well_formed",
        "## Thinking\n\nreasoning here\n\n## Final Response\n\nThe answer is B.",
        "reasoning here",
        "The answer is B.",
        None,
    ),
    (
        "heading_trailing_space",
        "## Thinking  \n\nr\n\n## Final Response \n\nB",
        "r",
        "B",
        None,
    ),
    ("no_headings", "just an answer", "just an answer", "", ["Thinking', found 0", "Final Response', found 0"]),
    ("missing_final", "## Thinking\n\ntruncated reasoning", "truncated reasoning", "", ["Final Response', found 0"]),
    ("missing_thinking", "## Final Response\n\nC", "", "C", ["Thinking', found 0"]),
    (
        "duplicate_final",
        "## Thinking\n\nr\n\n## Final Response\n\nfirst\n\n## Final Response\n\nsecond",
        "r",
        "second",
        ["Final Response', found 2"],
    ),
    (
        "duplicate_thinking",
        "## Thinking\n\na\n\n## Thinking\n\nb\n\n## Final Response\n\nC",
        "a\n\n## Thinking\n\nb",
        "C",
        ["Thinking', found 2"],
    ),
    (
        "wrong_order",
        "## Final Response\n\nB\n\n## Thinking\n\nr",
        "r",
        "B\n\n## Thinking\n\nr",
        ["comes before"],
    ),
    (
        "inline_mention_not_heading",
        "We discuss ## Thinking inline.\n## Final Response\nA",
        "We discuss ## Thinking inline.",
        "A",
        ["Thinking', found 0"],
    ),
]


@pytest.mark.parametrize(
    ("text", "think", "answer", "error_parts"),
    [pytest.param(t, th, a, e, id=case_id) for case_id, t, th, a, e in SPLIT_THINKING_RESPONSE_CASES],
)
def test_split_thinking_response(text: str, think: str, answer: str, error_parts: list[str] | None) -> None:
    result = split_thinking_response(text)
    assert result.answer == answer
    if error_parts is None:
        assert result.parse_error is None
        assert result.think == think
    else:
        assert result.parse_error is not None
        for part in error_parts:
            assert part in result.parse_error
        if think:
            assert result.think == think


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("2", False),
        ("  1\n", True),
        ("\n2 ", False),
        ("1 - the reply is correct", True),
        ("2. wrong", False),
        ("１", True),
        ("3", None),
        ("", None),
        ("   ", None),
        ("yes", None),
        ("The answer is 1", None),
    ],
)
def test_parse_judge_verdict(text: str, expected: bool | None) -> None:
    assert parse_judge_verdict(text) is expected


@pytest.mark.parametrize(
    ("letters", "expected"),
    [
        (["C", "A"], "A, C"),
        (frozenset({"D", "B"}), "B, D"),
        (["B"], "B"),
        ([], ""),
        (["A", "A", "C"], "A, C"),
        ("CA", "A, C"),
    ],
)
def test_letters_text(letters, expected: str) -> None:
    assert letters_text(letters) == expected
