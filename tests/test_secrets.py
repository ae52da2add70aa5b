"""Secrets stay secret and models run no code unasked: `trust_remote_code` is a recipe field that reaches
every load and shows in the plan and the report; a run root with credentials is refused without echoing
them; the values of the recipe's secret variables are masked in the run log, the manifest, the report and
the CLI's errors. No Ray: each path is driven directly, with a fake secret in the environment."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from sphuatuo.cli import main
from sphuatuo.commands.plan import format_plan, plan
from sphuatuo.commands.report import write_report
from sphuatuo.engines import Request
from sphuatuo.engines.vllm import processor_config
from sphuatuo.pipeline import RunLog
from sphuatuo.recipe import (
    EngineConfig,
    Recipe,
    RecipeError,
    RewardVerifierConfig,
    load_recipe,
    remote_code_models,
)
from sphuatuo.store import secrets
from sphuatuo.store.manifest import Manifest, StageRecord, save_manifest
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.secrets import declare, redact, redact_data, secret_names

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
TOKEN_VARIABLE = "SPHUATUO_TEST_TOKEN"
TOKEN = "tok-8f3a1c9e77d04b2a"
API_KEY_VARIABLE = "SPHUATUO_TEST_API_KEY"
API_KEY = 'sk-live-"quoted"\\5be1'  # a quote and a backslash: JSON escapes both


@pytest.fixture(autouse=True)
def fresh_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """No names declared by an earlier test; the fake values set in this process's environment."""
    monkeypatch.setattr(secrets, "_declared", set())
    monkeypatch.setattr(secrets, "_files", set())
    monkeypatch.setattr(secrets, "_held", set())
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    monkeypatch.setenv(API_KEY_VARIABLE, API_KEY)


def _demo_raw(**changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load((PIPELINES / "demo.yaml").read_text())
    return {**raw, **changes}


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _openai_teacher() -> dict[str, Any]:
    return {"backend": "openai", "model": "gpt-4o", "base_url": "http://127.0.0.1:9/v1",
            "api_key_env": API_KEY_VARIABLE}


# ---------------------------------------------------------------------------------------------
# trust_remote_code
# ---------------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default_and_reaches_the_vllm_engine() -> None:
    off = processor_config(EngineConfig(model="org/m"), "/models/m", seed=0)
    assert off.engine_kwargs["trust_remote_code"] is False
    on = processor_config(EngineConfig(model="org/m", trust_remote_code=True), "/models/m", seed=0)
    assert on.engine_kwargs["trust_remote_code"] is True


def test_engine_kwargs_cannot_turn_on_remote_code(tmp_path: Path) -> None:
    raw = _demo_raw()
    raw["models"]["teacher"]["engine_kwargs"] = {"trust_remote_code": True, "max_num_seqs": 8}
    with pytest.raises(RecipeError) as caught:
        load_recipe(_write(tmp_path, raw))
    assert caught.value.problems == ["models.teacher.engine_kwargs: trust_remote_code is a recipe field "
                                     "(models.teacher.trust_remote_code), not an engine kwarg"]
    # The same through an override, and for a judge's engine.
    with pytest.raises(RecipeError) as caught:
        load_recipe(PIPELINES / "demo.yaml", ["models.judge.engine.engine_kwargs={trust_remote_code: false}"])
    assert caught.value.problems == ["models.judge.engine.engine_kwargs: trust_remote_code is a recipe field "
                                     "(models.judge.engine.trust_remote_code), not an engine kwarg"]


def test_trust_remote_code_only_where_a_model_is_loaded() -> None:
    with pytest.raises(ValidationError, match="loads no model here"):
        EngineConfig(**_openai_teacher(), trust_remote_code=True)
    with pytest.raises(ValidationError, match="exact_match' loads no model"):
        RewardVerifierConfig(trust_remote_code=True)
    assert RewardVerifierConfig(kind="classifier", model="org/verifier", trust_remote_code=True).trust_remote_code


def test_hf_engine_loads_model_and_tokenizer_with_the_recipe_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    from sphuatuo.engines import hf

    loads: list[tuple[str, dict[str, Any]]] = []

    class FakeTokenizer:
        pad_token, eos_token, eos_token_id = "<pad>", "</s>", 2

        @classmethod
        def from_pretrained(cls, path: str, **kwargs: Any) -> FakeTokenizer:
            loads.append(("tokenizer", kwargs))
            return cls()

    class FakeModel:
        generation_config = type("GenerationConfig", (), {"eos_token_id": 2})()

        @classmethod
        def from_pretrained(cls, path: str, **kwargs: Any) -> FakeModel:
            loads.append(("model", kwargs))
            return cls()

        def eval(self) -> FakeModel:
            return self

    monkeypatch.setattr(hf, "AutoTokenizer", FakeTokenizer)
    monkeypatch.setattr(hf, "AutoModelForCausalLM", FakeModel)
    request = Request(temperature=0.0, top_p=1.0, max_tokens=4)
    hf.HFChatGenerator("/models/m", "auto", request, trust_remote_code=True)
    assert [(what, kwargs["trust_remote_code"]) for what, kwargs in loads] == [("tokenizer", True), ("model", True)]

    class FakeDataset:
        def map_batches(self, fn: Any, **kwargs: Any) -> dict[str, Any]:
            return kwargs

    engine = EngineConfig(backend="hf", model="org/m", trust_remote_code=True)
    kwargs = hf.generate_hf(FakeDataset(), engine, request, "/models/m")  # type: ignore[arg-type]
    assert kwargs["fn_constructor_kwargs"]["trust_remote_code"] is True


def test_judge_tokenizer_and_reward_verifiers_load_with_the_recipe_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from sphuatuo.passes import verdict
    from sphuatuo.train.reward import build_verifier

    loads: list[tuple[str, bool]] = []

    class FakeTokenizer:
        pad_token, eos_token, eos_token_id, pad_token_id = "<pad>", "</s>", 2, 0

        @classmethod
        def from_pretrained(cls, path: str, **kwargs: Any) -> FakeTokenizer:
            loads.append((path, kwargs["trust_remote_code"]))
            return cls()

        def encode(self, word: str, add_special_tokens: bool = False) -> list[int]:
            return [{"1": 10, "2": 11, "True": 12, "False": 13}[word]]

    class FakeModel:
        config = type("Config", (), {"pad_token_id": 0})()

        @classmethod
        def from_pretrained(cls, path: str, **kwargs: Any) -> FakeModel:
            loads.append((path, kwargs["trust_remote_code"]))
            return cls()

        def to(self, device: str) -> FakeModel:
            return self

        def eval(self) -> FakeModel:
            return self

    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTokenizer)
    assert verdict.single_token_ids("/models/remote-judge", ("1", "2"), True) == (10, 11)
    assert loads == [("/models/remote-judge", True)]

    loads.clear()
    monkeypatch.setattr(transformers, "AutoModelForSequenceClassification", FakeModel)
    monkeypatch.setattr(transformers, "AutoModelForCausalLM", FakeModel)
    build_verifier(RewardVerifierConfig(kind="classifier", model="/models/verifier", trust_remote_code=True))
    build_verifier(RewardVerifierConfig(kind="llm", model="/models/llm-verifier"))
    assert loads == [("/models/verifier", True), ("/models/verifier", True),
                     ("/models/llm-verifier", False), ("/models/llm-verifier", False)]


def test_training_loads_the_student_with_its_flag(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from trl import DPOConfig, GRPOConfig, RLOOConfig, SFTConfig

    from sphuatuo.recipe import SftStage
    from sphuatuo.stages import StageContext, training
    from sphuatuo.train.launcher import training_arguments

    arguments = {**training_arguments(SftStage(), str(tmp_path / "out"), on_gpu=False, trust_remote_code=True),
                 "deepspeed": None}
    for config_type in (SFTConfig, DPOConfig):  # TRL loads reference models and vLLM with it
        assert config_type(**arguments).trust_remote_code is True
    assert all("trust_remote_code" in config_type.__dataclass_fields__ for config_type in (GRPOConfig, RLOOConfig))

    configs: list[dict[str, Any]] = []
    monkeypatch.setattr(training, "fit", lambda run, name, stage, worker_fn, config, **_: configs.append(config))
    raw = _demo_raw(run_root=str(tmp_path / "run"))
    raw["models"]["student"]["trust_remote_code"] = True
    recipe = Recipe.model_validate(raw)
    ctx = StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord())
    with pytest.raises(RuntimeError, match="no model was exported"):  # the fake fit trains nothing
        training.train_stage(ctx, "sft", recipe.stages.sft, [{"id": "q1"}], lambda config: None, "/models/student")
    assert configs[0]["trust_remote_code"] is True and configs[0]["model"] == "/models/student"


def test_plan_and_report_say_which_models_run_remote_code(tmp_path: Path) -> None:
    assert "\nremote code: none\n" in format_plan(plan(load_recipe(PIPELINES / "demo.yaml")))
    recipe = load_recipe(PIPELINES / "huatuo_o1_demo.yaml", [
        "models.student.trust_remote_code=true", "stages.rl.verifier={kind: classifier, model: org/verifier, "
        "trust_remote_code: true}"])
    student = recipe.models.student.model
    assert remote_code_models(recipe.model_dump()) == {"models.student": student, "stages.rl.verifier": "org/verifier"}
    old_manifest_copy = {"models": {"teacher": {"model": "org/t", "engine_kwargs": {"trust_remote_code": True}}}}
    assert remote_code_models(old_manifest_copy) == {"models.teacher": "org/t"}
    expected = f"models.student → {student}, stages.rl.verifier → org/verifier"
    assert f"\nremote code: {expected}\n" in format_plan(plan(recipe))

    run = RunRoot(str(tmp_path / "run"))
    save_manifest(run, Manifest(recipe=recipe.model_dump(mode="json"), versions={}, created_at="now"))
    write_report(run)
    assert f"Remote code: {expected}" in run.read_text("report.md")


# ---------------------------------------------------------------------------------------------
# Credentials in the run root
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_root", [
    "s3://AKIAEXAMPLEKEY:wJalrXUtnFEMIsecret@bucket/runs/a",
    "s3://AKIAEXAMPLEKEY@bucket/runs/a",
    "gs://bucket/runs/a?access_token=wJalrXUtnFEMIsecret",
    "s3://bucket/runs/a?region=us-east-1&secret_key=wJalrXUtnFEMIsecret&access_key=AKIAEXAMPLEKEY",
    "https://user:wJalrXUtnFEMIsecret@host/runs/a",
])
def test_run_root_with_credentials_is_refused_without_echoing_them(run_root: str, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(_write(tmp_path, _demo_raw(run_root=run_root)))
    (problem,) = caught.value.problems
    assert problem.startswith("run_root: credentials in the URI")
    assert "instance role" in problem and "service account" in problem and "AWS_*" in problem
    with pytest.raises(ValidationError) as direct:  # a recipe built in code: pydantic's own text
        Recipe.model_validate(_demo_raw(run_root=run_root))
    with pytest.raises(ValueError) as opened:  # a run root from the command line (report, export)
        RunRoot(run_root)
    assert main(["report", run_root]) == 2
    for text in (str(caught.value), str(direct.value), str(opened.value), capsys.readouterr().err):
        assert "wJalrXUtnFEMIsecret" not in text and "AKIAEXAMPLEKEY" not in text


def test_run_roots_without_credentials_pass(tmp_path: Path) -> None:
    for run_root in ("s3://bucket/runs/a?region=us-east-1&endpoint_override=127.0.0.1:9000",
                     "gs://bucket/runs/a", "runs/v2@night", str(tmp_path / "a@b")):
        assert Recipe.model_validate(_demo_raw(run_root=run_root)).run_root == run_root


# ---------------------------------------------------------------------------------------------
# Redaction
# ---------------------------------------------------------------------------------------------


def test_secret_names_are_the_listed_variables_and_every_api_key_env() -> None:
    raw = _demo_raw(secrets=[TOKEN_VARIABLE])
    raw["models"]["teacher"] = _openai_teacher()
    assert secret_names(Recipe.model_validate(raw).model_dump()) == {TOKEN_VARIABLE, API_KEY_VARIABLE}
    assert secret_names({"secrets": "not a list", "models": [{"api_key_env": 3}]}) == set()


def test_secrets_lists_names_never_values(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as caught:
        load_recipe(_write(tmp_path, _demo_raw(secrets=[TOKEN_VARIABLE, TOKEN])))
    assert caught.value.problems == ["secrets: Value error, entries that are not environment variable names: 1 "
                                     "(list the variables' names, never their values)"]
    assert TOKEN not in str(caught.value)
    with pytest.raises(RecipeError) as caught:  # a value where the list belongs
        load_recipe(_write(tmp_path, _demo_raw(secrets=TOKEN)))
    assert caught.value.problems[0].startswith("secrets: Input should be a valid list")
    assert TOKEN not in str(caught.value)


def test_redact_masks_values_longest_first_and_leaves_short_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPHUATUO_TEST_PREFIX", TOKEN[:8])
    monkeypatch.setenv("SPHUATUO_TEST_SHORT", "yes")
    names = [TOKEN_VARIABLE, "SPHUATUO_TEST_PREFIX", "SPHUATUO_TEST_SHORT", "SPHUATUO_TEST_UNSET"]
    assert redact(f"yes: {TOKEN} and {TOKEN[:8]}", names) == "yes: *** and ***"
    assert redact(TOKEN) == TOKEN  # nothing declared, nothing named
    declare([TOKEN_VARIABLE])
    assert redact(f"Bearer {TOKEN}") == "Bearer ***"
    data = {"error": f"401 for {API_KEY}", TOKEN: [TOKEN, 3, None]}
    assert redact_data(data, [API_KEY_VARIABLE]) == {"error": "401 for ***", "***": ["***", 3, None]}


def _secret_recipe(run_root: Path) -> dict[str, Any]:
    raw = _demo_raw(run_root=str(run_root), secrets=[TOKEN_VARIABLE])
    raw["models"]["teacher"] = _openai_teacher()
    return raw


def test_manifest_masks_stage_errors_and_the_recipe_copy(tmp_path: Path) -> None:
    raw = _secret_recipe(tmp_path / "run")
    raw["data"]["train"][0]["path"] = f"/data/{TOKEN}/questions.jsonl"  # a value pasted where it does not belong
    recipe = Recipe.model_validate(raw)
    run = RunRoot(recipe.run_root)
    manifest = Manifest(recipe=recipe.model_dump(mode="json"), versions={}, created_at="now", stages={
        "teacher_cot": StageRecord(status="failed", error=f"RuntimeError: 401 Unauthorized for key {API_KEY}",
                                   details={"notes": [f"retried with {TOKEN}"]})})
    save_manifest(run, manifest)
    text = run.read_text("manifest.json")
    assert TOKEN not in text and API_KEY not in text and json.dumps(API_KEY) not in text
    stored = json.loads(text)
    assert stored["stages"]["teacher_cot"]["error"] == "RuntimeError: 401 Unauthorized for key ***"
    assert stored["recipe"]["data"]["train"][0]["path"] == "/data/***/questions.jsonl"
    assert stored["recipe"]["secrets"] == [TOKEN_VARIABLE]  # names stay readable


def test_report_masks_secrets_from_a_hand_made_manifest(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path / "run"))
    recipe = Recipe.model_validate(_secret_recipe(tmp_path / "run")).model_dump(mode="json")
    manifest = Manifest(recipe=recipe, versions={}, created_at="now", stages={
        "teacher_cot": StageRecord(status="failed", error=f"ValueError: bad token {TOKEN}",
                                   details={"notes": [f"server said: key {API_KEY} revoked"]})})
    # Written as an older sphuatuo would have: unmasked, so the report must mask on its own.
    run.write_text(manifest.model_dump_json(), "manifest.json")
    report = Path(write_report(run)).read_text()
    assert TOKEN not in report and API_KEY not in report
    assert "ValueError: bad token ***" in report and "server said: key *** revoked" in report


def test_run_log_and_sphuatuo_logger_mask_declared_secrets(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    run = RunRoot(str(tmp_path / "run"))
    run.write_text(f"an older line with {TOKEN}\n", "run.log")
    declare({TOKEN_VARIABLE, API_KEY_VARIABLE})
    run_log = RunLog(run)
    log = logging.getLogger("sphuatuo")
    log.addHandler(run_log)
    try:
        with caplog.at_level(logging.INFO, logger="sphuatuo"):
            log.info("request with key %s", API_KEY)
            try:
                raise RuntimeError(f"401 for token {TOKEN}")
            except RuntimeError:
                log.exception("stage failed")
            logging.getLogger("sphuatuo.child").warning("child logger: %s", TOKEN)
    finally:
        log.removeHandler(run_log)
    run_log.save()
    text = run.read_text("run.log")
    assert TOKEN not in text and API_KEY not in text
    assert "request with key ***" in text and "RuntimeError: 401 for token ***" in text
    assert "child logger: ***" in text and "an older line with ***" in text
    # Every handler of the `sphuatuo` logger gets the masked record, not only the run log.
    captured = "\n".join(record.getMessage() + "\n" + (record.exc_text or "")
                         for record in caplog.records if record.name == "sphuatuo")
    assert TOKEN not in captured and API_KEY not in captured
    assert "request with key ***" in captured and "401 for token ***" in captured


def test_cli_errors_mask_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Validation fails on a value that is the secret: the names come from the file that failed.
    raw = _secret_recipe(tmp_path / "run")
    raw["seed"] = TOKEN
    path = _write(tmp_path, raw)
    assert main(["validate", str(path)]) == 1
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert TOKEN not in err and "seed: Input should be a valid integer" in err and "(got '***')" in err

    # A valid recipe, then an unexpected failure quoting the API key: the traceback is printed masked.
    path = _write(tmp_path, _secret_recipe(tmp_path / "run"))

    def failing_plan(*args: Any) -> None:
        raise RuntimeError(f"server refused key {API_KEY}")

    monkeypatch.setattr("sphuatuo.commands.plan.plan", failing_plan)
    assert main(["plan", str(path)]) == 1
    err = capsys.readouterr().err
    assert API_KEY not in err and "RuntimeError: server refused key ***" in err and "Traceback" in err


def test_object_store_credentials_come_from_each_node_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.fs as pafs

    from sphuatuo.store.credentials import shared_filesystem

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")
    run = RunRoot.__new__(RunRoot)  # an s3:// run root without a server: only its filesystem object matters
    run.fs = pafs.S3FileSystem(region="us-east-1", endpoint_override="http://127.0.0.1:9")
    with shared_filesystem(run) as node:
        assert node is run.fs and "example-secret" not in repr(node.__reduce__())  # each node signs with its own chain
    assert Recipe.model_validate(_demo_raw(run_root="s3://bucket/run")).storage.credentials == "node"
    # `driver` relays the driver's credentials through Ray and renews them: tests/test_secrets_cluster.py.


def test_secret_files_are_masked_and_workers_get_names_and_paths_never_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(API_KEY + "\n")
    raw = _demo_raw(secrets=[TOKEN_VARIABLE])
    raw["models"]["teacher"] = {**_openai_teacher(), "api_key_env": None, "api_key_file": str(key_file)}
    recipe = Recipe.model_validate(raw).model_dump()
    assert secrets.secret_files(recipe) == {str(key_file)}
    assert secrets.worker_runtime_env() is None  # nothing declared: Ray is joined as it is

    secrets.declare_recipe(recipe)
    assert redact(f"{TOKEN} {API_KEY}") == "*** ***"
    env = secrets.worker_runtime_env()
    assert env == {"worker_process_setup_hook": "sphuatuo.store.secrets.setup_worker",
                   "env_vars": {secrets.NAMES_VARIABLE: TOKEN_VARIABLE, secrets.FILES_VARIABLE: str(key_file)}}
    assert TOKEN not in json.dumps(env) and API_KEY not in json.dumps(env)

    # A worker process: nothing declared until the setup hook reads the names and paths from its environment.
    monkeypatch.setattr(secrets, "_declared", set())
    monkeypatch.setattr(secrets, "_files", set())
    for name, value in env["env_vars"].items():
        monkeypatch.setenv(name, value)
    assert redact(TOKEN) == TOKEN
    secrets.setup_worker()
    secrets.hold("held-by-this-process-only")  # e.g. a key fetched from the object store
    with caplog.at_level(logging.WARNING, logger="sphuatuo"):
        logging.getLogger("sphuatuo").warning("%s %s %s", TOKEN, API_KEY, "held-by-this-process-only")
    assert [record.getMessage() for record in caplog.records] == ["*** *** ***"]
    key_file.unlink()  # a file this node cannot read masks nothing and breaks nothing
    assert redact(API_KEY) == API_KEY
