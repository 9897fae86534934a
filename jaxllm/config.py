"""Typed experiment configuration: dataclasses, YAML files and `key=value` overrides.

A config is a tree of dataclasses. `load_config(path, overrides)` reads a YAML
file, applies dotted overrides (`optim.lr=3e-4`), checks every key and type, and
returns a frozen-in-spirit `Config`. Every mistake raises `UserError` with one
line naming the key, what was wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from jaxllm.config_robust import (
    AdversarialConfig,
    InputFilterConfig,
    PrivacyConfig,
    validate_robustness,
)
from jaxllm.errors import UserError

# Closed vocabulary of logical axis names (DESIGN.md). Rules may only name these.
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "layers")
MESH_AXES = ("data", "fsdp", "tensor")


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass(frozen=True)  # hashable: Flax modules and jit static args hold it
class ModelConfig:
    """Decoder Transformer shape and flavour."""

    flavour: str = field(default="gpt2", metadata=_choices("gpt2", "llama"))
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = same as n_heads (multi-head); fewer = grouped-query
    head_dim: int = 0  # 0 = d_model // n_heads
    d_ff: int = 0  # 0 = 4*d_model (gpt2) or the LLaMA 8/3 rule rounded to 64
    max_len: int = 512
    dropout: float = 0.0
    attention: str = field(default="global", metadata=_choices("global", "local", "alternating"))
    window: int = 128  # sliding-window size for local layers
    # Attention core in training/eval forwards: "dense" (jaxllm.attention_core: [T, T]
    # scores per device, in causal query blocks) or "ring" (jaxllm.ring_attention: the
    # sequence split over the mesh axis that mesh.rules.length names, K/V blocks passed
    # around that axis; decoding stays dense).
    attention_impl: str = field(default="dense", metadata=_choices("dense", "ring"))
    # Dense causal attention splits the queries into this many blocks and block i skips
    # the keys after it (all masked): (n + 1) / (2 n) of the score work. 1 = every score.
    causal_blocks: int = 4
    rope_theta: float = 10000.0
    # RoPE context extension (as Hugging Face `rope_scaling`): "linear" divides the
    # positions by rope_factor; "llama3" rescales the low frequencies (Llama 3.1).
    rope_scaling: str = field(default="none", metadata=_choices("none", "linear", "llama3"))
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the pre-extension context
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None  # None = flavour default (gpt2 tied, llama untied)
    use_bias: bool | None = None  # None = flavour default (gpt2 yes, llama no)
    # Attention biases apart from the MLP's (None = use_bias): Qwen2 has q/k/v biases
    # and none on the output projection; Llama's attention_bias sets both.
    qkv_bias: bool | None = None
    out_bias: bool | None = None
    scan_layers: bool = False
    remat: str = field(default="none", metadata=_choices("none", "full", "save_dots"))
    num_classes: int = 0  # >0 adds a classification head (classify task)
    # classify: the head reads the last real token (EOS, as GPT2ForSequenceClassification)
    # or the mean over the example's tokens.
    pooling: str = field(default="last", metadata=_choices("last", "mean"))
    # Quantised dense layers (attention and MLP; embeddings, norms and heads stay float):
    # "fake" rounds in the forward pass with straight-through gradients (QAT), "int"
    # holds integer kernels with float32 scales (a compressed, served model).
    quant: str = field(default="none", metadata=_choices("none", "fake", "int"))
    quant_weight_bits: int = 8  # 8, or 4 (int4 weight-only, stored in int8)
    # Activations: int8 per token (dynamic), int8 per tensor with a calibrated static
    # scale per layer, or left in float (weight-only).
    quant_act: str = field(
        default="dynamic_per_token",
        metadata=_choices("dynamic_per_token", "static_per_tensor", "none"),
    )
    quant_group_size: int = 0  # >0: one weight scale per group of inputs (weight-only)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        if self.flavour == "gpt2":
            return 4 * self.d_model
        # LLaMA: 2/3 of 4*d, rounded up to a multiple of 64 (Touvron et al. 2023).
        return 64 * -(-int(8 * self.d_model / 3) // 64)

    @property
    def tied(self) -> bool:
        return self.flavour == "gpt2" if self.tie_embeddings is None else self.tie_embeddings

    @property
    def bias(self) -> bool:
        return self.flavour == "gpt2" if self.use_bias is None else self.use_bias

    @property
    def qkv_biased(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def out_biased(self) -> bool:
        return self.bias if self.out_bias is None else self.out_bias


@dataclass
class TrainConfig:
    """Loop length, batch, logging and checkpoint cadence."""

    steps: int = 200
    batch_size: int = 16  # global batch, in sequences
    grad_accum: int = 1  # micro-batches per step (batch_size must divide by it)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # 0 = only at the end
    eval_batches: int = 8
    checkpoint_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    z_loss: float = 0.0
    label_smoothing: float = 0.0  # 0..1: mass spread uniformly over the other classes/tokens
    # classify: "none", "balanced" (n / (C * count_c) from the train split, as sklearn) or a
    # list of one weight per class.
    class_weights: str | list[float] = "none"
    focal_gamma: float = 0.0  # classify: focal loss (Lin et al. 2017) exponent; 0 = off
    max_nonfinite_steps: int = 20  # stop after this many NaN/Inf steps in a row
    # Token losses: "plain" (the model's full logits, jit-partitioned) or "vocab_parallel"
    # (jaxllm.vocab_parallel: head + loss in one shard_map over the vocab axis, so only
    # [tokens, vocab / tensor] logits exist per device; needs a vocab mesh axis > 1).
    loss_impl: str = field(default="plain", metadata=_choices("plain", "vocab_parallel"))
    preflight_disk: bool = True  # refuse to start if the disk cannot hold two checkpoints
    # TensorBoard: weight histograms, per-kernel sparsity and quantisation-scale ranges
    # every N steps (and at the last step); 0 = off (each one copies the params to host).
    histogram_every: int = 0
    profile_start: int = 2  # first step of the jax.profiler trace (after the compile)
    profile_steps: int = 0  # steps traced into WORKDIR/profile/; 0 = no trace


@dataclass
class OptimConfig:
    """Optimizer, schedule, clipping and weight decay."""

    name: str = field(default="adamw", metadata=_choices("adamw", "adafactor", "sgd", "lion"))
    lr: float = 1e-3
    schedule: str = field(
        default="warmup_cosine",
        metadata=_choices("warmup_cosine", "warmup_linear", "constant", "piecewise", "rsqrt"),
    )
    warmup_steps: int = 20
    decay_steps: int = 0  # 0 = train.steps
    min_lr_ratio: float = 0.1
    boundaries: list[int] = field(default_factory=list)  # piecewise: steps where lr changes
    factors: list[float] = field(default_factory=list)  # piecewise: multiplier at each boundary
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.9
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 = no clipping


@dataclass
class MeshConfig:
    """Device mesh sizes (-1 = the rest) and the logical-to-mesh rules table."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # logical axis -> mesh axis, list of mesh axes, or null (replicated).
    rules: dict[str, Any] = field(
        default_factory=lambda: {
            "batch": ["data", "fsdp"],
            "embed": "fsdp",
            "mlp": "tensor",
            "heads": "tensor",
            "vocab": "tensor",
            "kv": None,
            "length": None,
            "layers": None,
        }
    )


@dataclass
class AugmentConfig:
    """Train-split text noise (`jaxllm.data.augment`); 0 everywhere = off.

    `prob` is the chance that an example is augmented at all; the other rates are
    per character (char_*) or per word (word_*, synonym) within an augmented example.
    """

    prob: float = 0.0
    char_delete: float = 0.0
    char_insert: float = 0.0
    char_swap: float = 0.0
    word_dropout: float = 0.0
    word_swap: float = 0.0
    synonym: float = 0.0
    back_translate: float = 0.0  # translate: share of sources replaced by a reverse model
    seed: int = 0


@dataclass
class DataConfig:
    """Where text comes from and how it becomes token windows."""

    source: str = "embedded:pydocs"
    seq_len: int = 128
    data_dir: str = ""  # "" = $JAXLLM_DATA_DIR or ~/.cache/jaxllm
    tokenizer: str = ""  # "" = train a SentencePiece model on the corpus and cache it
    train_split: str = "train"
    eval_split: str = "validation"
    # Canonical field -> dataset field, e.g. {text: sentence, label: label} for tfds:glue/sst2
    # or {source: en, target: de} for a translation set. Empty = the source's defaults.
    fields: dict[str, Any] = field(default_factory=dict)
    # False: lm cuts the token stream into fixed windows; other tasks put one example
    # per row. True: examples are first-fit packed into rows with segment ids.
    pack: bool = False
    length_policy: str = field(default="truncate", metadata=_choices("truncate", "drop", "split"))
    max_source_len: int = 0  # prefix incl. separator; classify: text (0 = fit seq_len)
    max_target_len: int = 0  # target incl. EOS; lm: document (0 = fit seq_len)
    history_turns: int = 3  # dialogue: last N turns of history in the prefix (0 = all)
    tokenizer_type: str = field(default="bpe", metadata=_choices("bpe", "unigram"))
    user_symbols: list[str] = field(default_factory=lambda: ["<sep>", "<turn>"])
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class DistributedConfig:
    """Explicit multi-process settings (CPU/GPU); Cloud TPU needs none of these."""

    coordinator: str = ""  # host:port; "" = single process (or TPU auto-detect)
    num_processes: int = 1
    process_id: int = 0
    cpu_collectives: str = field(default="gloo", metadata=_choices("gloo", "mpi"))


@dataclass
class LossScaleConfig:
    """Dynamic loss scaling, used only with precision=fp16."""

    initial: float = 2.0**15
    growth_interval: int = 200
    factor: float = 2.0


@dataclass
class EvalConfig:
    """How `jaxllm eval` (and the final eval of a run) scores the task.

    Sequence-to-sequence tasks (translate, dialogue) decode the eval sources and score
    the detokenised output with BLEU, chrF, ROUGE and exact match.
    """

    strategy: str = field(default="greedy", metadata=_choices("greedy", "beam"))
    beam_size: int = 4
    length_penalty: float = 0.6
    max_new_tokens: int = 0  # 0 = data.max_target_len, else data.seq_len // 2
    max_examples: int = 0  # decoded examples (0 = the whole split)
    batch_size: int = 0  # rows decoded at once (0 = train.batch_size)
    # The metric `eval --compare` tests; "" = the task's default (lm: perplexity,
    # classify: accuracy, translate: bleu, dialogue: rouge_l).
    main_metric: str = ""
    bootstrap_samples: int = 1000
    seed: int = 0
    # >0: also score the eval split with character noise (delete, insert and swap each
    # at this rate per character, every example, seeded by eval.seed): noisy_* metrics.
    char_noise: float = 0.0


@dataclass
class FinetuneConfig:
    """Which parameters train (`jaxllm.finetune`): all, all but a frozen set, or LoRA.

    Regexes are searched (`re.search`) in "/"-joined parameter paths such as
    `layer_0/attn/query/kernel`, `layers/mlp/fc_in/kernel` (scanned) or `cls_head/bias`.
    """

    mode: str = field(default="full", metadata=_choices("full", "frozen", "lora"))
    freeze: str = ""  # frozen: parameters that get no updates (and no optimizer state)
    trainable: str = "cls_head"  # lora: base parameters that still train (a new head)
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapter's output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # training only; see jaxllm.lora.merge
    lora_targets: str = r"attn/(query|key|value|out)/kernel"  # matrices that get adapters


@dataclass
class Config:
    """A whole experiment."""

    task: str = field(default="lm", metadata=_choices("lm", "classify", "translate", "dialogue"))
    precision: str = field(default="fp32", metadata=_choices("fp32", "bf16", "fp16"))
    init_from: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    loss_scale: LossScaleConfig = field(default_factory=LossScaleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    input_filter: InputFilterConfig = field(default_factory=InputFilterConfig)


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# Which Python values a scalar field accepts (bool is an int subclass: excluded on purpose).
_SCALARS = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against type `tp`; converts ints to floats where a float is wanted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except UserError:
                continue
        raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list | tuple):
            (item_tp,) = typing.get_args(tp)
            return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is float and isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string
    elif tp in _SCALARS and _SCALARS[tp](value):
        return float(value) if tp is float else value
    raise UserError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(valid)}"
    return UserError(f"unknown config key {key!r}; {hint}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    for key in data:
        if key not in fields:
            raise _unknown_key(prefix + str(key), list(fields))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp, key, value = hints[name], prefix + name, data[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key + ".")
            continue
        value = _coerce(key, value, tp)
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            raise UserError(
                f"config key '{key}' is {value!r}; allowed values: {', '.join(allowed)}"
            )
        kwargs[name] = value
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Splits `a.b=value`; the value is read as YAML (so `1e-3`, `true`, `[1,2]` work)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value (example: optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _check_override_key(dotted: str) -> None:
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise UserError(f"config key '{'.'.join(parts[:i])}' has no sub-key {part!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise _unknown_key(".".join(parts[: i + 1]), names)
        hint = typing.get_type_hints(cls)[part]
        if typing.get_origin(hint) is dict:  # free-form mapping (mesh.rules): stop checking
            return
        cls = hint


def _read_yaml(path: str) -> dict:
    if not os.path.exists(path):
        raise UserError(f"config file '{path}' not found; pass a path such as configs/lm_tiny.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"config file '{path}' is not valid YAML ({first}); fix its syntax") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level")
    return data


def _validate_data(d: DataConfig) -> None:
    for key in ("max_source_len", "max_target_len", "history_turns"):
        if getattr(d, key) < 0:
            raise UserError(f"config key 'data.{key}' must be >= 0, got {getattr(d, key)}")
    for f in dataclasses.fields(AugmentConfig):
        value = getattr(d.augment, f.name)
        if f.name != "seed" and not 0.0 <= value <= 1.0:
            raise UserError(f"config key 'data.augment.{f.name}' must be in [0, 1], got {value}")
    for sym in d.user_symbols:
        if not sym or sym != sym.strip():
            raise UserError(
                f"data.user_symbols entry {sym!r} must be a non-empty token without "
                "surrounding whitespace, e.g. <sep>"
            )
    if len(set(d.user_symbols)) != len(d.user_symbols):
        raise UserError(f"data.user_symbols has duplicates: {d.user_symbols}; list each once")


def _validate_task(cfg: Config) -> None:
    t, m = cfg.train, cfg.model
    if not 0.0 <= t.label_smoothing < 1.0:
        raise UserError(f"train.label_smoothing must be in [0, 1), got {t.label_smoothing}")
    if t.focal_gamma < 0:
        raise UserError(f"train.focal_gamma must be >= 0, got {t.focal_gamma}")
    for key in ("histogram_every", "profile_start", "profile_steps"):
        if getattr(t, key) < 0:
            raise UserError(f"config key 'train.{key}' must be >= 0, got {getattr(t, key)}")
    weights = t.class_weights
    if isinstance(weights, str) and weights not in ("none", "balanced"):
        raise UserError(
            f"train.class_weights is {weights!r}; use none, balanced or a list of one "
            "weight per class"
        )
    if cfg.task == "classify" and t.loss_impl != "plain":
        raise UserError(
            f"train.loss_impl={t.loss_impl} applies to token losses (lm, translate, "
            "dialogue), not task=classify; use train.loss_impl=plain"
        )
    if cfg.task == "classify":
        if m.num_classes <= 0:
            raise UserError(
                "task=classify needs model.num_classes > 0 (the number of labels), "
                "e.g. model.num_classes=2"
            )
        if isinstance(weights, list) and (
            len(weights) != m.num_classes or any(w < 0 for w in weights)
        ):
            raise UserError(
                f"train.class_weights has {len(weights)} entries; give {m.num_classes} "
                "non-negative weights (one per class) or use balanced"
            )
    elif m.num_classes:
        raise UserError(
            f"model.num_classes={m.num_classes} adds a classification head, but task="
            f"{cfg.task}; set task=classify or model.num_classes=0"
        )
    elif weights != "none" or t.focal_gamma:
        raise UserError(
            "train.class_weights and train.focal_gamma apply to task=classify only; "
            "remove them or set task=classify"
        )
    e = cfg.eval
    for key in ("beam_size", "bootstrap_samples"):
        if getattr(e, key) <= 0:
            raise UserError(f"config key 'eval.{key}' must be > 0, got {getattr(e, key)}")
    for key in ("max_new_tokens", "max_examples", "batch_size"):
        if getattr(e, key) < 0:
            raise UserError(f"config key 'eval.{key}' must be >= 0, got {getattr(e, key)}")


def _validate_finetune(f: FinetuneConfig) -> None:
    # Whether a regex matches any parameter is checked when the model is built
    # (jaxllm.finetune.param_labels): the paths are not known here.
    for key in ("freeze", "trainable", "lora_targets"):
        try:
            re.compile(getattr(f, key))
        except re.error as e:
            raise UserError(
                f"config key 'finetune.{key}' is not a valid regex ({e}): {getattr(f, key)!r}"
            ) from e
    if f.mode == "frozen" and not f.freeze:
        raise UserError(
            "finetune.mode=frozen needs finetune.freeze, a regex of parameter paths, "
            "e.g. finetune.freeze='token_embed|layer_0/'"
        )
    if f.lora_rank < 1:
        raise UserError(f"finetune.lora_rank must be >= 1, got {f.lora_rank}")
    if f.lora_alpha <= 0:
        raise UserError(f"finetune.lora_alpha must be > 0, got {f.lora_alpha}")
    if not 0.0 <= f.lora_dropout < 1.0:
        raise UserError(f"finetune.lora_dropout must be in [0, 1), got {f.lora_dropout}")
    if f.mode == "lora" and not f.lora_targets:
        raise UserError(
            "finetune.mode=lora needs finetune.lora_targets, a regex of the matrices to "
            "adapt, e.g. 'attn/(query|value)/kernel'"
        )


def _validate_quant(m: ModelConfig) -> None:
    if m.causal_blocks < 1:
        raise UserError(
            f"model.causal_blocks must be >= 1 (1 = no skipping), got {m.causal_blocks}"
        )
    if not 2 <= m.quant_weight_bits <= 8:
        raise UserError(f"model.quant_weight_bits must be in 2..8, got {m.quant_weight_bits}")
    if m.quant_group_size < 0:
        raise UserError(f"model.quant_group_size must be >= 0, got {m.quant_group_size}")
    if m.quant_group_size and m.quant_act != "none":
        raise UserError(
            "model.quant_group_size needs model.quant_act=none: group-wise weight scales "
            "vary along the contraction, so only weight-only quantisation can use them"
        )


# A whole table: a dotted override (mesh.rules.length=fsdp) replaces the table, not a key.
_RING_RULES = "{batch: data, length: fsdp, mlp: tensor, heads: tensor, vocab: tensor}"


def _validate_ring(cfg: Config) -> None:
    """model.attention_impl=ring needs a sequence axis: mesh.rules.length names one mesh axis.

    jaxllm borrows an existing mesh axis for the sequence rather than adding a fourth;
    it must not also split the batch or the heads (Flax gives a mesh axis to the first
    logical axis that claims it, which would leave the sequence unsplit).
    """
    if cfg.model.attention_impl != "ring":
        return
    if cfg.privacy.dp:
        raise UserError(
            "model.attention_impl=ring does not combine with privacy.dp (per-example "
            "gradients vmap the model); use model.attention_impl=dense"
        )
    rules = cfg.mesh.rules
    ring = rules.get("length")
    if not isinstance(ring, str):
        raise UserError(
            f"model.attention_impl=ring needs mesh.rules.length to name one mesh axis "
            f"(got {ring!r}), e.g. mesh.rules='{_RING_RULES}'"
        )
    for other in ("batch", "heads"):
        target = rules.get(other)
        if ring == target or (isinstance(target, list) and ring in target):
            raise UserError(
                f"mesh.rules.length={ring} is also used by mesh.rules.{other}={target}; "
                f"ring attention needs its own axis, e.g. mesh.rules='{_RING_RULES}'"
            )


def validate(cfg: Config) -> Config:
    """Cross-field checks that single-key types cannot express."""
    m, t = cfg.model, cfg.train
    positive = {
        "model.vocab_size": m.vocab_size,
        "model.d_model": m.d_model,
        "model.n_layers": m.n_layers,
        "model.n_heads": m.n_heads,
        "model.max_len": m.max_len,
        "train.steps": t.steps,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.log_every": t.log_every,
        "data.seq_len": cfg.data.seq_len,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"config key '{key}' must be > 0, got {value}")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        raise UserError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; "
            "change one of them or set model.head_dim"
        )
    if m.n_heads % m.kv_heads:
        raise UserError(
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.kv_heads}; "
            "grouped-query attention needs n_heads to be a multiple of n_kv_heads"
        )
    if m.flavour == "llama" and m.dim_per_head % 2:
        raise UserError(f"RoPE needs an even head dimension, got {m.dim_per_head}")
    if cfg.data.seq_len > m.max_len:
        raise UserError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_len={m.max_len}; "
            "raise model.max_len or lower data.seq_len"
        )
    _validate_quant(m)
    _validate_finetune(cfg.finetune)
    if not 0.0 <= m.dropout < 1.0:
        raise UserError(f"model.dropout must be in [0, 1), got {m.dropout}")
    if t.batch_size % t.grad_accum:
        raise UserError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    _validate_data(cfg.data)
    _validate_task(cfg)
    validate_robustness(cfg)
    if len(cfg.optim.boundaries) != len(cfg.optim.factors):
        raise UserError("optim.boundaries and optim.factors must have the same length")
    _validate_ring(cfg)
    for logical, target in cfg.mesh.rules.items():
        if logical not in LOGICAL_AXES:
            raise _unknown_key(f"mesh.rules.{logical}", list(LOGICAL_AXES))
        targets = target if isinstance(target, list) else [target]
        for axis in targets:
            if axis is not None and axis not in MESH_AXES:
                raise UserError(
                    f"mesh.rules.{logical} names mesh axis '{axis}'; "
                    f"allowed: {', '.join(MESH_AXES)} or null"
                )
    return cfg


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds a validated Config from a nested dict plus dotted overrides."""
    data = dict(data)
    for text in overrides:
        key, value = parse_override(text)
        _check_override_key(key)
        _set_dotted(data, key, value)
    return validate(_build(Config, data))


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML config (or defaults when `path` is None) and applies overrides."""
    return from_dict(_read_yaml(path) if path else {}, overrides)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    """Writes the fully resolved config (every key, defaults included) as YAML."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
