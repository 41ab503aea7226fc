"""Train a tiny Qwen3-architecture model on the Python standard library that ships with the running interpreter.

The corpus is every machine's own CPython stdlib (.py source, comments and docstrings; PSF license), plus chat
samples derived from it with `ast` (user: "What does `mod.func(args)` do?", assistant: the docstring's first
paragraph, ended by <|im_end|>), so the chat template, <|im_end|> as EOS and short answers are learned. A byte-level
BPE tokenizer is trained on the training split with `tokenizers`; the model is transformers' Qwen3ForCausalLM, trained
with a plain PyTorch loop (AdamW, warmup + cosine) that is deterministic given --seed (and the step count).

Writes a Hugging Face checkpoint (config.json, model.safetensors in bf16, tokenizer.json, tokenizer_config.json with
the chat template, generation_config.json) plus README.md (model card), loss_curve.png and train_log.json: 8 files.

    python3 tools/train_tiny_model.py --out /tmp/tiny                 # GPU: a few minutes
    python3 tools/train_tiny_model.py --tiny --out /tmp/tiny-smoke    # CPU smoke run: seconds
"""
import argparse
import ast
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import sysconfig
import time
import tokenize
import warnings
from dataclasses import asdict, dataclass

# cuBLAS is deterministic only with a fixed workspace; must be set before CUDA initialises.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]  # ids 0, 1, 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2/3's pre-tokenizer split: digits one by one, newline runs kept together, words with one leading space.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Directories skipped anywhere in the stdlib tree: third-party packages, the regression test suites (large, full of
# odd data, and absent from many distro builds), generated codec tables, caches and build configuration.
EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "__pycache__",
                 "__phello__"}
EXCLUDED_DIR_PREFIXES = ("config-",)
CHAT_QUESTIONS = ["What does `{sig}` do?", "Explain `{sig}`.", "What is `{sig}` for?", "Describe `{sig}`."]
MAX_ANSWER_CHARS = 600
SAMPLE_PROMPTS = [  # (kind, text) completed greedily for the model card
    ("text", "def fibonacci(n):\n"),
    ("text", "import os\n\n\ndef read_lines(path):\n    \"\"\""),
    ("chat", "What does `os.path.join(a, *p)` do?"),
    ("chat", "What does `json.dumps(obj)` do?"),
    ("chat", "introduce yourself"),
    ("chat", "list all prime numbers within 100"),
]


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """Everything that determines the run (recorded in train_log.json)."""
    seed: int = 0
    # data
    held_out_fraction: float = 0.02
    max_files: int = 0                 # 0 = the whole stdlib; N = N files spread evenly over the sorted list
    chat: bool = True
    vocab_size: int = 8192
    # model (Qwen3)
    num_layers: int = 6
    hidden_size: int = 256
    intermediate_size: int = 768
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # optimisation
    steps: int = 0                     # 0 = auto: min(--max-epochs, what fits in --max-minutes)
    max_epochs: float = 15.0
    max_minutes: float = 4.5
    batch_size: int = 32
    seq_len: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 50
    eval_every: int = 250
    device: str = "auto"


TINY = {"max_files": 48, "held_out_fraction": 0.1, "vocab_size": 512, "num_layers": 2, "hidden_size": 64,
        "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "steps": 60, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "warmup_steps": 10, "log_every": 5,
        "eval_every": 20, "max_minutes": 5.0}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created; existing files are overwritten)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long CPU smoke setting (tiny corpus and model)")
    default = Settings()
    flags = {"seed": int, "steps": int, "batch_size": int, "seq_len": int, "max_minutes": float,
             "max_epochs": float, "lr": float, "warmup_steps": int, "vocab_size": int, "num_layers": int,
             "hidden_size": int, "intermediate_size": int, "num_heads": int, "num_kv_heads": int, "head_dim": int,
             "max_files": int, "held_out_fraction": float, "eval_every": int, "log_every": int, "device": str}
    for name, kind in flags.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"default {getattr(default, name)!r} ({TINY.get(name, getattr(default, name))!r} "
                                 "with --tiny)")
    parser.add_argument("--no-chat", action="store_true", help="train on source text only (no chat samples)")
    args = parser.parse_args(argv)
    settings = Settings(**(TINY if args.tiny else {}))
    if args.tiny:
        settings.device = "cpu"
    for name in flags:
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    settings.chat = not args.no_chat
    check_settings(settings)
    return args, settings


def check_settings(s: Settings) -> None:
    positive = ["batch_size", "seq_len", "vocab_size", "num_layers", "hidden_size", "intermediate_size", "num_heads",
                "num_kv_heads", "head_dim", "log_every", "eval_every"]
    for name in positive:
        if getattr(s, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if s.steps < 0 or s.max_minutes <= 0 or s.max_epochs <= 0:
        raise ValueError(f"--steps must be >= 0 (0 = auto) and --max-minutes/--max-epochs > 0, got "
                         f"{s.steps}, {s.max_minutes}, {s.max_epochs}")
    if s.head_dim < 16 or s.head_dim & (s.head_dim - 1):
        raise ValueError(f"--head-dim must be a power of two >= 16 (the engine's Triton kernels), got {s.head_dim}")
    if s.num_heads % s.num_kv_heads:
        raise ValueError(f"--num-heads {s.num_heads} must be a multiple of --num-kv-heads {s.num_kv_heads}")
    if not 0 < s.held_out_fraction < 0.5:
        raise ValueError(f"--held-out-fraction must be in (0, 0.5), got {s.held_out_fraction}")
    if s.vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials), got {s.vocab_size}")
    if s.seq_len >= s.max_position_embeddings:
        raise ValueError(f"--seq-len {s.seq_len} must be below max_position_embeddings {s.max_position_embeddings}")
    if s.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {s.device!r}")
    if s.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available; use --device cpu")


# ----------------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------------

def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_corpus_files(root: str, max_files: int = 0) -> list[str]:
    """Relative paths of the stdlib's .py files (minus EXCLUDED_DIRS), sorted; max_files > 0 keeps that many spread
    evenly over the sorted list."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_DIR_PREFIXES)]
        rel = os.path.relpath(dirpath, root)
        paths += [os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/") for f in filenames if f.endswith(".py")]
    paths.sort()
    if 0 < max_files < len(paths):
        paths = [paths[i * len(paths) // max_files] for i in range(max_files)]
    return paths


def path_hash(rel_path: str) -> float:
    """A stable value in [0, 1) for a relative path (independent of Python's hash seed and version)."""
    return int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big") / 2 ** 64


def split_files(rel_paths: list[str], held_out_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held_out) by path hash; at least one file each when there are two or more."""
    held = [p for p in rel_paths if path_hash(p) < held_out_fraction]
    if not held and len(rel_paths) > 1:
        held = [min(rel_paths, key=path_hash)]
    if len(held) == len(rel_paths) and len(rel_paths) > 1:
        held.remove(max(held, key=path_hash))
    held_set = set(held)
    return [p for p in rel_paths if p not in held_set], held


def read_source(path: str) -> str | None:
    """The file's text (encoding from its cookie, universal newlines), or None when it cannot be decoded."""
    try:
        with tokenize.open(path) as f:
            return f.read()
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None


def module_name(rel_path: str) -> str:
    name = rel_path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def first_paragraph(doc: str) -> str:
    return doc.strip().split("\n\n")[0].strip()


def signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The parameter list as source, without a method's self/cls and without annotations."""
    def bare(args: list[ast.arg]) -> list[ast.arg]:
        return [ast.arg(arg=a.arg) for a in args]

    a = node.args
    args = ast.arguments(posonlyargs=bare(a.posonlyargs), args=bare(a.args), kwonlyargs=bare(a.kwonlyargs),
                         vararg=a.vararg and ast.arg(arg=a.vararg.arg), kwarg=a.kwarg and ast.arg(arg=a.kwarg.arg),
                         kw_defaults=a.kw_defaults, defaults=a.defaults)
    positional = args.posonlyargs or args.args
    if positional and positional[0].arg in ("self", "cls") and len(a.defaults) < len(a.posonlyargs + a.args):
        positional.pop(0)  # the receiver has no default, so the defaults (aligned from the end) still fit
    return ast.unparse(args)


def chat_samples(source: str, rel_path: str) -> list[list[dict]]:
    """Conversations from a module's public functions, methods and classes that have a docstring: the user asks
    about `module.name(signature)` (one of CHAT_QUESTIONS, picked by a stable hash), the assistant answers with
    the docstring's first paragraph."""
    try:
        with warnings.catch_warnings():  # e.g. 3.12's SyntaxWarning for invalid escape sequences
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    mod = module_name(rel_path)
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if child.name.startswith("_"):
                continue
            qualname = f"{prefix}.{child.name}"
            doc = ast.get_docstring(child)
            answer = first_paragraph(doc) if doc else ""
            if 20 <= len(answer) <= MAX_ANSWER_CHARS:
                sig = qualname if isinstance(child, ast.ClassDef) else f"{qualname}({signature(child)})"
                question = CHAT_QUESTIONS[int(path_hash(qualname) * len(CHAT_QUESTIONS))].format(sig=sig)
                out.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
            if isinstance(child, ast.ClassDef):
                visit(child, qualname)

    visit(tree, mod)
    return out


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in Python (the tokenizer's Jinja template renders the same string)."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


@dataclass
class Corpus:
    train_docs: list[str]
    held_out_docs: list[str]
    train_files: list[str]
    held_out_files: list[str]
    num_chat_train: int
    num_chat_held_out: int
    source_bytes: int


def build_corpus(root: str, s: Settings) -> Corpus:
    """Documents: each file's text, then (with s.chat) its chat samples; files split by path hash."""
    files = list_corpus_files(root, s.max_files)
    if len(files) < 2:
        raise ValueError(f"found {len(files)} .py files under {root!r}; the stdlib is needed as the corpus")
    train_files, held_files = split_files(files, s.held_out_fraction)
    docs: dict[str, tuple[list[str], int]] = {}
    total_bytes = 0
    for rel in files:
        text = read_source(os.path.join(root, rel))
        if not text or not text.strip():
            docs[rel] = ([], 0)
            continue
        total_bytes += len(text.encode())
        chats = [render_chat(c) for c in chat_samples(text, rel)] if s.chat else []
        docs[rel] = ([text] + chats, len(chats))

    def gather(names: list[str]) -> tuple[list[str], int]:
        return [d for n in names for d in docs[n][0]], sum(docs[n][1] for n in names)

    train_docs, n_chat_train = gather(train_files)
    held_docs, n_chat_held = gather(held_files)
    return Corpus(train_docs, held_docs, train_files, held_files, n_chat_train, n_chat_held, total_bytes)


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Qwen's split pattern; specials get ids 0..2 and are never split."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer, length=len(docs))
    return tok


def save_tokenizer(tok: Tokenizer, out: str, max_length: int) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inside, so no chat_template.jinja file)."""
    from transformers import PreTrainedTokenizerFast
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=EOT,
                                   chat_template=CHAT_TEMPLATE, model_max_length=max_length)
    fast.save_pretrained(out, save_jinja_files=False)
    jinja = os.path.join(out, "chat_template.jinja")
    if os.path.exists(jinja):  # a transformers version that ignores save_jinja_files
        os.remove(jinja)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    # A class every transformers version (4.x and 5.x) resolves; the template inline for the same reason.
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE, eos_token=IM_END,
               pad_token=EOT, bos_token=None, clean_up_tokenization_spaces=False)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def encode_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one int32 stream, each followed by <|endoftext|> (batch-encoded in parallel)."""
    eot = tok.token_to_id(EOT)
    pieces = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(np.asarray([eot], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def unigram_cross_entropy(train_ids: np.ndarray, held_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under the train split's add-one smoothed unigram model."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(-log_p[held_ids].mean())


# ----------------------------------------------------------------------------------------------
# Model and training
# ----------------------------------------------------------------------------------------------

def model_vocab_size(tok: Tokenizer) -> int:
    return -(-tok.get_vocab_size() // 64) * 64  # a multiple of 64: splits evenly for tensor parallelism


def build_model(s: Settings, vocab_size: int, tok: Tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads, num_key_value_heads=s.num_kv_heads,
        head_dim=s.head_dim, hidden_act="silu", max_position_embeddings=s.max_position_embeddings,
        initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": s.rope_theta},
        use_sliding_window=False, bos_token_id=tok.token_to_id(EOT), eos_token_id=tok.token_to_id(IM_END),
        pad_token_id=None)
    config.architectures = ["Qwen3ForCausalLM"]
    # Eager attention is plain matmul + softmax: deterministic backward on GPU (fused SDPA kernels may not be).
    config._attn_implementation = "eager"
    torch.manual_seed(s.seed)
    return Qwen3ForCausalLM(config)


def lr_at(step: int, total: int, s: Settings) -> float:
    """Linear warmup, then cosine from s.lr down to s.lr * s.min_lr_ratio at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, total - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: torch.nn.Module, s: Settings, device: str) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def sample_batch(stream: torch.Tensor, s: Settings, gen: torch.Generator) -> torch.Tensor:
    """[batch_size, seq_len + 1] windows at random offsets of the packed stream (CPU generator: same on any
    device)."""
    starts = torch.randint(0, len(stream) - s.seq_len - 1, (s.batch_size,), generator=gen)
    return torch.stack([stream[i:i + s.seq_len + 1] for i in starts.tolist()])


def lm_loss(model: torch.nn.Module, window: torch.Tensor, device: str) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a [B, T + 1] window batch."""
    window = window.to(device, non_blocking=True).long()
    inputs, targets = window[:, :-1], window[:, 1:]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        logits = model(input_ids=inputs).logits                     # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def windows_of(stream: torch.Tensor, seq_len: int, max_windows: int = 0) -> torch.Tensor:
    """[N, seq_len + 1] windows of the stream: non-overlapping (consecutive windows share one boundary token), or
    with max_windows > 0, that many spread evenly over the stream."""
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise ValueError(f"a stream of {len(stream)} tokens is shorter than --seq-len {seq_len} + 1")
    stride = max(1, n // max_windows) if max_windows else 1
    starts = [i * seq_len for i in range(0, n, stride)][:max_windows or None]
    return torch.stack([stream[i:i + seq_len + 1] for i in starts])


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: str) -> float:
    """Mean next-token loss (nats/token) over [N, T + 1] windows."""
    model.eval()
    total = 0.0
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        total += lm_loss(model, batch, device).item() * len(batch)
    model.train()
    return total / len(windows)


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class Log:
    """Prints lines with elapsed time and keeps them for train_log.json."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {msg}"
        self.lines.append(line)
        print(line, flush=True)


@dataclass
class TrainResult:
    steps: int
    steps_planned: str
    tokens_seen: int
    train_seconds: float
    curve: list[tuple[int, float]]           # (step, mean train loss over the last log interval)
    eval_curve: list[tuple[int, float]]      # (step, held-out loss)
    stopped_early: bool


def plan_steps(s: Settings, train_tokens: int, step_seconds: float | None) -> tuple[int, str]:
    """The run's step count: --steps if given, else min(max_epochs worth, what fits in max_minutes)."""
    epoch_steps = s.max_epochs * train_tokens / (s.batch_size * s.seq_len)
    if s.steps:
        return s.steps, "--steps"
    by_epochs = max(1, int(epoch_steps))
    if step_seconds is None:
        return by_epochs, f"{s.max_epochs:g} epochs"
    by_time = max(1, int(0.97 * s.max_minutes * 60 / step_seconds))
    if by_time < by_epochs:
        return by_time, f"time budget {s.max_minutes:g} min at {step_seconds * 1e3:.1f} ms/step"
    return by_epochs, f"{s.max_epochs:g} epochs"


def train(model: torch.nn.Module, train_ids: torch.Tensor, held_windows: torch.Tensor, s: Settings, device: str,
          log: Log) -> TrainResult:
    """The training loop. With --steps 0 the step count is fixed after a short timed probe (steps 10..30), before
    warmup ends (the warmup does not depend on it), so the learning-rate schedule is the same as that of a run given
    that count with --steps."""
    opt = make_optimizer(model, s, device)
    gen = torch.Generator().manual_seed(s.seed)
    total, why = plan_steps(s, len(train_ids), None)
    probe = (10, 30) if not s.steps and total > 60 and s.warmup_steps >= 30 else None
    curve, eval_curve, running = [], [], []
    start = time.perf_counter()
    probe_t0 = start
    step = 0
    stopped_early = False
    model.train()
    while step < total:
        if probe and step == probe[0]:
            sync(device)
            probe_t0 = time.perf_counter()
        if probe and step == probe[1]:
            sync(device)
            step_s = (time.perf_counter() - probe_t0) / (probe[1] - probe[0])
            total, why = plan_steps(s, len(train_ids), step_s)
            total = max(total, step + 1)
            log(f"planned {total} steps ({why}); reproduce with --steps {total}")
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, s)
        loss = lm_loss(model, sample_batch(train_ids, s, gen), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        running.append(loss.detach())
        step += 1
        if step % s.log_every == 0 or step == total:
            mean = torch.stack(running).mean().item()
            running = []
            curve.append((step, mean))
            log(f"step {step:6d}/{total}  train loss {mean:.4f}  lr {lr_at(step - 1, total, s):.2e}")
        if step % s.eval_every == 0 and step != total:
            eval_curve.append((step, evaluate(model, held_windows, s.batch_size, device)))
            log(f"step {step:6d}  held-out loss {eval_curve[-1][1]:.4f}")
        if time.perf_counter() - start > s.max_minutes * 60 * 1.05 and step < total:
            log(f"WARNING: stopping at step {step} of {total}: --max-minutes {s.max_minutes:g} exceeded")
            stopped_early = True
            break
    sync(device)
    seconds = time.perf_counter() - start
    return TrainResult(step, why, step * s.batch_size * s.seq_len, seconds, curve, eval_curve, stopped_early)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of the fp32 weights (for checking that two runs with one seed agree)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------

def save_model(model: torch.nn.Module, tok: Tokenizer, out: str) -> None:
    """model.safetensors in bf16, config.json (default attention implementation), generation_config.json with
    both stop ids."""
    from transformers import GenerationConfig
    model = model.to(torch.bfloat16)
    model.config._attn_implementation = None
    eos = [tok.token_to_id(IM_END), tok.token_to_id(EOT)]
    model.generation_config = GenerationConfig(bos_token_id=tok.token_to_id(EOT), eos_token_id=eos,
                                               pad_token_id=tok.token_to_id(EOT))
    model.save_pretrained(out, safe_serialization=True)


def sample_completions(out: str, device: str, max_new_tokens: int) -> list[dict]:
    """Greedy completions of SAMPLE_PROMPTS from the saved checkpoint, loaded back with HF Auto classes (which also
    checks that the files load)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).to(device).eval()
    samples = []
    for kind, text in SAMPLE_PROMPTS:
        prompt = text if kind == "text" else tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)], device=device)
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False)
        completion = tokenizer.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=False)
        samples.append({"kind": kind, "prompt": text, "completion": completion})
    return samples


def plot_losses(path: str, result: TrainResult, unigram: float, initial_held: float, final_held: float) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: loss_curve.png is not written", stacklevel=2)
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([x for x, _ in result.curve], [y for _, y in result.curve], label="train (mean per log interval)")
    held = [(0, initial_held)] + result.eval_curve + [(result.steps, final_held)]
    ax.plot([x for x, _ in held], [y for _, y in held], "o-", label="held-out")
    ax.axhline(unigram, color="gray", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("tiny Qwen3 on the CPython standard library")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def reproduce_command(s: Settings, tiny: bool, steps: int) -> str:
    args = ["python3", "tools/train_tiny_model.py", "--out", "<dir>"] + (["--tiny"] if tiny else [])
    base = Settings(**(TINY if tiny else {}))
    if tiny:
        base.device = "cpu"
    for name in ("seed", "vocab_size", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "head_dim", "batch_size", "seq_len", "lr", "warmup_steps", "max_files", "held_out_fraction",
                 "max_epochs", "max_minutes"):
        if getattr(s, name) != getattr(base, name):
            args += ["--" + name.replace("_", "-"), str(getattr(s, name))]
    if not s.chat:
        args.append("--no-chat")
    return shlex.join(args + ["--steps", str(steps)])


PSF_LICENSE_URL = "https://docs.python.org/3/license.html"


def psf_license_text(stdlib: str) -> str | None:
    """The 'PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2' section of the interpreter's LICENSE.txt, if it ships one."""
    path = os.path.join(stdlib, "LICENSE.txt")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    start = text.find("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.find("BEOPEN.COM LICENSE AGREEMENT", start)
    return text[start:end].strip() if start >= 0 and end > start else None


def card_samples(samples: list[dict]) -> str:
    fence = "````"  # completions may contain ``` themselves
    return "\n\n".join(f"{x['kind']} prompt {x['prompt']!r}, completion:\n\n{fence}\n{x['completion']}\n{fence}"
                       for x in samples)


def card_corpus(info: dict) -> str:
    s = info["settings"]
    chat = (f"Mixed in: {info['chat_train']:,} (train) + {info['chat_held_out']:,} (held-out) chat samples derived "
            "with `ast` from the same files: the user asks about a public function, method or class "
            "(``What does `module.name(signature)` do?`` and three variants), the assistant answers with the first "
            "paragraph of its docstring, ended by `<|im_end|>`." if s["chat"] else "No chat samples.")
    return f"""## Corpus
The `.py` files of the **Python {info['python_version']} standard library**, that of the interpreter that ran the
training (`{info['stdlib']}`), read in sorted path order: source code, comments and docstrings, unmodified.
Excluded: every directory named {', '.join(f'`{d}`' for d in sorted(EXCLUDED_DIRS))} or starting with `config-`
(third-party packages, the regression test suites, generated codec tables, caches). {info['files_train']:,} files
({info['source_bytes'] / 1e6:.1f} MB with the held-out ones) train; {info['files_held_out']} files are held out: those
whose relative path's sha256, read as a fraction, is below {s['held_out_fraction']} (listed in `train_log.json`).
{chat} Documents are packed into one stream, each followed by `<|endoftext|>`; training windows start at random
offsets. Another Python version's stdlib gives a different corpus (and model).
"""


def card_license(info: dict) -> str:
    text = psf_license_text(info["stdlib"])
    agreement = (f"The PSF License Agreement, as shipped with this Python in `LICENSE.txt`:\n\n````\n{text}\n````"
                 if text else f"The PSF License Agreement: {PSF_LICENSE_URL}")
    return f"""## License
The corpus, the CPython standard library, is distributed under the **Python Software Foundation License Version 2**
(PSF-2.0), which allows preparing and distributing derivative works provided the PSF License Agreement and PSF's
copyright notice are retained and a brief summary of the changes is included. This model (weights and tokenizer)
is such a derivative work. Summary of the changes: the unmodified `.py` files listed above were tokenized and used as
training data for a neural language model; question/answer pairs were derived from their docstrings; the model may
reproduce fragments of them. A few standard-library modules carry additional permissive notices of their own authors
(listed in section C of CPython's LICENSE file); those notices are part of the files themselves.

{agreement}
"""


def results_table(info: dict) -> str:
    r, s = info["results"], info["settings"]
    rows = [(f"train: {info['eval_windows']} windows of {s['seq_len']} tokens spread over the training stream",
             f"{r['train_loss']:.3f}"),
            (f"held-out: the {info['held_out_tokens']:,}-token held-out stream in windows of {s['seq_len']}",
             f"**{r['held_out_loss']:.3f}**"),
            ("unigram baseline on the held-out tokens (add-one smoothed unigram of the training split)",
             f"{r['unigram_loss']:.3f}"),
            ("untrained model on the held-out tokens", f"{r['initial_held_out_loss']:.3f}")]
    return "\n".join(["| | nats/token |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def model_card(info: dict) -> str:
    """README.md for the checkpoint."""
    r, s = info["results"], info["settings"]
    curve = "![loss curve](loss_curve.png)" if info["loss_curve_png"] else "(matplotlib was missing: no loss curve)"
    stopped = " (stopped early by --max-minutes)" if r["stopped_early"] else ""
    return f"""---
license: other
license_name: psf-2.0
license_link: {PSF_LICENSE_URL}
library_name: transformers
pipeline_tag: text-generation
---
# tiny-qwen3-stdlib

A {info['params'] / 1e6:.1f}M-parameter model of the **Qwen3 architecture** (`Qwen3ForCausalLM`) trained from scratch
by nano-vllm's `tools/train_tiny_model.py`, so that tests, examples and accuracy checks have a small *real* model:
peaked next-token distributions, a chat template, and an end-of-turn token that it emits. It writes
Python-flavoured text and knows little else; it is not an assistant.

{card_corpus(info)}
## Tokenizer
Byte-level BPE with {info['tokenizer_vocab']:,} tokens, trained with `tokenizers` on the training split, with Qwen2/3's
split pattern (digits one by one). Special tokens: `<|endoftext|>` (id 0: document separator and padding),
`<|im_start|>` (1), `<|im_end|>` (2: end of turn, `eos_token`). Chat template: Qwen's
`<|im_start|>role\\n...<|im_end|>\\n` per message, `<|im_start|>assistant\\n` with `add_generation_prompt`.
`generation_config.json` stops on `<|im_end|>` and `<|endoftext|>`.

## Architecture
Qwen3 with {s['num_layers']} layers, hidden size {s['hidden_size']}, MLP size {s['intermediate_size']},
{s['num_heads']} query heads and {s['num_kv_heads']} KV heads of dimension {s['head_dim']}, vocabulary
{info['model_vocab']:,} (the tokenizer's, rounded up to a multiple of 64), tied input/output embeddings, RoPE theta
{s['rope_theta']:g}, {s['max_position_embeddings']} positions: {info['params']:,} parameters, stored in bfloat16.

## Training
    {info['command']}

- device: {info['device_name']}; Python {info['python_version']}, torch {info['torch_version']}, transformers
  {info['transformers_version']}; seed {s['seed']}
- {r['steps']:,} steps ({r['steps_planned']}) of {s['batch_size']} x {s['seq_len']} tokens: {r['tokens_seen']:,}
  tokens seen, {r['epochs']:.1f} passes over the {info['train_tokens']:,}-token training stream{stopped}
- AdamW (lr {s['lr']:g}, betas 0.9/0.95, weight decay {s['weight_decay']} on matrices), {s['warmup_steps']} warmup
  steps, then cosine decay to {s['min_lr_ratio']:g} x lr; gradient clipping at {s['grad_clip']}; bf16 autocast on
  GPU, fp32 on CPU
- training took {r['train_seconds']:.0f} s, the whole script {info['total_seconds']:.0f} s
- the same command and seed reproduce the weights on the same software and hardware (sha256 prefix of the fp32
  weights before the bf16 cast: `{r['weights_sha256']}`)

## Results
Next-token cross-entropy of the final weights:

{results_table(info)}

{curve}

## Sample completions
Greedy, from the saved checkpoint loaded with `AutoModelForCausalLM` (chat prompts go through the chat template).

{card_samples(info['samples'])}

{card_license(info)}"""


def summary_rows(info: dict, out: str) -> list[tuple[str, str]]:
    r = info["results"]
    size = os.path.getsize(os.path.join(out, "model.safetensors"))
    return [("python / stdlib", f"{info['python_version']}  {info['stdlib']}"),
            ("device", info["device_name"]),
            ("corpus", f"{info['files_train']}+{info['files_held_out']} files, {info['train_tokens']:,} train / "
                       f"{info['held_out_tokens']:,} held-out tokens"),
            ("model", f"{info['params']:,} params, model.safetensors {size / 2 ** 20:.2f} MiB"),
            ("steps", f"{r['steps']:,} ({r['steps_planned']}), {r['tokens_seen']:,} tokens, {r['epochs']:.1f} epochs"),
            ("loss train / held-out", f"{r['train_loss']:.4f} / {r['held_out_loss']:.4f} nats/token"),
            ("unigram baseline", f"{r['unigram_loss']:.4f} nats/token"),
            ("phases (s)", "  ".join(f"{k} {v:.1f}" for k, v in info["phases_seconds"].items())
             + f"  total {info['total_seconds']:.1f}"),
            ("weights sha256", r["weights_sha256"]),
            ("files", " ".join(sorted(os.listdir(out))))]


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------

def prepare_data(s: Settings, out: str, log: Log,
                 phases: dict[str, float]) -> tuple[str, Corpus, Tokenizer, np.ndarray, np.ndarray, float]:
    """Corpus, tokenizer (saved to out), encoded train/held-out streams and the unigram baseline."""
    t = time.perf_counter()
    root = stdlib_root()
    corpus = build_corpus(root, s)
    phases["corpus"] = time.perf_counter() - t
    log(f"corpus: Python {platform.python_version()} stdlib {root}: {len(corpus.train_files)} train + "
        f"{len(corpus.held_out_files)} held-out files, {corpus.source_bytes / 1e6:.1f} MB of source, "
        f"{corpus.num_chat_train} + {corpus.num_chat_held_out} chat samples")

    t = time.perf_counter()
    tok = train_tokenizer(corpus.train_docs, s.vocab_size)
    save_tokenizer(tok, out, s.max_position_embeddings)
    phases["tokenizer"] = time.perf_counter() - t
    log(f"tokenizer: {tok.get_vocab_size()} tokens")

    t = time.perf_counter()
    train_np = encode_stream(tok, corpus.train_docs)
    held_np = encode_stream(tok, corpus.held_out_docs)
    phases["encode"] = time.perf_counter() - t
    unigram = unigram_cross_entropy(train_np, held_np, model_vocab_size(tok))
    train_bytes = sum(len(d.encode()) for d in corpus.train_docs)
    log(f"encoded: {len(train_np):,} train / {len(held_np):,} held-out tokens "
        f"({train_bytes / max(1, len(train_np)):.2f} bytes/token); unigram baseline {unigram:.4f} nats/token")
    if len(train_np) <= s.seq_len + 1 or len(held_np) <= s.seq_len + 1:
        raise ValueError(f"corpus too small for --seq-len {s.seq_len}: {len(train_np)} train and {len(held_np)} "
                         "held-out tokens; use a shorter --seq-len or more files (--max-files)")
    return root, corpus, tok, train_np, held_np, unigram


def main(argv: list[str] | None = None) -> int:
    args, s = parse_args(argv)
    log = Log()
    phases: dict[str, float] = {}
    device = resolve_device(s.device)
    torch.manual_seed(s.seed)
    np.random.seed(s.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    root, corpus, tok, train_np, held_np, unigram = prepare_data(s, out, log, phases)
    vocab = model_vocab_size(tok)
    train_ids, held_ids = torch.from_numpy(train_np), torch.from_numpy(held_np)

    model = build_model(s, vocab, tok).to(device)
    params = sum(p.numel() for p in model.parameters())
    if params * 2 > 15 * 2 ** 20:
        log(f"WARNING: {params:,} parameters make a {params * 2 / 2 ** 20:.1f} MiB bf16 file (over 15 MiB)")
    held_windows = windows_of(held_ids, s.seq_len)
    initial_held = evaluate(model, held_windows, s.batch_size, device)
    log(f"model: {params:,} parameters on {device}; initial held-out loss {initial_held:.4f} (ln V = "
        f"{math.log(vocab):.4f})")

    result = train(model, train_ids, held_windows, s, device, log)
    phases["train"] = result.train_seconds

    t = time.perf_counter()
    held_loss = evaluate(model, held_windows, s.batch_size, device)
    # As many windows as the held-out split has, spread evenly over the training stream.
    eval_windows = len(held_windows)
    train_loss = evaluate(model, windows_of(train_ids, s.seq_len, eval_windows), s.batch_size, device)
    digest = weights_digest(model)
    phases["eval"] = time.perf_counter() - t
    log(f"final: train {train_loss:.4f}, held-out {held_loss:.4f}, unigram {unigram:.4f} nats/token; "
        f"weights sha256 {digest}")

    t = time.perf_counter()
    save_model(model, tok, out)
    phases["save"] = time.perf_counter() - t
    t = time.perf_counter()
    samples = sample_completions(out, device, max_new_tokens=16 if args.tiny else 64)
    phases["samples"] = time.perf_counter() - t
    for x in samples:
        log(f"sample ({x['kind']}) {x['prompt']!r} -> {x['completion']!r}")
    plotted = plot_losses(os.path.join(out, "loss_curve.png"), result, unigram, initial_held, held_loss)

    import transformers
    info = {
        "python_version": platform.python_version(), "stdlib": root, "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)",
        "command": reproduce_command(s, args.tiny, result.steps), "argv": sys.argv,
        "settings": asdict(s), "params": params, "tokenizer_vocab": tok.get_vocab_size(), "model_vocab": vocab,
        "files_train": len(corpus.train_files), "files_held_out": len(corpus.held_out_files),
        "held_out_file_list": corpus.held_out_files, "chat_train": corpus.num_chat_train,
        "chat_held_out": corpus.num_chat_held_out, "source_bytes": corpus.source_bytes,
        "train_tokens": len(train_np), "held_out_tokens": len(held_np),
        "results": {"steps": result.steps, "steps_planned": result.steps_planned, "tokens_seen": result.tokens_seen,
                    "epochs": result.tokens_seen / len(train_np), "train_seconds": result.train_seconds,
                    "stopped_early": result.stopped_early, "initial_held_out_loss": initial_held,
                    "train_loss": train_loss, "held_out_loss": held_loss, "unigram_loss": unigram,
                    "train_curve": result.curve, "held_out_curve": result.eval_curve, "weights_sha256": digest},
        "samples": samples, "phases_seconds": phases, "loss_curve_png": plotted,
    }
    info["eval_windows"] = eval_windows
    info["total_seconds"] = time.perf_counter() - log.start
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(model_card(info))
    info["log"] = log.lines
    with open(os.path.join(out, "train_log.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")

    print("\n" + summary_table(summary_rows(info, out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
