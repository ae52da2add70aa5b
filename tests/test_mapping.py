"""Column mappings: files nobody wrote a loader for load without code, in every container, and the
proposal `data check` prints for an unknown file loads it when fed back. Ids and duplicates across files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import raw_test_recipe, tiny_recipe
from sphuatuo.data.files import file_namespace
from sphuatuo.data.loaders import UnknownFormat, load_questions, sample_records
from sphuatuo.data.mapping import ColumnMapping, mapping_yaml, propose_mapping, read_mapping
from sphuatuo.recipe import RecipeError, load_recipe
from sphuatuo.stages import StageContext, StageFailed, questions
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

# A Chinese licensing-exam layout (written for these tests): five option columns, the answer names one.
EXAM = [
    {"question": "治疗单纯疱疹病毒性角膜炎首选的药物是", "opa": "青霉素", "opb": "阿昔洛韦", "opc": "甲硝唑",
     "opd": "氟康唑", "ope": "利福平", "answer": "opb", "subject": "眼科"},
    {"question": "成人心肺复苏时胸外按压的频率应为每分钟", "opa": "60～80次", "opb": "80～100次",
     "opc": "100～120次", "opd": "120～140次", "ope": "140～160次", "answer": "opc", "subject": "急诊"},
    {"question": "缺乏维生素B1可引起", "opa": "脚气病", "opb": "夜盲症", "opc": "坏血病", "opd": "佝偻病",
     "ope": "癞皮病", "answer": "opa", "subject": "营养"},
    {"question": "诊断糖尿病的空腹血糖标准是", "opa": "≥5.6 mmol/L", "opb": "≥6.1 mmol/L", "opc": "≥7.0 mmol/L",
     "opd": "≥11.1 mmol/L", "ope": "", "answer": "opc", "subject": "内分泌"},  # four options only
    {"question": "有机磷中毒的特效解毒药是", "opa": "阿托品", "opb": "纳洛酮", "opc": "氟马西尼", "opd": "亚甲蓝",
     "ope": "维生素K", "answer": "opf", "subject": "急诊"},  # names no option column
    {"question": "新生儿生理性黄疸一般出现在生后", "opa": "24小时内", "opb": "2～3天", "opc": "第7天",
     "opd": "2周后", "ope": "1个月后", "answer": "opb", "subject": "儿科"},
    {"question": "", "opa": "甲", "opb": "乙", "opc": "丙", "opd": "丁", "ope": "戊", "answer": "opa",
     "subject": "空"},  # no question text
    {"question": "成人心肺复苏时胸外按压的频率应为每分钟  ", "opa": "60～80次", "opb": "80～100次",
     "opc": "100～120次", "opd": "120～140次", "ope": "140～160次", "answer": "opc", "subject": "急诊"},  # = item 2
]
EXAM_MAPPING = ColumnMapping(question="question", options=["opa", "opb", "opc", "opd", "ope"], answer="answer",
                             answer_kind="option_column", metadata=["subject"])

# MedMCQA's layout: four option columns, `cop` the correct option's number.
MEDMCQA = [
    {"id": "m1", "question": "Drug of choice for absence seizures is", "opa": "Phenytoin", "opb": "Carbamazepine",
     "opc": "Ethosuximide", "opd": "Phenobarbitone", "cop": 2, "exp": "T-type calcium channels.",
     "subject_name": "Pharmacology"},
    {"id": "m2", "question": "Vitamin deficient in Wernicke encephalopathy is", "opa": "Thiamine", "opb": "Niacin",
     "opc": "Folate", "opd": "Cobalamin", "cop": 0, "exp": None, "subject_name": "Medicine"},
    {"id": "m3", "question": "Causative agent of cholera is", "opa": "Shigella", "opb": "Salmonella",
     "opc": "Campylobacter", "opd": "Vibrio cholerae", "cop": 3, "exp": "", "subject_name": "Microbiology"},
]


def _write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def _sphuatuo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sphuatuo.cli", *args], capture_output=True, text=True)


# --- The exam file through a mapping ---------------------------------------------------------


def test_exam_json_array_loads_through_a_mapping(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "exam.json", EXAM)
    result = load_questions(path, format=EXAM_MAPPING)
    exam = file_namespace(str(path))
    questions = {q.id: q for q in result.questions}
    assert list(questions) == [f"{exam}:{row}" for row in (1, 2, 3, 4, 6)]
    first = questions[f"{exam}:1"]
    assert first.options["B"] == "阿昔洛韦" and first.answer == ("B",) and first.reference == "B. 阿昔洛韦"
    assert first.metadata == {"subject": "眼科"} and first.source == "exam"
    assert questions[f"{exam}:4"].options == {"A": "≥5.6 mmol/L", "B": "≥6.1 mmol/L", "C": "≥7.0 mmol/L",
                                           "D": "≥11.1 mmol/L"}
    assert {r.row: r.reason for r in result.rejects} == {
        5: "answer 'opf' names no option column (opa, opb, opc, opd, ope)",
        7: "missing field(s): question",
        8: f"duplicate of {path} row 2",
    }


def test_a_pretty_printed_array_is_read_as_items_not_lines(tmp_path: Path) -> None:
    """It used to be read as JSONL: one malformed-JSON reject per line of the file."""
    path = _write_json(tmp_path / "exam.json", MEDMCQA)
    result = load_questions(path, format="medmcqa")
    assert [q.id for q in result.questions] == ["m1", "m3"] and len(result.rejects) == 1
    assert result.rejects[0].reason == "cop must be an option number from 1 (opa) to 4 (opd), got 0"
    assert load_questions(path) == load_questions(path, format="medmcqa_hf")  # detected: a 0 among cop values


# --- MedMCQA: released (1-based) and hub (0-based) numbering -----------------------------------


def test_medmcqa_layout_counted_from_zero_or_one(tmp_path: Path) -> None:
    path = tmp_path / "medmcqa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in MEDMCQA), encoding="utf-8")
    hub = load_questions(path, format="medmcqa_hf")
    assert [q.answer for q in hub.questions] == [("C",), ("A",), ("D",)]
    assert hub.questions[0].explanation == "T-type calcium channels."
    assert hub.questions[0].metadata == {"subject_name": "Pharmacology"}
    released = load_questions(path, format="medmcqa_original")
    assert [q.answer for q in released.questions] == [("B",), ("C",)]
    assert released.rejects[0].reason == "cop must be an option number from 1 (opa) to 4 (opd), got 0"
    # A file whose cop values run 0-3 with a 0 among them is the hub's numbering.
    assert load_questions(path) == hub


def test_datasets_save_to_disk_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "medmcqa_hub"
    datasets.Dataset.from_list(MEDMCQA).save_to_disk(str(folder))
    result = load_questions(folder)  # a folder is a datasets folder; the cop values say 0-based
    assert [q.id for q in result.questions] == ["m1", "m2", "m3"]
    assert [q.answer for q in result.questions] == [("C",), ("A",), ("D",)]
    assert result.questions[2].options["D"] == "Vibrio cholerae"

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MEDMCQA[:2]),
                          "test": datasets.Dataset.from_list(MEDMCQA[2:])}).save_to_disk(str(splits))
    with pytest.raises(ValueError, match="splits train, test; name one with `split:`"):
        load_questions(splits, format="medmcqa_hf")
    test_split = load_questions(splits, format=ColumnMapping(**{**_medmcqa_columns(), "split": "test"}))
    assert [(q.id, q.answer) for q in test_split.questions] == [("m3", ("D",))]


def test_a_folder_of_parquet_files_by_split(tmp_path: Path) -> None:
    """The layout of a hub dataset snapshot: data/<split>-NNNNN-of-NNNNN.parquet."""
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(MEDMCQA[:2]), tmp_path / "snapshot" / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(MEDMCQA[2:]), tmp_path / "snapshot" / "data" / "test-00000-of-00001.parquet")
    test = load_questions(tmp_path / "snapshot", format=ColumnMapping(**{**_medmcqa_columns(), "split": "test"}))
    assert [(q.id, q.answer) for q in test.questions] == [("m3", ("D",))]
    everything = load_questions(tmp_path / "snapshot", format="medmcqa_hf")
    assert [q.id for q in everything.questions] == ["m3", "m1", "m2"]
    with pytest.raises(ValueError, match=r"snapshot: no column\(s\) correct; it has id, question, opa"):
        load_questions(tmp_path / "snapshot", format=ColumnMapping(**{**_medmcqa_columns(), "answer": "correct"}))


def _medmcqa_columns() -> dict:
    return {"question": "question", "options": ["opa", "opb", "opc", "opd"], "answer": "cop",
            "answer_kind": "index0", "id": "id"}


# --- CSV, Parquet, URIs -------------------------------------------------------------------------


def test_csv_with_letter_answers_and_a_blank_id_cell(tmp_path: Path) -> None:
    path = tmp_path / "bank.csv"
    path.write_text("qid,stem,A,B,C,key,why\n"
                    "k1,Antidote of paracetamol?,N-acetylcysteine,Naloxone,Atropine,a,Glutathione.\n"
                    ",Antidote of heparin?,Vitamin K,Protamine,Flumazenil,B,\n"
                    "k3,Antidote of warfarin?,Vitamin K,Protamine,Flumazenil,D,\n", encoding="utf-8")
    mapping = ColumnMapping(question="stem", options=["A", "B", "C"], answer="key", id="qid", explanation="why")
    result = load_questions(path, format=mapping)
    assert [(q.id, q.answer, q.explanation) for q in result.questions] == [
        ("k1", ("A",), "Glutathione."), (f"{file_namespace(str(path))}:2", ("B",), "")]
    assert (result.rejects[0].row, result.rejects[0].reason) == (3, "answer letter(s) D not among the options A, B, C")
    with pytest.raises(ValueError, match=r"bank\.csv: no column\(s\) question"):
        load_questions(path, format=ColumnMapping(question="question", reference="why"))


def test_parquet_with_a_list_column_and_option_text_answers(tmp_path: Path) -> None:
    path = tmp_path / "bank.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "Most common cause of community-acquired pneumonia?",
         "choices": ["Streptococcus pneumoniae", "Klebsiella", "Legionella"], "gold": "Streptococcus pneumoniae"},
        {"prompt": "Drug for absence seizures?", "choices": ["Ethosuximide", "Phenytoin"], "gold": " ethosuximide "},
        {"prompt": "Drug for status epilepticus?", "choices": ["Lorazepam", "Phenytoin"], "gold": "Valproate"},
    ]), path)
    mapping = ColumnMapping(question="prompt", options="choices", answer="gold", answer_kind="option_text")
    result = load_questions(path, format=mapping)
    bank = file_namespace(str(path))
    assert [(q.id, q.answer) for q in result.questions] == [(f"{bank}:1", ("A",)), (f"{bank}:2", ("A",))]
    assert result.rejects[0].reason == "gold 'Valproate' is not the text of any option"
    assert load_questions(f"file://{path}", format=mapping).questions == result.questions  # a pyarrow URI


def test_index_and_key_answers_follow_option_order_blanks_included(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "bank.json", [
        {"q": "Which is C?", "choices": ["a", "", "c"], "k": 2},  # a blank option keeps its position
        {"q": "Which is B?", "choices": {"B": "b", "A": "a"}, "k": 0},  # mapping order, its own letters
    ])
    result = load_questions(path, format=ColumnMapping(question="q", options="choices", answer="k",
                                                       answer_kind="index0"))
    assert [(q.options, q.answer) for q in result.questions] == [
        ({"A": "a", "C": "c"}, ("C",)), ({"A": "a", "B": "b"}, ("B",))]


def test_a_mapping_must_say_how_to_score() -> None:
    with pytest.raises(ValueError, match="no answer column"):
        ColumnMapping(question="q", options=["a", "b"])
    with pytest.raises(ValueError, match="reference column is needed"):
        ColumnMapping(question="q")
    with pytest.raises(ValueError, match="answer_kind"):
        ColumnMapping(question="q", options="o", answer="a", answer_kind="index2")  # type: ignore[arg-type]


# --- Proposal, fed back ---------------------------------------------------------------------------


def test_data_check_proposes_a_mapping_that_loads_the_file(tmp_path: Path) -> None:
    path = _write_json(tmp_path / "exam.json", EXAM)
    with pytest.raises(UnknownFormat):
        load_questions(path)
    assert propose_mapping(sample_records(path)) == EXAM_MAPPING

    checked = _sphuatuo("data", "check", str(path))
    assert checked.returncode == 1 and "cannot tell the question format" in checked.stderr
    proposal = tmp_path / "mapping.yaml"
    proposal.write_text(checked.stdout, encoding="utf-8")  # comments and YAML: pasted as is
    assert read_mapping(proposal) == EXAM_MAPPING
    again = _sphuatuo("data", "check", str(path), "--columns", str(proposal))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == "5 valid, 3 rejected"


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"id": 1, "question": "Q?", "opa": "x", "opb": "y", "cop": 1}, {"id": 2, "question": "R?", "opa": "x",
          "opb": "y", "cop": 2}], {"answer": "cop", "answer_kind": "index1", "id": "id"}),
        ([{"Question": "Q?", "Options": {"A": "x", "B": "y"}, "Answer": "B", "Explanation": "because"}],
         {"question": "Question", "options": "Options", "answer": "Answer", "explanation": "Explanation"}),
        ([{"input": "What causes scurvy?", "output": "Vitamin C deficiency", "topic": "nutrition"}],
         {"question": "input", "reference": "output", "metadata": ["topic"]}),
    ],
)
def test_proposals_by_name_and_content(rows: list[dict], expected: dict) -> None:
    proposal = propose_mapping(rows)
    assert proposal is not None
    assert {key: value for key, value in proposal.model_dump(exclude_defaults=True).items() if key in expected} \
        == expected
    assert ColumnMapping.model_validate(yaml.safe_load(mapping_yaml(proposal))) == proposal


# --- data convert ---------------------------------------------------------------------------------


def test_data_convert_to_jsonl_and_parquet_with_rejects_beside(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    path = _write_json(tmp_path / "exam.json", EXAM)
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text(mapping_yaml(EXAM_MAPPING), encoding="utf-8")
    expected = load_questions(path, format=EXAM_MAPPING).questions
    for out in (tmp_path / "out" / "exam.jsonl", tmp_path / "hf" / "exam.parquet"):
        converted = _sphuatuo("data", "convert", str(path), "--columns", str(mapping), "--out", str(out))
        assert converted.returncode == 0, converted.stderr
        assert converted.stdout.splitlines()[0] == "5 valid, 3 rejected"
        rejects = [json.loads(line) for line in out.with_suffix(".rejects.jsonl").read_text().splitlines()]
        assert [r["row"] for r in rejects] == [5, 7, 8]
        assert load_questions(out).questions == expected  # the native format reads both back
    table = datasets.Dataset.from_parquet(str(tmp_path / "hf" / "exam.parquet"))
    assert table.num_rows == 5 and table[0]["answer"] == ["B"]
    assert table[0]["options"][1] == {"letter": "B", "text": "阿昔洛韦"}


# --- Ids and duplicates across files ----------------------------------------------------------------


def _load(tmp_path: Path, train: list[dict], test: list[dict] | None = None) -> tuple[RunRoot, StageRecord]:
    """The questions stage over these sources, as a run does it (the files read on a worker)."""
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": train, "data.test": test or [], "data.test_fraction": 0})
    run, record = RunRoot(recipe.run_root), StageRecord()
    questions.run(StageContext(recipe=recipe, run=run, record=record))
    return run, record


@pytest.mark.slow
def test_files_without_ids_never_collide_and_repeats_across_files_are_rejected(tmp_path: Path, ray_cluster) -> None:
    first = _write_json(tmp_path / "a.json", EXAM[:3])
    second = _write_json(tmp_path / "b.json", EXAM[2:4])  # EXAM[2] is in both
    run, record = _load(tmp_path, [{"path": str(first), "columns": EXAM_MAPPING},
                                   {"path": str(second), "columns": EXAM_MAPPING}])
    a, b = file_namespace(str(first)), file_namespace(str(second))
    assert run.read_column("id", "questions", "train") == [f"{a}:1", f"{a}:2", f"{a}:3", f"{b}:2"]
    (reject,) = [json.loads(line) for line in run.read_text("questions", "rejects.jsonl").splitlines()]
    assert (reject["file"], reject["row"], reject["reason"]) == (str(second), 1, f"duplicate of {first} row 3")
    assert record.rows_rejected == 1
    # The same file listed twice: every question a duplicate of itself by id.
    twice, _ = _load(tmp_path / "twice", [{"path": str(first), "columns": EXAM_MAPPING}] * 2)
    rejects = [json.loads(line) for line in twice.read_text("questions", "rejects.jsonl").splitlines()]
    assert len(twice.read_column("id", "questions", "train")) == 3
    assert len(rejects) == 3 and all("duplicate id" in r["reason"] for r in rejects)


@pytest.mark.slow
def test_a_question_in_train_and_test_is_named_in_both_places(tmp_path: Path, ray_cluster) -> None:
    train = _write_json(tmp_path / "train.json", EXAM[:3])
    respaced = {**EXAM[0], "question": " 治疗单纯疱疹病毒性角膜炎首选的药物是"}
    test = _write_json(tmp_path / "test.json", [EXAM[5], respaced])
    shared = (f"train {train} row 1 (id {file_namespace(str(train))}:1) = "
              f"test {test} row 2 (id {file_namespace(str(test))}:2)")
    with pytest.raises(StageFailed, match=rf"^1 question\(s\) in both train and test: {re.escape(shared)}$"):
        _load(tmp_path, [{"path": str(train), "columns": EXAM_MAPPING}], [{"path": str(test), "columns": EXAM_MAPPING}])


@pytest.mark.slow
def test_a_large_bank_is_written_in_pieces_and_held_out_by_id(tmp_path: Path, ray_cluster,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage holds one piece of `PART_ROWS` questions at a time; the held-out split moves whole rows between
    the pieces' files and keeps every question exactly once."""
    monkeypatch.setattr(questions, "PART_ROWS", 4)
    bank = _write_json(tmp_path / "bank.json", [{**item, "question": f"{item['question']} ({n})"}
                                                for n in range(3) for item in EXAM])
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": str(bank), "columns": EXAM_MAPPING}],
                                              "data.test": [], "data.test_fraction": 0.25})
    run, record = RunRoot(recipe.run_root), StageRecord()
    questions.run(StageContext(recipe=recipe, run=run, record=record))
    loaded = load_questions(bank, format=EXAM_MAPPING).questions
    train, test = run.read_column("id", "questions", "train"), run.read_column("id", "questions", "test")
    assert sorted(train + test) == sorted(q.id for q in loaded) and not set(train) & set(test)
    assert len(run.parquet_files("questions", "train")) == -(-len(loaded) // 4)
    assert (record.details["train"], record.details["test"]) == (len(train), len(test))
    assert len(test) == round(len(loaded) * 0.25)
    questions.run(StageContext(recipe=recipe, run=run, record=StageRecord()))  # a re-run replaces, never adds
    assert sorted(run.read_column("id", "questions", "train")) == sorted(train)
    assert sorted(run.read_column("id", "questions", "test")) == sorted(test)


# --- Recipes: inline columns, datasets.yaml by name ----------------------------------------------


@pytest.mark.slow
def test_recipe_sources_name_mappings_from_datasets_yaml(tmp_path: Path, ray_cluster) -> None:
    exam = _write_json(tmp_path / "exam.json", EXAM)
    (tmp_path / "datasets.yaml").write_text(yaml.safe_dump({"my_exam": json.loads(EXAM_MAPPING.model_dump_json(
        exclude_defaults=True))}, allow_unicode=True), encoding="utf-8")
    raw = raw_test_recipe("tiny", tmp_path / "run", {})
    raw["data"]["train"] = [{"path": str(exam), "format": "my_exam"}]
    raw["data"]["test"] = [{"path": "builtin:sample_bank", "format": "sphuatuo", "limit": 2}]
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    recipe = load_recipe(recipe_path)
    (source,) = recipe.data.train
    assert source.format is None and source.columns == EXAM_MAPPING and source.source == "my_exam"
    run, _ = _load(tmp_path, [source.model_dump() for source in recipe.data.train])
    assert len(sources := run.read_column("source", "questions", "train")) == 5 and set(sources) == {"my_exam"}

    raw["data"]["train"] = [{"path": str(exam), "format": "their_exam"}]
    recipe_path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"data\.train\.0\.format: unknown format 'their_exam' .*my_exam"):
        load_recipe(recipe_path)
    raw["data"]["train"] = [{"path": str(exam), "format": "medqa", "columns": {"question": "q", "reference": "r"}}]
    recipe_path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RecipeError, match="either format or columns"):
        load_recipe(recipe_path)


@pytest.mark.slow
def test_files_of_one_name_in_different_folders_keep_their_ids_apart(tmp_path: Path, ray_cluster,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`train/q.json` and `test/q.json` without ids: no false "in both train and test", no "duplicate id"
    between two such files of one split, and the same ids each time a file is read under its name."""
    for folder, items in (("train", EXAM[:3]), ("more", EXAM[3:4]), ("test", EXAM[5:6])):
        (tmp_path / folder).mkdir()
        _write_json(tmp_path / folder / "q.json", items)
    monkeypatch.chdir(tmp_path)  # the recipe names its files relative to where it runs

    def source(folder: str) -> dict:
        return {"path": f"{folder}/q.json", "columns": EXAM_MAPPING}

    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [source("train"), source("more")],
                                              "data.test": [source("test")]})
    run, record = RunRoot(recipe.run_root), StageRecord()
    questions.run(StageContext(recipe=recipe, run=run, record=record))
    assert (record.rows_rejected, record.details["train"], record.details["test"]) == (0, 4, 1)
    train_ids, test_ids = run.read_column("id", "questions", "train"), run.read_column("id", "questions", "test")
    assert len(set(train_ids + test_ids)) == 5 and all(id.startswith("q-") for id in train_ids + test_ids)
    # Read again, under its name however spelled, a file gives the ids its rows were stored under.
    again = load_questions("./more/../train/q.json", format=EXAM_MAPPING)
    assert [q.id for q in again.questions] == train_ids[:3]
