"""The `sphuatuo` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import get_args

from sphuatuo.data.mapping import ColumnMapping
from sphuatuo.local_models import BUILTINS
from sphuatuo.recipe import ProtocolName, Recipe, RecipeError, load_recipe
from sphuatuo.store.lease import LeaseError
from sphuatuo.store.secrets import RedactingFilter, declare_recipe, redact, worker_runtime_env

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "demo.yaml"

EPILOG = """examples:
  sphuatuo demo                                   the Self-Play pipeline on SmolLM2-135M, local Ray, CPU
  sphuatuo validate pipelines/sp_huatuo_7b.yaml   check a recipe without running anything
  sphuatuo run pipelines/demo.yaml --set stages.sft.epochs=1 --set run_root=runs/try
  sphuatuo run pipelines/huatuo_o1_demo.yaml      the HuatuoGPT-o1 recipe on SmolLM2-135M, CPU
  sphuatuo run pipelines/sp_huatuo_7b.yaml --overlay pipelines/overlays/cpu.yaml
                                                  a GPU recipe in its real shape on a laptop (tiny model)
  sphuatuo data check questions.csv --format cmexam
  sphuatuo data check exam.json                   an unknown layout: prints a column mapping to check and reuse
  sphuatuo data convert exam.json --columns mapping.yaml --out exam.parquet
  sphuatuo eval runs/demo/sft/model --data test.jsonl    accuracy of any model directory on a question file
  sphuatuo status runs/demo                        each stage: done, stale (and why), pending
  sphuatuo report runs/demo
  sphuatuo export runs/demo --out exports/demo    SFT data and pairs for LLaMA-Factory and HF datasets
  sphuatuo plan pipelines/sp_huatuo_7b.yaml       GPUs, memory and time per stage, before anything starts
  sphuatuo doctor pipelines/sp_huatuo_7b.yaml --address auto
  sphuatuo submit pipelines/sp_huatuo_7b.yaml --address http://HEAD:8265
"""


def _overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overlay", dest="overlays", action="append", default=[], metavar="FILE",
                        help="shrink the recipe for this machine without changing its shape, e.g. --overlay "
                             "pipelines/overlays/cpu.yaml (repeatable; applied before --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a recipe field, e.g. --set stages.sft.learning_rate=2e-5 (repeatable)")


def _until(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--until", default=None, metavar="STAGE",
                        help="stop after this stage (e.g. teacher_cot): the later ones stay pending for the next run")


def _source_options(parser: argparse.ArgumentParser) -> None:
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--format", default=None, help="a built-in format name (default: detected)")
    how.add_argument("--columns", default=None, metavar="MAPPING.yaml",
                     help="a column mapping (question, options, answer, answer_kind, …), e.g. as data check "
                          "proposes it")


def _source_format(args: argparse.Namespace) -> str | ColumnMapping | None:
    from sphuatuo.data.mapping import read_mapping

    return read_mapping(args.columns) if args.columns else args.format


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sphuatuo",
        description="Self-Play and HuatuoGPT-o1 medical reasoning recipes for small LLMs, on Ray, vLLM and DeepSpeed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a recipe (resumes: finished stages are skipped)")
    run.set_defaults(func=run_command)
    run.add_argument("recipe", help="recipe YAML file")
    _until(run)
    _overrides(run)

    demo = commands.add_parser("demo", help="run the demo recipe (SmolLM2-135M on local Ray, a few minutes on CPU)")
    demo.set_defaults(func=demo_command)
    demo.add_argument("--run-root", default=None, help="where the run goes (default: the recipe's, runs/demo)")
    _overrides(demo)

    evaluate = commands.add_parser("eval", help="evaluate any model directory on a question file")
    evaluate.set_defaults(func=eval_command)
    evaluate.add_argument("model", help="a model directory, a hub id, or builtin:smollm2-135m-instruct")
    evaluate.add_argument("--data", required=True, help="question file (any supported format)")
    evaluate.add_argument("--format", default=None, help="loader name (default: detected)")
    evaluate.add_argument("--run-root", default=None, help="where answers and report go (default: "
                                                           "runs/eval/<model>-<data>-<prompt>-<hash>, one per model, "
                                                           "question file and prompt)")
    evaluate.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    evaluate.add_argument("--max-tokens", type=int, default=2048, help="generation budget per answer")
    evaluate.add_argument("--prompt", default="self_play/student_answer",
                          help="evaluation prompt template: self_play/student_answer (default), huatuo_o1/eval, "
                               "or huatuo_o1/eval_strict (the reply must end with 'The answer is X.')")
    evaluate.add_argument("--judge-model", default=None, help="judge for open-ended items (multiple-choice "
                                                                "items are scored by their option letters)")
    evaluate.add_argument("--protocol", action="append", dest="protocols", default=None,
                          choices=list(get_args(ProtocolName)),
                          help="evaluation protocol, repeatable (default: project): project, strict (greedy; a "
                               "reply cut at the budget is wrong), sp_paper (T 0.7, top_p 0.9, 450 tokens, no chat "
                               "template), o1_paper (T 0.5, right when the first or the last match is)")

    validate = commands.add_parser("validate", help="check recipe files; print every error with its field")
    validate.set_defaults(func=validate_command)
    validate.add_argument("recipes", nargs="+", help="recipe YAML files")
    _overrides(validate)

    data = commands.add_parser("data", help="question files")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    check = data_commands.add_parser("check", help="load a question file; print valid/rejected counts and reasons")
    check.set_defaults(func=data_check_command)
    check.add_argument("path", help="a file or datasets folder (JSON array, JSONL, CSV, Parquet; local or s3://…)")
    _source_options(check)
    check.add_argument("--rejects", default=None, help="also write the rejects as JSONL to this file")
    convert = data_commands.add_parser("convert", help="a question file as native JSONL or HF datasets Parquet, "
                                                       "rejects beside it (OUT.rejects.jsonl)")
    convert.set_defaults(func=data_convert_command)
    convert.add_argument("path", help="a file or datasets folder any format or mapping reads")
    convert.add_argument("--out", required=True, help="output file (.jsonl or .parquet)")
    _source_options(convert)
    convert.add_argument("--to", choices=["jsonl", "parquet"], default=None,
                         help="output kind (default: parquet for a .parquet OUT, else jsonl)")

    submit = commands.add_parser("submit", help="validate a recipe, submit it as a Ray job, follow its logs")
    submit.set_defaults(func=submit_command)
    submit.add_argument("recipe", help="recipe YAML file (a path inside the working directory)")
    submit.add_argument("--address", default=None,
                        help="the cluster's job server, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    submit.add_argument("--working-dir", default=".", help="uploaded to the cluster (default: .)")
    submit.add_argument("--runtime-env", default="cluster/runtime_env.yaml",
                        help="runtime environment YAML (default: cluster/runtime_env.yaml)")
    submit.add_argument("--no-follow", action="store_true", help="print the job id and return")
    _until(submit)
    _overrides(submit)

    doctor = commands.add_parser("doctor", help="check the connected Ray cluster against a recipe")
    doctor.set_defaults(func=doctor_command)
    doctor.add_argument("recipe", help="recipe YAML file")
    doctor.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or auto)")
    _overrides(doctor)

    export = commands.add_parser("export",
                                 help="a run's SFT data and preference pairs for LLaMA-Factory and HF datasets")
    export.set_defaults(func=export_command)
    export.add_argument("run_root", help="a run's root (local path or s3://…)")
    export.add_argument("--out", required=True, help="output folder (llamafactory/ and hf/ go inside)")

    bench = commands.add_parser("bench", help="benchmarks: a table of ratios against a baseline, in one run")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    generate = bench_commands.add_parser("generate", help="Ray Data generation stage vs bare vLLM vs hf")
    generate.set_defaults(func=bench_generate_command)
    generate.add_argument("--model", default="builtin:smollm2-135m-instruct",
                          help="a model directory, a hub id, or a builtin: name "
                               "(default: builtin:smollm2-135m-instruct)")
    generate.add_argument("--prompts", type=int, default=128,
                          help="how many chats (the sample bank, cycled; default: 128)")
    generate.add_argument("--max-tokens", type=int, default=64, help="reply budget per chat (default: 64)")
    generate.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                          help="every engine's dtype (default auto: bf16 where the CPU has native bf16, else fp32)")
    generate.add_argument("--batch-size", type=int, default=32, help="rows per batch sent to an engine (default: 32)")
    generate.add_argument("--cpus", type=float, default=1, help="CPUs per engine replica (default: 1)")
    generate.add_argument("--cpu-threads", type=int, default=None,
                          help="CPU engines: compute threads of every engine, bare and Ray (default: all cores)")
    generate.add_argument("--no-hf", action="store_true", help="skip the transformers back-end")
    generate.add_argument("--no-multi-pass", action="store_true",
                          help="skip the three-pass lines (engines per pass vs one engine kept up)")
    generate.add_argument("--workloads", nargs="+", choices=["fixed", "long-tail"], default=["fixed", "long-tail"],
                          help="fixed: greedy, replies up to --max-tokens; long-tail: sampled, natural stops, 4x the "
                               "budget (default: both)")
    generate.add_argument("--device", choices=["cpu", "gpu"], default="cpu",
                          help="gpu: one GPU per engine replica, CUDA graphs on (bare and Ray alike)")
    generate.add_argument("--rounds", type=_at_least_one, default=1,
                          help="run every line N times, bare and Ray alternating (bare once more at the end, so "
                               "each line is set against the bare passes on either side), and print each line's "
                               "median ratio over the rounds with its range: where the machine's speed drifts, one "
                               "round's ratio is noise (default: 1)")
    train = bench_commands.add_parser("train", help="Ray Train + DeepSpeed SFT tokens/s per worker vs bare TRL")
    train.set_defaults(func=bench_train_command)
    train.add_argument("--model", default="builtin:smollm2-135m-instruct",
                       help="a model directory, a hub id, or a builtin: name (default: builtin:smollm2-135m-instruct)")
    train.add_argument("--examples", type=int, default=32, help="SFT examples (the sample bank, cycled; default: 32)")
    train.add_argument("--epochs", type=int, default=1, help="passes over the examples (default: 1)")
    train.add_argument("--workers", type=int, default=2,
                       help="W: lines for bare TRL, Ray Train with 1 worker and no DeepSpeed, torchrun and Ray "
                            "Train with 1 worker, torchrun and Ray Train with W, all at the same global batch "
                            "(default: 2)")
    train.add_argument("--zero-stage", type=int, choices=[0, 2, 3], default=2,
                       help="DeepSpeed ZeRO stage of every DeepSpeed line; 0: no DeepSpeed anywhere, plain DDP "
                            "at W workers (default: 2)")
    train.add_argument("--max-length", type=int, default=512, help="tokens per example, longer ones cut (default: 512)")
    train.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per training worker (default: 1)")
    train.add_argument("--warmup-steps", type=int, default=2,
                       help="steps left out of the steady-state rate (default: 2)")

    gpu = bench_commands.add_parser("gpu", help="on one GPU, no Ray or vLLM needed: the SFT trainer's MFU and "
                                                "transformers' generation rate, Qwen2.5 shapes, random weights")
    gpu.set_defaults(func=bench_gpu_command)
    gpu.add_argument("--shapes", nargs="+", choices=["toy", "1.5b", "3b"], default=["1.5b", "3b"],
                     help="Qwen2.5 model shapes, in this order (toy: a CPU check of the command)")
    gpu.add_argument("--max-length", type=int, default=4096, help="tokens per packed training row")
    gpu.add_argument("--micro-batch", type=int, default=4, help="rows per training step")
    gpu.add_argument("--steps", type=int, default=30, help="optimizer steps per shape")
    gpu.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the steady-state rate")
    gpu.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                     help="keep activations (the 7B recipes checkpoint them; MFU counts 6 FLOPs per parameter "
                          "either way)")
    gpu.add_argument("--liger", action="store_true", help="Liger's fused kernels (the recipes' use_liger_kernel; "
                                                          "needs the liger-kernel package)")
    gpu.add_argument("--batches", type=int, nargs="*", default=[1, 64],
                     help="generation batch sizes (none: no generation lines)")
    gpu.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of the generation lines")
    gpu.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    gpu.add_argument("--deadline", type=float, default=360, help="seconds after which no further shape starts")
    gpu.add_argument("--record", type=Path, default=None, help="also write the lines as JSON here")

    scale = bench_commands.add_parser("scale", help="questions stage + one judged 1-token generation pass at growing "
                                                    "question counts: rows/s and driver peak RSS vs the smallest")
    scale.set_defaults(func=bench_scale_command)
    scale.add_argument("--questions", type=int, nargs="+", default=[5000, 50000],
                       help="question counts, each in a fresh driver process (default: 5000 50000)")
    scale.add_argument("--batch-size", type=int, default=256, help="rows per batch sent to the engine (default: 256)")

    sampling = bench_commands.add_parser("sampling", help="top-p on CPU, one decode step: vLLM's sort vs the "
                                                          "likeliest candidates (sphuatuo's vLLM plugin)")
    sampling.set_defaults(func=bench_sampling_command)
    sampling.add_argument("--rows", type=int, nargs="+", default=[8, 32, 128],
                          help="batch sizes: rows sampled in one step (default: 8 32 128)")
    sampling.add_argument("--vocabulary", type=int, nargs="+", default=None,
                          help="vocabulary sizes (default: SmolLM2's 49152 and Qwen2.5's 151936)")
    sampling.add_argument("--top-p", type=float, default=0.9, help="default: 0.9")
    sampling.add_argument("--steps", type=int, default=10, help="steps timed per line, the median kept (default: 10)")
    sampling.add_argument("--threads", type=int, default=2, help="torch threads, as a CPU engine's (default: 2)")

    status = commands.add_parser("status", help="each stage of a run: done, stale (and why), pending, with counts")
    status.set_defaults(func=status_command)
    status.add_argument("run_root", help="a run's root (local path or s3://…)")
    status.add_argument("--recipe", default=None, help="compare against this recipe (default: the one the run "
                                                       "last ran with)")
    _overrides(status)

    gc = commands.add_parser("gc", help="remove superseded stage outputs and checkpoints no stage refers to")
    gc.set_defaults(func=gc_command)
    gc.add_argument("run_root", help="a run's root (local path or s3://…)")
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")

    report = commands.add_parser("report", help="(re)write report.md, report.html and the model cards of a run")
    report.set_defaults(func=report_command)
    report.add_argument("run_root", help="a run's root (local path or s3://…)")

    plan = commands.add_parser("plan", help="per stage: Ray resources, GPU memory, a rough duration; exit 1 if "
                                            "a stage does not fit")
    plan.set_defaults(func=plan_command)
    plan.add_argument("recipe", help="recipe YAML file")
    plan.add_argument("--gpu-memory-gb", type=float, default=80, help="memory of one GPU (default: 80, an H100)")
    plan.add_argument("--gpu-bandwidth-tbs", type=float, default=3.35,
                      help="memory bandwidth of one GPU in TB/s (default: 3.35, an H100 SXM)")
    _overrides(plan)

    models = commands.add_parser("models", help="build the models that ship with no download")
    models.set_defaults(func=models_command)
    models.add_argument("which", choices=list(BUILTINS),
                        help="tiny random Qwen2, the tiny model trained to write the Self-Play format (the CPU "
                             "overlay's), or SmolLM2-135M-Instruct")
    return parser


def _load(path: str, overrides: list[str], overlays: list[str]) -> Recipe:
    """`load_recipe`, then declare the recipe's secrets, so that whatever this process prints or logs after
    masks their values (`main` declares them from the file when validation fails)."""
    recipe = load_recipe(path, overrides, overlays)
    declare_recipe(recipe.model_dump())
    return recipe


def _error(err: RecipeError | str) -> None:
    """Print an error to stderr with the values of declared secrets masked."""
    if isinstance(err, RecipeError):
        declare_recipe(err.raw or {})
    print(redact(str(err)), file=sys.stderr)


def _run_recipe(recipe_path: str, overrides: list[str], overlays: list[str], until: str | None = None) -> int:
    from sphuatuo.commands.report import write_report
    from sphuatuo.pipeline import run_pipeline

    run = run_pipeline(_load(recipe_path, overrides, overlays), until=until)
    print(f"report: {write_report(run)}")
    return 0


def run_command(args: argparse.Namespace) -> int:
    return _run_recipe(args.recipe, args.overrides, args.overlays, args.until)


def demo_command(args: argparse.Namespace) -> int:
    overrides = args.overrides + ([f"run_root={args.run_root}"] if args.run_root else [])
    return _run_recipe(str(DEMO_RECIPE), overrides, args.overlays)


def eval_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.evaluate import evaluation_recipe, run_evaluation, summary
    from sphuatuo.commands.report import write_report

    recipe = evaluation_recipe(args.model, args.data, data_format=args.format, run_root=args.run_root,
                               backend=args.backend, max_tokens=args.max_tokens, judge_model=args.judge_model,
                               prompt=args.prompt, protocols=args.protocols)
    run = run_evaluation(recipe)
    print(summary(run))
    print(f"report: {write_report(run)}")
    return 0


def validate_command(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.recipes:
        try:
            recipe = _load(path, args.overrides, args.overlays)
            print(f"{path}: valid recipe {recipe.name!r}")
        except RecipeError as err:
            _error(err)
            failed += 1
    return 1 if failed else 0


def data_check_command(args: argparse.Namespace) -> int:
    """Exit 1 with a proposed mapping (YAML whose comments say what to do) when no format fits the file."""
    from sphuatuo.data.loaders import UnknownFormat, load_questions, resolve_source_path, summarize, write_rejects
    from sphuatuo.data.mapping import mapping_yaml, propose_mapping

    try:
        result = load_questions(resolve_source_path(args.path), format=_source_format(args))
    except UnknownFormat as err:
        proposal = propose_mapping(err.sample)
        print(f"# {err}", file=sys.stderr)
        if proposal is None:
            columns = sorted({key for row in err.sample for key in row})
            print(f"# no mapping to propose; the columns are: {', '.join(columns) or 'none'}", file=sys.stderr)
            return 1
        print(f"# a proposed mapping from the columns of {args.path}: check it, save it as mapping.yaml and\n"
              f"# pass --columns mapping.yaml, or paste it under a source's columns: or into datasets.yaml\n"
              + mapping_yaml(proposal), end="")
        return 1
    print(summarize(result))
    if args.rejects:
        write_rejects(result.rejects, args.rejects)
    return 0


def data_convert_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.convert import convert, rejects_path
    from sphuatuo.data.loaders import summarize

    out = Path(args.out)
    result = convert(args.path, out, format=_source_format(args), to=args.to)
    print(summarize(result).splitlines()[0])
    print(f"questions: {out}\nrejects: {rejects_path(out)}")
    return 0


def submit_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.submit import submit

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return submit(args.recipe, address, overrides=args.overrides, overlays=args.overlays, working_dir=args.working_dir,
                  runtime_env_file=Path(args.runtime_env), follow=not args.no_follow, until=args.until)


def doctor_command(args: argparse.Namespace) -> int:
    import ray

    from sphuatuo.commands.doctor import doctor, format_checks

    recipe = _load(args.recipe, args.overrides, args.overlays)
    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, log_to_driver=False, runtime_env=worker_runtime_env())
    except ConnectionError as err:
        raise ValueError(f"no running Ray cluster found at {address!r}: start one (`ray start --head`, "
                         "`ray up cluster/aws.yaml`) or pass --address HEAD_IP:6379") from err
    checks = doctor(recipe)
    print(format_checks(checks))
    return 0 if all(check.ok for check in checks) else 1


def export_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.export import export_run
    from sphuatuo.store.run_root import RunRoot

    for name, path in export_run(RunRoot(args.run_root), Path(args.out)).items():
        print(f"{name}: {path}")
    return 0


def _at_least_one(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {number}")
    return number


def bench_generate_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.bench_generate import bench_engine, bench_generate, bench_header, format_bench
    from sphuatuo.store.runtime import leave_ray

    engine = bench_engine(args.model, args.dtype, args.batch_size, args.cpus, args.cpu_threads, args.device)
    lines = bench_generate(engine, args.prompts, args.max_tokens, with_hf=not args.no_hf,
                           multi_pass=not args.no_multi_pass, workloads=tuple(args.workloads), rounds=args.rounds)
    leave_ray()
    print(format_bench(lines, bench_header(engine)))
    return 0


def bench_train_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.bench_train import bench_train, format_train_bench
    from sphuatuo.store.runtime import leave_ray

    lines = bench_train(args.model, args.examples, args.epochs, args.workers, args.zero_stage, args.max_length,
                        args.cpus_per_worker, args.warmup_steps)
    leave_ray()
    print(format_train_bench(lines))
    return 0


def bench_gpu_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.bench_gpu import bench_gpu

    bench_gpu(args.shapes, args.max_length, args.micro_batch, args.steps, args.warmup_steps,
              args.gradient_checkpointing, args.liger, args.batches, args.prompt_tokens, args.new_tokens, args.deadline,
              args.record)
    return 0


def bench_scale_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.bench_scale import bench_scale, format_scale_bench

    print(format_scale_bench(bench_scale(args.questions, args.batch_size), args.batch_size))
    return 0


def bench_sampling_command(args: argparse.Namespace) -> int:
    import torch

    from sphuatuo.commands.bench_sampling import VOCABULARIES, bench_sampling, format_sampling

    torch.set_num_threads(args.threads)
    vocabularies = ({f"V={size}": size for size in args.vocabulary} if args.vocabulary else VOCABULARIES)
    print(format_sampling(bench_sampling(args.rows, vocabularies, args.top_p, args.steps), args.top_p, args.threads))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.report import write_report
    from sphuatuo.store.run_root import RunRoot

    print(f"report: {write_report(RunRoot(args.run_root))}")
    return 0


def status_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.status import format_statuses, stage_statuses
    from sphuatuo.store.run_root import RunRoot

    run = RunRoot(args.run_root)
    recipe = load_recipe(args.recipe, args.overrides, args.overlays) if args.recipe else None
    print(format_statuses(run, stage_statuses(run, recipe)))
    return 0


def gc_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.status import collect_garbage
    from sphuatuo.store.run_root import RunRoot

    garbage = collect_garbage(RunRoot(args.run_root), dry_run=args.dry_run)
    for folder in garbage:
        print(f"{'would remove' if args.dry_run else 'removed'} {folder}")
    print(f"{len(garbage)} unreferenced outputs {'found' if args.dry_run else 'removed'}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from sphuatuo.commands.plan import format_plan, plan

    result = plan(_load(args.recipe, args.overrides, args.overlays), args.gpu_memory_gb, args.gpu_bandwidth_tbs)
    print(format_plan(result))
    return 0 if result.fits else 1


def models_command(args: argparse.Namespace) -> int:
    from sphuatuo.local_models import resolve_model

    print(resolve_model(BUILTINS[args.which]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # other libraries' lines too, once secrets are declared
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())
    try:
        return args.func(args)
    except RecipeError as err:
        _error(err)
        return 2
    except (ValueError, FileNotFoundError, LeaseError) as err:
        _error(f"error: {err}")
        return 2
    except Exception:  # noqa: BLE001 - the traceback Python would print, with secrets masked
        _error(traceback.format_exc().rstrip())
        return 1


if __name__ == "__main__":
    sys.exit(main())
