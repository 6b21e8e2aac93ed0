"""Typed, frozen configuration for every stage. Imports no torch, so the CLI starts fast.

Each option is documented once, in the `help` of its field; `aigc.cli.args` builds the command-line
flags (with defaults and choices) from these dataclasses.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from aigc.errors import AigcError


def opt(default: Any, help: str, *, choices: tuple | None = None, flag: str | None = None) -> Any:
    """A dataclass field that carries its own CLI help (and optional choices / flag name)."""
    metadata = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults so configs stay immutable")
    return field(default=default, metadata=metadata)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise AigcError(message)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"invalid {name} {value!r}; choose one of: {', '.join(map(str, choices))}")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

MODEL_KINDS = ("gpt", "lstm")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rotary")
MLPS = ("gelu", "swiglu")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a GPT or an LSTM. The GPT is one decoder-only transformer whose fields choose GPT-2
    (the defaults: LayerNorm, learned positions, GELU, biases, tied head) or the Llama family
    (RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases, e.g. Qwen2's q/k/v bias)."""

    kind: str = opt("gpt", "model family", choices=MODEL_KINDS, flag="model")
    vocab_size: int = opt(8192, "vocabulary size; set from the dataset's tokenizer")
    block_size: int = opt(256, "context length in tokens")
    n_layer: int = opt(4, "number of transformer blocks (or stacked LSTM layers)")
    n_head: int = opt(4, "attention heads per block (GPT only)")
    n_embd: int = opt(256, "embedding width")
    hidden_size: int = opt(512, "LSTM hidden size (LSTM only)")
    dropout: float = opt(0.0, "dropout probability during training")
    bias: bool = opt(True, "use biases in linear and LayerNorm layers (GPT-2 does)")
    norm: str = opt("layernorm", "normalisation of each block: GPT-2's layernorm or Llama's rmsnorm", choices=NORMS)
    norm_eps: float = opt(1e-5, "epsilon added to the variance in each normalisation layer")
    positions: str = opt("learned", "position encoding: GPT-2's learned table or Llama's rotary", choices=POSITIONS)
    rope_theta: float = opt(10000.0, "rotary base frequency theta (rotary positions only)")
    mlp: str = opt("gelu", "MLP of each block: GPT-2's tanh-GELU or Llama's SwiGLU", choices=MLPS)
    ffn_hidden: int = opt(0, "MLP hidden width; 0 = 4 * n_embd (gelu) or 8/3 * n_embd rounded up to 64 (swiglu)")
    n_kv_head: int = opt(0, "key/value heads (grouped-query attention); 0 = n_head")
    qkv_bias: bool = opt(False, "bias on the query/key/value projection even when --no-bias (Qwen2)")
    tie_embeddings: bool = opt(True, "share the token embedding with the output layer (GPT-2 does)")

    def __post_init__(self) -> None:
        _check_choice("model", self.kind, MODEL_KINDS)
        _check_choice("norm", self.norm, NORMS)
        _check_choice("positions", self.positions, POSITIONS)
        _check_choice("mlp", self.mlp, MLPS)
        for name in ("vocab_size", "block_size", "n_layer", "n_embd", "hidden_size", "n_head"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("ffn_hidden", "n_kv_head"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0 (0 = default), got {getattr(self, name)}")
        _check(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        _check(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        if self.kind == "gpt":
            _check(
                self.n_embd % self.n_head == 0,
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
            )
            _check(
                self.n_head % self.kv_heads == 0,
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})",
            )
            _check(
                self.positions != "rotary" or self.head_dim % 2 == 0,
                f"rotary positions need an even head size; n_embd / n_head = {self.head_dim}",
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is 0 (plain multi-head attention)."""
        return self.n_kv_head or self.n_head

    @property
    def ffn_size(self) -> int:
        """MLP hidden width. SwiGLU's default keeps the parameters of a 4x GELU MLP (Shazeer 2020)."""
        if self.ffn_hidden:
            return self.ffn_hidden
        return 4 * self.n_embd if self.mlp == "gelu" else -(-8 * self.n_embd // 3 // 64) * 64


LLAMA_STYLE: dict[str, Any] = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", bias=False, tie_embeddings=True)


# Presets by name. `small` is the demo's CPU model; `base` is the GPT-2 124M shape for GPUs.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(block_size=64, n_layer=2, n_head=2, n_embd=64, hidden_size=64),
    # Tuned on IMDb (8192-token BPE) on a shared 2-core CPU: for a 5-minute budget a narrow model
    # that sees more tokens beats a wider one that sees fewer (see docs/benchmarks.md#train).
    "small": dict(block_size=128, n_layer=3, n_head=4, n_embd=128, hidden_size=256),
    "base": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768, hidden_size=1024),
    # The Llama family's choices at a test size, with grouped-query attention (4 query heads, 2 kv).
    "llama-tiny": dict(block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, hidden_size=64, **LLAMA_STYLE),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """Build a ModelConfig from a preset name plus any field overrides."""
    _check_choice("preset", name, tuple(MODEL_PRESETS))
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Prepare
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareConfig:
    """Options of `aigc prepare`: reading, cleaning, de-duplication, redaction, split, tokenizer."""

    text_column: str = opt("text", "CSV/TSV/Parquet column (or JSONL field) holding the text")
    label_column: str | None = opt(None, "column (or JSONL field) holding a label; adds control tokens")
    doc_per_file: bool = opt(False, "treat each .txt file as one document instead of splitting on blank lines")
    skip_bad_lines: bool = opt(
        False, "skip malformed records (bad JSON lines, short CSV rows, missing labels) instead of stopping"
    )
    min_chars: int = opt(1, "drop documents shorter than this after cleaning")
    max_chars: int = opt(1_000_000, "drop documents longer than this after cleaning")
    dedup: bool = opt(True, "remove exact and near-duplicate documents")
    near_dup_threshold: float = opt(0.8, "MinHash Jaccard threshold for near-duplicates, in (0, 1]")
    redact: bool = opt(True, "replace e-mails, phones, card numbers and IPs with typed placeholders")
    val_fraction: float = opt(0.05, "share of documents held out for validation")
    test_fraction: float = opt(0.0, "share of documents held out for testing")
    seed: int = opt(1337, "seed for the split")
    vocab_size: int = opt(8192, "BPE vocabulary size, special tokens included")
    tokenizer: str | None = opt(
        None,
        "reuse a tokenizer instead of training one (for fine-tuning): a tokenizer.json, a run folder or a pulled "
        "model's name; control tokens for labels it lacks are appended",
    )
    overwrite: bool = opt(False, "replace an output folder that already holds a different dataset")

    def __post_init__(self) -> None:
        _check(self.min_chars >= 0, f"--min-chars must be >= 0, got {self.min_chars}")
        _check(
            self.max_chars >= max(self.min_chars, 1),
            f"--max-chars ({self.max_chars}) must be >= --min-chars ({self.min_chars}) and >= 1",
        )
        _check(
            0 < self.near_dup_threshold <= 1,
            f"--near-dup-threshold must be in (0, 1], got {self.near_dup_threshold}",
        )
        _check(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        _check(0 <= self.test_fraction < 1, f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        _check(
            self.val_fraction + self.test_fraction < 1,
            "--val-fraction plus --test-fraction must leave some documents for training",
        )
        _check(self.vocab_size >= 1, f"--vocab-size must be positive, got {self.vocab_size}")


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------

DTYPES = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")
WINDOWS = ("auto", "documents", "anywhere")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # every linear layer of a GPT block


@dataclass(frozen=True)
class TrainConfig:
    """Options of `aigc train`: optimisation, budget, precision, evaluation and checkpoints."""

    batch_size: int = opt(16, "sequences per micro-batch (per process)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    seq_len: int = opt(0, "tokens per training sequence (at most the model's context); 0 = the model's context")
    learning_rate: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = opt(100, "linear warm-up steps")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to biases, norms, embeddings)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 = off")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 = no step limit")
    max_tokens: int = opt(0, "stop after this many training tokens; 0 = no token limit")
    minutes: float = opt(0.0, "stop after this much wall-clock time; 0 = no time limit")
    eval_every: int = opt(100, "evaluate, log and checkpoint every N steps")
    eval_batches: int = opt(20, "validation batches per evaluation")
    save_every: int = opt(0, "also checkpoint every N steps; 0 = only at evaluations")
    sample_tokens: int = opt(48, "length of the sample printed per label at each evaluation; 0 = none")
    dtype: str = opt(
        "auto", "compute precision: auto (bf16 where the hardware is fast at it), fp32, bf16", choices=DTYPES
    )
    device: str = opt("auto", "device: auto picks cuda > mps > cpu", choices=DEVICES)
    compile: bool = opt(False, "compile the model with torch.compile")
    threads: int = opt(0, "CPU threads per process; 0 = auto: the cores other work leaves free at start (at least 1)")
    seed: int = opt(1337, "seed for initialisation and batch sampling")
    windows: str = opt(
        "auto",
        "where training windows start: documents (each window opens a document, so a labelled one starts "
        "with its control token), anywhere (random offsets, as in pretraining), auto (documents when the "
        "data has labels)",
        choices=WINDOWS,
    )
    freeze_embeddings: bool = opt(False, "when fine-tuning, keep token and position embeddings fixed")
    tensorboard: bool = opt(False, "also write TensorBoard event files (needs `tensorboard`)")
    lora_rank: int = opt(
        0, "with --init-from: train rank-R LoRA adapters on the frozen model instead of all weights; 0 = off"
    )
    lora_alpha: float = opt(16.0, "LoRA scale: the adapter update is multiplied by alpha / rank")
    lora_targets: tuple[str, ...] = opt(
        LORA_TARGETS,
        "linear layers that get LoRA adapters: names such as c_attn, c_proj, c_fc, attn.c_proj "
        "(comma-separated or repeated)",
    )
    lora_dropout: float = opt(0.0, "dropout on the LoRA adapters' input, in [0, 1)")
    label_lr_scale: float = opt(
        1.0,
        "under LoRA: the new label rows' (control tokens') learning rate as a multiple of --learning-rate; "
        "each window gives them one position's gradient",
    )

    def __post_init__(self) -> None:
        # `--lora-targets c_attn,c_proj` and repeated flags both end up as one tuple of names.
        targets = tuple(dict.fromkeys(n.strip() for t in self.lora_targets for n in t.split(",") if n.strip()))
        object.__setattr__(self, "lora_targets", targets)
        _check(self.lora_rank >= 0, f"--lora-rank must be >= 0 (0 = off), got {self.lora_rank}")
        _check(self.lora_alpha > 0, f"--lora-alpha must be > 0, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        _check(self.label_lr_scale > 0, f"--label-lr-scale must be > 0, got {self.label_lr_scale}")
        _check(bool(targets), "--lora-targets is empty; name at least one linear layer, e.g. c_attn")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("seq_len", "warmup_steps", "max_steps", "max_tokens", "save_every", "sample_tokens", "threads"):
            _check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        _check(self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}")
        _check(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(self.minutes >= 0, f"--minutes must be >= 0, got {self.minutes}")
        _check(self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")
        _check_choice("--dtype", self.dtype, DTYPES)
        _check_choice("--device", self.device, DEVICES)
        _check_choice("--windows", self.windows, WINDOWS)


# Training settings that suit each model preset, used where the user sets nothing else. `small`: on
# IMDb, batch 8 learned more per token than batch 32, and learning rate 4e-3 more than 1e-2.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(batch_size=16, learning_rate=3e-3, warmup_steps=20),
    "small": dict(batch_size=8, learning_rate=4e-3, warmup_steps=20),
    "base": dict(),
}


# Training settings for fine-tuning an imported (pretrained) model, where the user sets nothing else:
# LoRA rank 16 on every block layer, and short sequences in small batches, so that a CPU takes a step
# every few seconds instead of one 16 x 2048-token step in minutes.
FINETUNE_DEFAULTS: dict[str, Any] = dict(
    lora_rank=16,
    lora_alpha=32.0,
    batch_size=4,
    seq_len=128,
    learning_rate=1e-3,
    warmup_steps=10,
    eval_every=25,
    eval_batches=4,
    sample_tokens=32,
    # A cached probe (aigc.train.precision) picks bf16 only where it trains >= 1.2x faster: bf16 made
    # LoRA steps 3.8x slower on an AVX512-BF16 CPU without AMX, 1.9x faster with AMX (docs/benchmarks.md).
    dtype="auto",
    # The new label rows at 10x: at the adapters' rate they moved 0.3 of their norm of 2.4 in the demo's
    # 180 steps, and its samples from the control token alone were 62-66 % on-label; at 10x, 81 % (at 30x,
    # 69 %; 32 samples each, docs/demo.md).
    label_lr_scale=10.0,
)


def finetune_train_config(**overrides: Any) -> TrainConfig:
    """The TrainConfig of fine-tuning an imported model: FINETUNE_DEFAULTS plus any field overrides."""
    return TrainConfig(**{**FINETUNE_DEFAULTS, **overrides})


def train_preset(name: str, **overrides: Any) -> TrainConfig:
    """A TrainConfig with the preset's training settings plus any field overrides."""
    _check_choice("preset", name, tuple(TRAIN_PRESETS))
    return TrainConfig(**{**TRAIN_PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# Sampling (shared by generate, batch and serve)
# ---------------------------------------------------------------------------------------------

MAX_NEW_TOKENS_LIMIT = 8192
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MIN_TOP_P = 1e-6
MAX_REPETITION_PENALTY = 100.0
MAX_GUIDANCE_SCALE = 20.0
MAX_STOPS, MAX_STOP_CHARS = 16, 4096


@dataclass(frozen=True)
class SampleConfig:
    """How to pick each next token. `temperature 0` means greedy."""

    max_new_tokens: int = opt(200, f"most tokens to generate per sample (1..{MAX_NEW_TOKENS_LIMIT})")
    min_new_tokens: int = opt(0, "end-of-text is suppressed until this many tokens exist")
    temperature: float = opt(
        0.8, f"softmax temperature: 0 = greedy, else in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]"
    )
    top_k: int = opt(0, "keep only the k most likely tokens; 0 = off")
    top_p: float = opt(
        1.0, f"nucleus sampling: keep the smallest set with this total probability, in [{MIN_TOP_P:g}, 1]"
    )
    repetition_penalty: float = opt(
        1.0, f"divide logits of already-seen tokens by this, in [1, {MAX_REPETITION_PENALTY:g}]; 1 = off"
    )
    stop: tuple[str, ...] = opt(
        (),
        f"stop when any of these strings appears (repeatable; at most {MAX_STOPS}, {MAX_STOP_CHARS} characters in all)",
    )
    seed: int | None = opt(None, "random seed; the same seed gives the same text")
    logprobs: int = opt(0, "return the top-K alternatives and log-probabilities of each token (0..20)")
    guidance_scale: float = opt(
        1.0,
        f"classifier-free guidance against the negative prompt/label, in [1, {MAX_GUIDANCE_SCALE:g}]; 1 = off "
        "(each guided sample decodes a second row)",
    )

    def __post_init__(self) -> None:
        _check(
            1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
            f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}",
        )
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"--min-new-tokens must be in [0, max-new-tokens={self.max_new_tokens}], got {self.min_new_tokens}",
        )
        # Ranges keep every probability finite: logits / 1e-39 overflow float32 and 1e-46 rounds to 0.
        _check(
            self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE,
            f"--temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], "
            f"got {self.temperature}",
        )
        _check(self.top_k >= 0, f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        _check(
            MIN_TOP_P <= self.top_p <= 1,
            f"--top-p must be in [{MIN_TOP_P:g}, 1] (--temperature 0 for greedy), got {self.top_p}",
        )
        _check(
            1.0 <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"--repetition-penalty must be in [1, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}",
        )
        _check(0 <= self.logprobs <= 20, f"--logprobs must be in [0, 20], got {self.logprobs}")
        _check(
            1.0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE,
            f"--guidance-scale must be in [1, {MAX_GUIDANCE_SCALE:g}] (1 = off), got {self.guidance_scale}",
        )
        _check(all(self.stop), "--stop strings must not be empty")
        _check(len(self.stop) <= MAX_STOPS, f"--stop may be given at most {MAX_STOPS} times, got {len(self.stop)}")
        stop_chars = sum(len(s) for s in self.stop)
        _check(
            stop_chars <= MAX_STOP_CHARS,
            f"--stop strings may hold at most {MAX_STOP_CHARS} characters in all, got {stop_chars}",
        )


# ---------------------------------------------------------------------------------------------
# Serve
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeConfig:
    """Options of `aigc serve`: where to listen, who may call, and the limits that keep it responsive."""

    host: str = opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = opt(8000, "TCP port (0 = any free port)")
    api_key: str | None = opt(None, "require `Authorization: Bearer KEY` on /v1 routes; env AIGC_API_KEY also sets it")
    model_name: str | None = opt(None, "model id clients pass as `model`; none = the run folder's name")
    device: str = opt("auto", "device for the model: auto picks cuda > mps > cpu", choices=DEVICES)
    max_batch: int = opt(32, "most sequences decoded together in one batch (and per request: n x prompts)")
    max_queue: int = opt(256, "most sequences waiting for a batch; beyond it requests get 429")
    max_body_bytes: int = opt(262_144, "largest request body in bytes; larger gets 413")
    max_prompt_tokens: int = opt(2048, "longest prompt in tokens; longer gets 413")
    max_tokens_limit: int = opt(1024, f"largest `max_tokens` a request may ask for (1..{MAX_NEW_TOKENS_LIMIT})")
    allowed_hosts: tuple[str, ...] = opt(
        (),
        "without --api-key, Host names served besides loopback ones and --host (repeatable; '*' = any)",
        flag="allowed_host",
    )
    shutdown_timeout: float = opt(5.0, "seconds requests in flight may take to finish after Ctrl+C or SIGTERM")

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}")
        _check(bool(self.host), "--host must not be empty; use 127.0.0.1 for this machine only")
        _check(self.api_key is None or bool(self.api_key.strip()), "--api-key must not be blank")
        _check_choice("--device", self.device, DEVICES)
        for name in ("max_batch", "max_queue", "max_prompt_tokens"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        _check(self.max_body_bytes >= 1024, f"--max-body-bytes must be >= 1024, got {self.max_body_bytes}")
        _check(
            1 <= self.max_tokens_limit <= MAX_NEW_TOKENS_LIMIT,
            f"--max-tokens-limit must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_tokens_limit}",
        )
        _check(all(h.strip() for h in self.allowed_hosts), "--allowed-host must not be blank")
        _check(
            math.isfinite(self.shutdown_timeout) and 0 <= self.shutdown_timeout <= 3600,
            f"--shutdown-timeout must be in [0, 3600] seconds, got {self.shutdown_timeout}",
        )


# ---------------------------------------------------------------------------------------------
# Evaluate
# ---------------------------------------------------------------------------------------------

EVAL_SPLITS = ("val", "test")


@dataclass(frozen=True)
class EvalConfig:
    """Options of `aigc eval`: what is scored, how many samples, and how they are drawn."""

    split: str = opt("val", "held-out split that is scored and supplies the prompts", choices=EVAL_SPLITS)
    lm_docs: int = opt(64, "documents of the split scored for loss, perplexity, bits per byte; 0 = all")
    prompts: int = opt(64, "held-out documents whose opening is continued and scored against the real text")
    prompt_tokens: int = opt(32, "tokens of each held-out document given as the prompt")
    samples: int = opt(32, "samples generated per label (in total for an unlabelled run)")
    max_new_tokens: int = opt(128, f"most tokens per sample or continuation (1..{MAX_NEW_TOKENS_LIMIT})")
    min_span: int = opt(32, "a sample counts as memorised when this many tokens appear verbatim in the train split")
    classifier_docs: int = opt(10000, "train documents the control classifier learns from; 0 = all")
    batch_size: int = opt(32, "sequences generated or scored together")
    seed: int = opt(1337, "seed for the choice of prompts and for sampling (sample i uses seed + i)")
    device: str = opt("auto", "device: auto picks cuda > mps > cpu", choices=DEVICES)

    def __post_init__(self) -> None:
        _check_choice("--split", self.split, EVAL_SPLITS)
        _check_choice("--device", self.device, DEVICES)
        for name in ("samples", "prompt_tokens", "batch_size"):
            _check(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lm_docs", "prompts", "classifier_docs"):
            _check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        _check(
            1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT,
            f"--max-new-tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}",
        )
        _check(self.min_span >= 8, f"--min-span must be >= 8 (the memorisation index's n-gram), got {self.min_span}")


# ---------------------------------------------------------------------------------------------
# Serialisation helpers
# ---------------------------------------------------------------------------------------------


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a config dataclass from `to_dict` output, ignoring unknown keys from newer versions."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key in names:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)
