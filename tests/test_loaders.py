"""Loaders: good rows load with the right fields, bad rows become rejects that say where and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sphuatuo.data.files import file_namespace
from sphuatuo.data.loaders import FORMATS, LoadResult, Reject, load_questions, summarize, write_rejects

FIXTURES = Path(__file__).parent / "fixtures" / "questions"
# What ids of records without one start with, in each fixture file (`<stem>-<digest of the path>`).
CMEXAM, O1_EVAL, MEDQA, NATIVE = (file_namespace(str(FIXTURES / name)) for name in (
    "cmexam_sample.csv", "o1_eval_sample.json", "medqa_sample.jsonl", "broken_native.jsonl"))
SAMPLE_BANK = Path(__file__).parents[1] / "sphuatuo" / "data" / "sample_bank.jsonl"


def by_id(result: LoadResult) -> dict:
    return {q.id: q for q in result.questions}


def reasons_by_row(result: LoadResult) -> dict[int, str]:
    return {r.row: r.reason for r in result.rejects}


# --- CMExam CSV -----------------------------------------------------------------------------


def test_cmexam_good_rows_keep_options_multi_answers_and_extra_columns():
    result = load_questions(FIXTURES / "cmexam_sample.csv", format="cmexam")
    questions = by_id(result)
    assert list(questions) == [f"{CMEXAM}:1", f"{CMEXAM}:2", f"{CMEXAM}:3", f"{CMEXAM}:7"]

    first = questions[f"{CMEXAM}:1"]
    assert first.options == {"A": "阿昔洛韦", "B": "青霉素", "C": "甲硝唑", "D": "氟康唑", "E": "利福平"}
    assert first.answer == ("A",)
    assert first.explanation == "阿昔洛韦抑制疱疹病毒DNA聚合酶。"
    assert first.source == "cmexam"
    assert first.metadata == {
        "Disease Group": "眼科感染",
        "Clinical Department": "眼科",
        "Medical Discipline": "临床医学",
        "Area of Competency": "诊断与治疗",
        "Difficulty level": "2",
    }
    # Letters followed by '.', '、', '：' and ':'; answer "BD" means two letters.
    second = questions[f"{CMEXAM}:2"]
    assert second.options == {"A": "利多卡因", "B": "胺碘酮", "C": "普萘洛尔", "D": "索他洛尔"}
    assert second.answer == ("B", "D")
    assert second.metadata == {"Clinical Department": "心内科", "Medical Discipline": "药学", "Difficulty level": "3"}
    # "A,C" style answers, English text, empty extra columns left out of metadata.
    third = questions[f"{CMEXAM}:3"]
    assert third.answer == ("A", "C")
    assert third.reference == "A. Vitamin A; C. Vitamin D"
    assert third.metadata == {}


def test_cmexam_bad_rows_are_rejected_with_data_row_numbers():
    result = load_questions(FIXTURES / "cmexam_sample.csv", format="cmexam")
    reasons = reasons_by_row(result)
    assert sorted(reasons) == [4, 5, 6, 8, 9]
    assert reasons[4] == "answer letter(s) E not among the options A, B, C, D"
    assert reasons[5] == "question text is empty"
    assert reasons[6] == "undecodable text (invalid UTF-8)"
    assert "only 1 option(s)" in reasons[8]
    assert reasons[9] == "missing field(s): Answer"
    undecodable = next(r for r in result.rejects if r.row == 6)
    assert undecodable.id == f"{CMEXAM}:6"
    assert "\ufffd" in undecodable.raw and "胰岛素的主要作用是" in undecodable.raw
    assert all(r.file == str(FIXTURES / "cmexam_sample.csv") for r in result.rejects)


def test_cmexam_option_continuation_lines_duplicates_id_column_and_bom(tmp_path):
    path = tmp_path / "exam.csv"
    rows = [
        'ID,question,OPTIONS,answer',
        'q-1,Which drug?,"A aspirin\n  (low dose)\nB heparin",A',
        'q-2,Which twice?,"A one\nB two\nB three",B',
        ',No id cell,"A yes\nB no",B',
        'q-4,No letter first,"aspirin\nB heparin",B',
    ]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())
    result = load_questions(path)  # .csv means cmexam
    questions = by_id(result)
    assert questions["q-1"].options == {"A": "aspirin (low dose)", "B": "heparin"}
    assert questions[f"{file_namespace(str(path))}:3"].answer == ("B",)
    assert questions["q-1"].explanation == ""
    reasons = reasons_by_row(result)
    assert reasons == {
        2: "option B appears twice in Options",
        4: "Options does not start with an option letter: 'aspirin'",
    }


def test_cmexam_row_with_too_many_cells_is_rejected(tmp_path):
    path = tmp_path / "exam.csv"
    path.write_text('Question,Options,Answer\nQ1,"A x\nB y",A,stray\nQ2,"A x\nB y",B\n', encoding="utf-8")
    result = load_questions(path, format="cmexam")
    assert [q.id for q in result.questions] == [f"{file_namespace(str(path))}:2"]
    assert result.rejects[0].row == 1
    assert "4 cells but the header has 3 columns" in result.rejects[0].reason


def test_cmexam_header_without_required_columns_raises(tmp_path):
    path = tmp_path / "exam.csv"
    path.write_text("Question,Explanation\nQ,E\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"exam\.csv.*Options, Answer"):
        load_questions(path, format="cmexam")


# --- HuatuoGPT-o1 eval JSON -----------------------------------------------------------------


def test_o1_eval_items_take_source_from_key_and_ids_from_file_and_row():
    result = load_questions(FIXTURES / "o1_eval_sample.json", format="huatuo_o1_eval")
    questions = by_id(result)
    assert list(questions) == [f"{O1_EVAL}:1", f"{O1_EVAL}:3", "custom-7", f"{O1_EVAL}:7"]
    ovulation = questions[f"{O1_EVAL}:1"]
    assert ovulation.source == "MedQA_USLME_test"
    assert ovulation.answer == ("B",)
    assert ovulation.reference == "B. LH surge"
    assert questions["custom-7"].source == "MedMCQA_validation"
    assert questions[f"{O1_EVAL}:7"].options == {
        "A": "Hypercalcaemia", "B": "Hypocalcaemia", "C": "Hypernatraemia"
    }


def test_o1_eval_rejects_count_rows_across_sources():
    result = load_questions(FIXTURES / "o1_eval_sample.json", format="huatuo_o1_eval", source="ignored")
    assert {(r.row, r.id) for r in result.rejects} == {
        (2, f"{O1_EVAL}:2"),
        (5, f"{O1_EVAL}:5"),
        (6, f"{O1_EVAL}:6"),
    }
    reasons = reasons_by_row(result)
    assert reasons[2] == "answer letter(s) E not among the options A, B, C, D"
    assert "only 1 option(s)" in reasons[5]
    assert reasons[6] == "expected a JSON object, got a string"
    assert {q.source for q in result.questions} == {"MedQA_USLME_test", "MedMCQA_validation"}


@pytest.mark.parametrize(
    ("fmt", "document", "complaint"),
    [
        ("huatuo_o1_eval", [1, 2], "expected a JSON object mapping source names"),
        ("huatuo_o1_eval", {"MedQA": {"question": "x"}}, "'MedQA' is not a list"),
        ("sp_conversations", {"id": 1}, "expected a JSON list of conversations"),
    ],
)
def test_json_files_of_the_wrong_shape_raise_naming_the_file(tmp_path, fmt, document, complaint):
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(ValueError, match="wrong.json") as raised:
        load_questions(path, format=fmt)
    assert complaint in str(raised.value)


def test_json_file_that_is_not_json_raises(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"MedQA": [', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        load_questions(path, format="huatuo_o1_eval")


# --- MedQA / MedMCQA JSONL ------------------------------------------------------------------


def test_medqa_loads_options_answer_and_meta_info():
    result = load_questions(FIXTURES / "medqa_sample.jsonl", format="medqa")
    questions = by_id(result)
    assert list(questions) == [f"{MEDQA}:1", f"{MEDQA}:2", f"{MEDQA}:6"]
    meningitis = questions[f"{MEDQA}:1"]
    assert meningitis.answer == ("A",)
    assert meningitis.options["A"] == "Neisseria meningitidis"
    assert meningitis.metadata == {"meta_info": "step2&3"}
    assert meningitis.source == "medqa"
    assert questions[f"{MEDQA}:6"].metadata == {}


def test_medqa_rejects_use_line_numbers_counting_blank_lines():
    result = load_questions(FIXTURES / "medqa_sample.jsonl", format="medqa")
    reasons = reasons_by_row(result)
    assert sorted(reasons) == [4, 5]
    assert reasons[4].startswith("malformed JSON: Expecting ',' delimiter")
    assert reasons[5] == "missing field(s): answer_idx"


def test_medmcqa_original_and_medqa_style_rows():
    result = load_questions(FIXTURES / "medmcqa_sample.jsonl", format="medmcqa")
    questions = by_id(result)
    assert list(questions) == ["mm-001", "mm-002", "mm-007"]
    absence = questions["mm-001"]
    assert absence.options == {"A": "Phenytoin", "B": "Carbamazepine", "C": "Ethosuximide", "D": "Phenobarbitone"}
    assert absence.answer == ("C",)  # cop 3 is 1-based: opc
    assert absence.explanation == "Ethosuximide blocks T-type calcium channels in the thalamus."
    assert absence.metadata == {"subject_name": "Pharmacology", "choice_type": "single"}  # null topic left out
    assert questions["mm-002"].answer == ("B",)
    assert questions["mm-007"].answer == ("A",)
    assert questions["mm-007"].explanation == ""
    assert questions["mm-007"].metadata["topic_name"] == "Bacteriology"


def test_medmcqa_rejects_bad_cop_duplicate_ids_and_bad_bytes_only():
    result = load_questions(FIXTURES / "medmcqa_sample.jsonl", format="medmcqa")
    reasons = reasons_by_row(result)
    assert sorted(reasons) == [3, 4, 5, 6]
    assert reasons[3] == "cop must be an option number from 1 (opa) to 4 (opd), got 5"
    assert reasons[4] == "cop must be an option number from 1 (opa) to 4 (opd), got 0"
    assert reasons[5] == "duplicate id 'mm-001' (first seen at row 1)"
    assert reasons[6] == "undecodable text (invalid UTF-8)"
    assert next(r for r in result.rejects if r.row == 6).id == "mm-006"
    # The first mm-001 is the one kept.
    assert by_id(result)["mm-001"].question.startswith("Drug of choice")


def test_source_argument_names_records_without_their_own_source():
    result = load_questions(FIXTURES / "medqa_sample.jsonl", format="medqa", source="MedQA-USMLE")
    assert {q.source for q in result.questions} == {"MedQA-USMLE"}


# --- SP-Huatuo conversations ----------------------------------------------------------------


def test_sp_conversations_split_answer_from_background():
    result = load_questions(FIXTURES / "sp_conversations_sample.json", format="sp_conversations")
    questions = by_id(result)
    assert list(questions) == ["sp-1", "sp-2", "sp-7"]
    febrile = questions["sp-1"]
    assert not febrile.is_multiple_choice
    assert febrile.question == "小儿高热惊厥最常见的发病年龄是多少？"
    assert febrile.reference == "6个月至5岁"
    assert febrile.explanation == "高热惊厥多见于6个月至5岁儿童，常在体温骤升时发生。"
    # Without the 答案是/背景信息 shape the whole reply is the reference.
    assert questions["sp-2"].reference == "Vitamin K together with prothrombin complex concentrate."
    assert questions["sp-2"].explanation == ""


def test_sp_conversations_rejects():
    result = load_questions(FIXTURES / "sp_conversations_sample.json", format="sp_conversations")
    reasons = reasons_by_row(result)
    assert reasons == {
        3: "missing field(s): conversations",
        4: "conversations has no assistant turn after the user turn",
        5: "question text is empty",
        6: "duplicate id 'sp-1' (first seen at row 1)",
    }


# --- Native format --------------------------------------------------------------------------


def test_native_keeps_good_lines_around_broken_ones():
    result = load_questions(FIXTURES / "broken_native.jsonl", format="sphuatuo")
    questions = by_id(result)
    assert list(questions) == ["n-1", "n-2", "n-12"]
    assert questions["n-1"].source == "native-test"
    assert questions["n-1"].metadata == {"topic": "physiology", "difficulty": "easy"}
    assert questions["n-12"].answer == ("A", "B")
    scurvy = questions["n-2"]
    assert not scurvy.is_multiple_choice
    assert scurvy.reference == "Vitamin C"
    assert scurvy.source == "sphuatuo"  # no source of its own: the format name


def test_native_rejects_name_the_problem():
    result = load_questions(FIXTURES / "broken_native.jsonl", format="sphuatuo")
    reasons = reasons_by_row(result)
    assert reasons == {
        3: "unexpected field 'hint'",
        4: "missing field(s): id",
        5: "answer letter(s) E not among the options A, B, C, D",
        6: "only 1 option(s); a multiple-choice item needs at least 2",
        7: "answer must be option letter(s), got 2",
        8: "expected a JSON object, got a list",
        9: "malformed JSON: Expecting property name enclosed in double quotes at column 39",
        10: "undecodable text (invalid UTF-8)",
        11: "duplicate id 'n-1' (first seen at row 1)",
    }
    ids = {r.row: r.id for r in result.rejects}
    assert ids[4] == f"{NATIVE}:4" and ids[8] == f"{NATIVE}:8" and ids[10] == "n-10"


def test_raw_record_is_truncated(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "q" * 5000, "options": {"A": "a"}, "answer": ["A"]}) + "\n")
    (reject,) = load_questions(path, format="sphuatuo").rejects
    assert reject.raw.startswith('{"id": "x"')
    assert len(reject.raw) <= 2001


# --- Detection, errors, reporting -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("cmexam_sample.csv", "cmexam"),
        ("o1_eval_sample.json", "huatuo_o1_eval"),
        ("medqa_sample.jsonl", "medqa"),
        ("medmcqa_sample.jsonl", "medmcqa"),
        ("sp_conversations_sample.json", "sp_conversations"),
        ("broken_native.jsonl", "sphuatuo"),
    ],
)
def test_detected_format_loads_like_the_named_one(name, fmt):
    assert fmt in FORMATS
    assert load_questions(FIXTURES / name) == load_questions(FIXTURES / name, format=fmt)


def test_detection_skips_unreadable_leading_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('not json\n{"id": "a", "question": "Q?", "reference": "R"}\n', encoding="utf-8")
    result = load_questions(path)
    assert [q.id for q in result.questions] == ["a"]
    assert result.rejects[0].row == 1


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.txt", "Question?"),
        ("other.jsonl", '{"prompt": "x", "completion": "y"}\n'),
        ("other.json", '[{"prompt": "x"}]'),
        ("empty.jsonl", ""),
    ],
)
def test_undetectable_format_raises_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name}: cannot tell the question format"):
        load_questions(path)


def test_missing_file_and_unknown_format_raise(tmp_path):
    with pytest.raises(ValueError, match="nowhere.jsonl: no such file"):
        load_questions(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        load_questions(FIXTURES / "medqa_sample.jsonl", format="parquet")


def test_write_rejects_round_trips(tmp_path):
    rejects = load_questions(FIXTURES / "broken_native.jsonl").rejects
    out = tmp_path / "reports" / "rejects.jsonl"
    write_rejects(rejects, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(rejects) == 9
    assert [Reject(**json.loads(line)) for line in lines] == rejects
    assert "\\u" not in out.read_text(encoding="utf-8")  # ensure_ascii=False: text stays readable


def test_summarize_reports_counts_kinds_sources_and_each_reject():
    report = summarize(load_questions(FIXTURES / "sp_conversations_sample.json"))
    lines = report.splitlines()
    assert lines[0] == "3 valid, 4 rejected"
    assert lines[1] == "0 multiple-choice, 3 open-ended"
    assert lines[2] == "sources: sp_conversations 3"
    assert "row 4 (id sp-4): conversations has no assistant turn after the user turn" in lines
    assert len(lines) == 3 + 4


# --- Sample bank ----------------------------------------------------------------------------


def test_sample_bank_is_clean_bilingual_and_varied():
    result = load_questions(SAMPLE_BANK)
    assert result.rejects == []
    questions = result.questions
    assert len(questions) >= 60
    english = [q for q in questions if q.id.startswith("sample-en-")]
    chinese = [q for q in questions if q.id.startswith("sample-zh-")]
    assert len(english) + len(chinese) == len(questions)
    assert min(len(english), len(chinese)) >= 0.4 * len(questions)
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in q.question) for q in chinese)
    assert not any(any("\u4e00" <= ch <= "\u9fff" for ch in q.question) for q in english)
    assert sum(len(q.answer) > 1 for q in questions) >= 5
    for q in questions:
        assert 4 <= len(q.options) <= 5, q.id
        assert q.answer and set(q.answer) <= set(q.options), q.id
        assert q.explanation, q.id
        assert q.source == "sphuatuo-sample"
        assert q.metadata["topic"] and q.metadata["difficulty"] in {"easy", "medium", "hard"}
    single_letters = {q.answer[0] for q in questions if len(q.answer) == 1}
    assert single_letters == set("ABCDE")
