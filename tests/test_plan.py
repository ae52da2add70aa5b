"""`sphuatuo plan`: the paper's recipe fits its GPUs, a teacher squeezed onto too little memory is refused
with the reason, local models are sized from their config.json, and the arithmetic matches a hand count."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from safetensors import safe_open

from sphuatuo.cli import main
from sphuatuo.commands.plan import GIB, ModelSize, Plan, StagePlan, model_size, plan
from sphuatuo.recipe import load_recipe

RECIPE_7B = Path(__file__).resolve().parent.parent / "pipelines" / "sp_huatuo_7b.yaml"
TP1 = "models.teacher.tensor_parallel_size=1"


def _row(result: Plan, stage: str, role: str) -> StagePlan:
    (row,) = [s for s in result.stages if s.stage == stage and s.role == role]
    return row


def test_paper_recipe_plans_and_fits(capsys: pytest.CaptureFixture[str]) -> None:
    result = plan(load_recipe(RECIPE_7B))
    assert result.fits
    teacher = _row(result, "teacher_cot", "teacher")
    # tensor parallel 2 x 1 GPU per worker, up to 4 replicas (autoscaling [1, 4]); 4 CPUs per TP worker
    assert (teacher.gpus_per_replica, teacher.replicas, teacher.gpus, teacher.cpus) == (2, 4, 8, 32)
    assert teacher.fits and teacher.rows == 3000 and teacher.hours is not None and teacher.hours > 0
    sft = _row(result, "sft", "trainer")
    assert (sft.gpus_per_replica, sft.replicas, sft.cpus, sft.fits) == (1, 2, 16, True)
    assert _row(result, "evaluate", "student").rows is None  # the test file has no limit: time per 1k rows

    assert main(["plan", str(RECIPE_7B)]) == 0
    out = capsys.readouterr().out
    assert "teacher_cot" in out and "Qwen/QwQ-32B" in out and "every checked stage fits" in out


def test_a_32b_teacher_without_tensor_parallelism(capsys: pytest.CaptureFixture[str]) -> None:
    # 48 GB (L40S): 61 GiB of bf16 weights cannot load at all.
    assert main(["plan", str(RECIPE_7B), "--gpu-memory-gb", "48", "--set", TP1]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT: teacher_cot/teacher" in out
    assert "weights 61.0 GiB per GPU + 4 GiB runtime exceed the 43.2 GiB usable (0.9 x 48 GiB)" in out

    # 80 GB with a 32k context: the weights load, but one full-length sequence's KV cache does not fit beside them.
    long = _row(plan(load_recipe(RECIPE_7B, [TP1, "models.teacher.max_model_len=32768"])), "teacher_cot", "teacher")
    assert long.fits is False
    assert "after 61.0 GiB of weights" in long.reason and "one 32768-token sequence needs" in long.reason

    # 80 GB at the recipe's 16k: vLLM starts, but the KV cache runs 2 replies at a time instead of the 256 the
    # scheduler would take (vLLM's default max_num_seqs on a GPU of unnamed type; 512 rows are in flight).
    tp1 = _row(plan(load_recipe(RECIPE_7B, [TP1])), "teacher_cot", "teacher")
    tp2 = _row(plan(load_recipe(RECIPE_7B)), "teacher_cot", "teacher")
    assert tp1.fits is True and "KV cache holds 2 of 256 replies" in " ".join(tp1.notes)
    assert tp1.hours is not None and tp2.hours is not None and tp1.hours > 10 * tp2.hours


def test_local_model_is_sized_from_its_config(tiny_model: str) -> None:
    size = model_size(tiny_model)
    assert size is not None and size.source == str(Path(tiny_model) / "config.json")
    with safe_open(str(Path(tiny_model) / "model.safetensors"), "pt") as weights:
        stored = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    assert size.params == stored == 820_352

    result = plan(load_recipe(RECIPE_7B, [f"models.student.model={tiny_model}"]))
    student = _row(result, "student_answers", "student")
    assert student.fits and student.memory_gib["weights"] == pytest.approx(stored * 2 / GIB)  # fp32 runs in 16 bits

    unknown_recipe = load_recipe(RECIPE_7B, ["models.teacher.model=example/unpublished-70b"])
    unknown = _row(plan(unknown_recipe), "teacher_cot", "teacher")
    assert unknown.reason == "unknown model size" and unknown.fits is None and unknown.memory_gib == {}


def test_memory_arithmetic_by_hand() -> None:
    qwq, qwen7 = model_size("Qwen/QwQ-32B"), model_size("Qwen/Qwen2.5-7B-Instruct")
    assert qwq is not None and qwen7 is not None
    # Published parameter counts: embeddings + untied lm_head + layers (q/k/v with bias, o, gate/up/down, 2 norms).
    assert qwq.params == 32_763_876_352 and qwen7.params == 7_615_616_512
    # K and V x 64 layers x 8 KV heads / TP 2 x head_dim 128 x 2 bytes; at TP 16 each rank keeps one head.
    assert qwq.kv_bytes_per_token(2, 2) == 2 * 64 * 4 * 128 * 2 == 131_072
    assert qwq.kv_bytes_per_token(2, 16) == 2 * 64 * 1 * 128 * 2

    result = plan(load_recipe(RECIPE_7B))
    teacher = _row(result, "teacher_cot", "teacher")
    assert teacher.memory_gib["weights"] == pytest.approx(32_763_876_352 * 2 / 2 / GIB)  # 30.5 GiB per GPU
    assert teacher.memory_gib["kv_cache"] == 64 * 16384 * 131_072 / GIB == 128.0
    # Decode roofline of the student (TP 1, 4096-token replies): the scheduler takes up to 256 sequences (vLLM's
    # default on a GPU of unnamed type; 64 x 8 = 512 rows are in flight), as many as the KV cache holds beside
    # 15.2 GB of weights in 0.9 x 80 GiB less 4 GiB of runtime. A step reads the weights and each sequence's
    # KV for 2048 tokens (half a reply, on average) x 57,344 bytes, at 3.35 TB/s.
    kv_token = 2 * 28 * 4 * 128 * 2
    at_once = min(256, int(((0.9 * 80 - 4) * GIB - 7_615_616_512 * 2) // (kv_token * 4096)))
    step = (7_615_616_512 * 2 + at_once * 2048 * kv_token) / 3.35e12
    assert _row(result, "student_answers", "student").tokens_per_s == pytest.approx(at_once / step * 8)  # 8 replicas

    P = qwen7.params
    full3 = _row(plan(load_recipe(RECIPE_7B, ["stages.sft.finetuning=full", "stages.sft.scaling.zero_stage=3",
                                              "stages.sft.scaling.num_workers=8"])), "sft", "trainer")
    # bf16 weights and grads, fp32 master + Adam m and v: 2 + 2 + 12 = 16 bytes per parameter, all over 8 workers
    state = full3.memory_gib["weights"] + full3.memory_gib["grads"] + full3.memory_gib["optimizer"]
    assert state == pytest.approx(16 * P / 8 / GIB)
    full2 = _row(plan(load_recipe(RECIPE_7B, ["stages.sft.finetuning=full"])), "sft", "trainer")
    # ZeRO-2 over 2: weights whole, grads and optimizer state halved.
    assert [full2.memory_gib[k] for k in ("weights", "grads", "optimizer")] == pytest.approx(
        [2 * P / GIB, P / GIB, 6 * P / GIB])
    ddp = _row(plan(load_recipe(RECIPE_7B, ["stages.sft.finetuning=full", "stages.sft.scaling.zero_stage=0"])),
               "sft", "trainer")
    # Plain DDP keeps all 16 bytes per parameter on every GPU: 113 GiB, more than 80.
    state = ddp.memory_gib["weights"] + ddp.memory_gib["grads"] + ddp.memory_gib["optimizer"]
    assert state == pytest.approx(16 * P / GIB)
    assert ddp.fits is False and "use ZeRO-3" in ddp.reason

    # LoRA rank 8 on the tiny model (hidden 128, 4 heads, 2 KV heads of 32, intermediate 256, 2 layers):
    # q, o: 8 x (128 + 128); k, v: 8 x (128 + 64); gate, up, down: 8 x (128 + 256); per layer 16,384.
    tiny = ModelSize.from_config({"model_type": "qwen2", "hidden_size": 128, "intermediate_size": 256,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "vocab_size": 2048, "dtype": "float32"}, "by hand")
    assert tiny is not None
    assert tiny.lora_params(8, "all-linear") == 2 * (2 * 8 * 256 + 2 * 8 * 192 + 3 * 8 * 384) == 32_768
    assert tiny.lora_params(8, ["q_proj", "v_proj"]) == 2 * (8 * 256 + 8 * 192)
