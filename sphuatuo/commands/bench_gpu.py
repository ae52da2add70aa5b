"""`sphuatuo bench gpu`: on one GPU, the SFT trainer's model FLOPs utilisation and the generation rate of
models of real sizes (the Qwen2.5-1.5B and -3B shapes) with random weights, in a few minutes.

Meant for a GPU machine that has PyTorch and transformers but neither Ray nor vLLM (a lent machine, a new
node before the cluster is set up); it also runs on CPU at a toy size. Per model shape:
1. the trainer: the SFT stage's own (`sphuatuo.train.bare`: TRL's SFTTrainer with the stage's Trainer
   arguments, its DeepSpeed ZeRO-3 config and the recording that logs `mfu`) as one torchrun rank, bf16,
   examples packed into full rows of `--max-length` tokens, as the 7B recipes train. MFU = 6 x parameters x
   steady tokens/s over the GPU's dense bf16 peak (`PEAK_BF16_FLOPS`); attention's own FLOPs are not
   counted, so at 4,096-token rows it understates the work by about 15% at these widths;
2. generation: transformers' `generate` (the hf back-end's call) at batch 1 and at `--batch`, fixed lengths.
   At batch 1 a decode step reads every weight once, so tokens/s x weight bytes over the memory bandwidth
   says how close it runs to the hardware. The GPU recipes generate with vLLM, which is not measured here.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sphuatuo.commands.bench_train import bench_examples, torchrun_line
from sphuatuo.local_models import resolve_model
from sphuatuo.recipe import SftStage

# Qwen2.5 model shapes (their config.json), with Qwen's vocabulary size.
QWEN25_SHAPES = {
    "toy": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2},
    "3b": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
           "num_key_value_heads": 2},
}
QWEN25_VOCAB = 151_936

# Memory bandwidth (bytes/s) by a substring of the device name; first match wins.
PEAK_MEMORY_BANDWIDTH = (("H200", 4.8e12), ("H100", 3.35e12), ("A100", 2.0e12), ("L40S", 0.864e12))


@dataclass(frozen=True)
class TrainerLine:
    shape: str
    parameters: int
    steps: int
    tokens_per_step: int
    steady_tokens_per_s: float
    mfu: float | None  # None where the device's peak is unknown (CPU)
    wall_seconds: float


@dataclass(frozen=True)
class GenerationLine:
    shape: str
    batch: int
    new_tokens: int
    tokens_per_s: float
    memory_bandwidth_share: float | None  # batch 1 only: weight bytes read per second over the peak


def write_random_model(shape: str, out: Path) -> int:
    """Save to `out` a Qwen2 model of `shape` with random bf16 weights and the builtin tiny model's tokenizer
    (whose ids all fall inside Qwen's vocabulary); return its parameter count."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from sphuatuo.train.launcher import parameter_counts

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("builtin:tiny"))
    config = Qwen2Config(vocab_size=QWEN25_VOCAB, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **QWEN25_SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialised where it will run
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return parameter_counts(model)[1]


def trainer_line(shape: str, model: Path, parameters: int, max_length: int, micro_batch: int, steps: int,
                 warmup_steps: int, gradient_checkpointing: bool, liger: bool, on_gpu: bool) -> TrainerLine:
    """`steps` optimizer steps of the SFT trainer under ZeRO-3 on rows packed to `max_length` tokens."""
    from sphuatuo.train.recording import gpu_peak_flops, model_flops_utilisation

    stage = SftStage(finetuning="full", epochs=1, max_steps=steps, micro_batch_size=micro_batch,
                     grad_accumulation=1, max_length=max_length, packing=True, learning_rate=1e-5,
                     precision="bf16" if on_gpu else "fp32", attn_implementation="sdpa",
                     gradient_checkpointing=gradient_checkpointing, use_liger_kernel=liger,
                     scaling={"num_workers": 1, "zero_stage": 3, "use_gpu": on_gpu})
    # Enough examples to fill every step's rows: a sample-bank example is over 100 tokens.
    examples = bench_examples(steps * micro_batch * max_length // 100)
    started = time.perf_counter()
    line = torchrun_line(str(model), stage, examples, threads=8 if on_gpu else 1, warmup_steps=warmup_steps,
                         on_gpu=on_gpu)
    peak = gpu_peak_flops(None) if on_gpu else None
    mfu = model_flops_utilisation(parameters, line.steady_tokens_per_s_per_worker, peak) if peak else None
    return TrainerLine(shape, parameters, line.steps, micro_batch * max_length, line.steady_tokens_per_s_per_worker,
                       mfu, time.perf_counter() - started)


def generation_lines(shape: str, model: Path, batches: list[int], prompt_tokens: int,
                     new_tokens: int) -> list[GenerationLine]:
    """transformers `generate` with every reply forced to `new_tokens` tokens (random weights never stop)."""
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    llm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
    name = torch.cuda.get_device_name() if device == "cuda" else ""
    bandwidth = next((peak for key, peak in PEAK_MEMORY_BANDWIDTH if key in name), None)
    lines = []
    for batch in batches:
        prompts = torch.randint(1000, 2000, (batch, prompt_tokens), device=device)
        arguments = {"do_sample": False, "min_new_tokens": new_tokens, "max_new_tokens": new_tokens,
                     "attention_mask": torch.ones_like(prompts), "pad_token_id": llm.config.pad_token_id}
        llm.generate(prompts, **{**arguments, "min_new_tokens": 8, "max_new_tokens": 8})  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        llm.generate(prompts, **arguments)
        if device == "cuda":
            torch.cuda.synchronize()
        rate = batch * new_tokens / (time.perf_counter() - started)
        share = rate * weight_bytes / bandwidth if bandwidth and batch == 1 else None
        lines.append(GenerationLine(shape, batch, new_tokens, rate, share))
    del llm
    if device == "cuda":
        torch.cuda.empty_cache()
    return lines


def format_gpu_bench(device: str, trainers: list[TrainerLine], generations: list[GenerationLine]) -> str:
    out = [f"device: {device}",
           f"{'trainer (SFT, ZeRO-3, packed)':<30} {'parameters':>11} {'steps':>5} {'tokens/step':>11} "
           f"{'steady tok/s':>12} {'MFU':>6} {'wall s':>7}"]
    for line in trainers:
        mfu = f"{line.mfu:.3f}" if line.mfu is not None else "-"
        out.append(f"{line.shape:<30} {line.parameters:>11,} {line.steps:>5} {line.tokens_per_step:>11} "
                   f"{line.steady_tokens_per_s:>12.0f} {mfu:>6} {line.wall_seconds:>7.1f}")
    if not generations:
        return "\n".join(out)
    out.append(f"{'generation (transformers)':<30} {'batch':>11} {'new tokens':>11} {'tok/s':>12} "
               f"{'vs batch 1':>10} {'bandwidth share':>15}")
    single = {line.shape: line.tokens_per_s for line in generations if line.batch == 1}
    for line in generations:
        share = f"{line.memory_bandwidth_share:.2f}" if line.memory_bandwidth_share is not None else "-"
        ratio = f"{line.tokens_per_s / single[line.shape]:.2f}" if line.shape in single else "-"
        out.append(f"{line.shape:<30} {line.batch:>11} {line.new_tokens:>11} {line.tokens_per_s:>12.1f} "
                   f"{ratio:>10} {share:>15}")
    return "\n".join(out)


def bench_gpu(shapes: list[str], max_length: int, micro_batch: int, steps: int, warmup_steps: int,
              gradient_checkpointing: bool, liger: bool, batches: list[int], prompt_tokens: int,
              new_tokens: int, deadline_s: float, record: Path | None) -> None:
    """Each shape in turn, trainer then generation, printing the table so far after each; a shape is skipped
    once `deadline_s` has passed."""
    import torch
    import transformers

    on_gpu = torch.cuda.is_available()
    device = (f"{torch.cuda.get_device_name() if on_gpu else 'CPU'}; torch {torch.__version__}, transformers "
              f"{transformers.__version__}; gradient checkpointing {'on' if gradient_checkpointing else 'off'}, "
              f"Liger kernels {'on' if liger else 'off'}")
    started = time.perf_counter()
    trainers: list[TrainerLine] = []
    generations: list[GenerationLine] = []
    for shape in shapes:
        if time.perf_counter() - started > deadline_s:
            print(f"skipped {shape}: past the {deadline_s:.0f} s deadline", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix=f"sphuatuo-bench-gpu-{shape}-") as folder:
            model = Path(folder)
            parameters = write_random_model(shape, model)
            trainers.append(trainer_line(shape, model, parameters, max_length, micro_batch, steps, warmup_steps,
                                         gradient_checkpointing, liger, on_gpu))
            if batches:
                generations += generation_lines(shape, model, batches, prompt_tokens, new_tokens)
        table = format_gpu_bench(device, trainers, generations)
        print(table, flush=True)  # after each shape, so a run cut short keeps what it measured
        if record:
            record.write_text(json.dumps({"device": device, "trainers": [asdict(line) for line in trainers],
                                          "generations": [asdict(line) for line in generations]}, indent=1))
