"""Parameter counts, training FLOPs per token, peak FLOP/s and MFU.

Notation: L layers, d = d_model, H query heads, K key/value heads, Q head
dimension, F feed-forward width, V vocabulary, T sequence length (context).

Parameters per layer (no biases shown)::

    attention  d*H*Q (q) + 2*d*K*Q (k, v) + H*Q*d (out)
    mlp        2*d*F (GPT-2: fc, proj)   or   3*d*F (LLaMA SwiGLU: gate, up, down)
    norms      2 norms: 2*d each (LayerNorm scale+bias) or d each (RMSNorm scale)

plus the token embedding V*d, learned positions max_len*d (GPT-2 only), a final
norm, and an LM head d*V when embeddings are untied.

Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per MAC)::

    flops/token = 6*N + attention
    attention   = 12*L*H*Q*T       non-causal: PaLM (Chowdhery et al. 2022, App. B),
                                   nanoGPT `estimate_mfu`
                = 6*L*H*Q*T        causal (DEFAULT): only the lower triangle of
                                   Q@K^T and P@V is needed, as counted by llm.c
                                   and by MaxText since 2024

N is the matmul parameter count: every parameter except the position
embeddings, with the vocabulary projection counted once (the tied
embedding-as-head, or the untied LM head; an untied input embedding is a
lookup, not a matmul). Norm scales and biases are kept in N as nanoGPT and
llm.c do; they are < 0.1% of it. ``train_flops_per_token(..., causal=True)`` is
the default so reported MFU is comparable with llm.c and MaxText; pass
``causal=False`` to compare with PaLM/nanoGPT figures. Sliding-window layers
are counted as global attention (an upper bound).

Peak FLOP/s come from vendor datasheets for accelerators and from a measured
matmul probe on CPU; MFU = tokens/s * flops/token / peak.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

# ----------------------------------------------------------------------------- parameters


def param_counts(model_cfg: ModelConfig) -> dict[str, int]:
    """Counts parameters from the config alone (no model is built).

    GPT-2 flavour: learned positions, LayerNorm (scale and bias), biases on the
    q/k/v, attention-out, fc and proj dense layers, tied embeddings. LLaMA
    flavour: RoPE (no position parameters), RMSNorm (scale only), SwiGLU with
    three d x F matrices, grouped-query attention with ``kv_heads`` key/value
    heads, untied head, no biases. ``tie_embeddings`` and ``use_bias`` override
    the flavour defaults for the head and the dense layers; norms always follow
    the flavour. The LM head never has a bias. A classification head
    (``num_classes`` > 0) is a d x C dense layer with a bias (always; see model.py)
    on top of everything else. ``qkv_bias``/``out_bias`` (Qwen2) split the
    attention biases from the MLP's.

    Args:
        model_cfg: the model config.

    Returns:
        A dict with ``total``, ``embedding`` (token table V*d), ``position_embedding``,
        ``lm_head`` (0 when tied), ``classifier``, ``per_layer``, ``non_embedding``
        (total minus embedding, position embedding and LM head; Kaplan et al. 2020)
        and ``matmul`` (N of the FLOPs formula).
    """
    m = model_cfg
    d, vocab, f = m.d_model, m.vocab_size, m.ff_dim
    h, k, q = m.n_heads, m.kv_heads, m.dim_per_head
    bias = m.bias
    gpt2 = m.flavour == "gpt2"

    norm = 2 * d if gpt2 else d  # LayerNorm scale+bias vs RMSNorm scale
    attn = d * h * q + 2 * d * k * q + h * q * d
    if m.qkv_biased:
        attn += h * q + 2 * k * q
    if m.out_biased:
        attn += d
    if gpt2:
        mlp = 2 * d * f + ((f + d) if bias else 0)
    else:
        mlp = 3 * d * f + ((2 * f + d) if bias else 0)
    per_layer = attn + mlp + 2 * norm

    embedding = vocab * d
    position = m.max_len * d if gpt2 else 0
    lm_head = 0 if m.tied else d * vocab
    classifier = (d + 1) * m.num_classes  # the head always has a bias
    total = embedding + position + m.n_layers * per_layer + norm + lm_head + classifier
    non_embedding = total - embedding - position - lm_head
    return {
        "total": total,
        "embedding": embedding,
        "position_embedding": position,
        "lm_head": lm_head,
        "classifier": classifier,
        "per_layer": per_layer,
        "non_embedding": non_embedding,
        # The vocabulary projection (V*d) once, whether tied or untied.
        "matmul": non_embedding + vocab * d,
    }


def train_flops_per_token(model_cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: ``6*N + attention`` (see the module docstring).

    Args:
        model_cfg: the model config.
        seq_len: tokens per sequence (T).
        causal: count causal attention as half the non-causal 12*L*H*Q*T
            (llm.c, MaxText; the default) or, if False, in full (PaLM, nanoGPT).

    Returns:
        FLOPs per trained token (forward and backward).
    """
    n = param_counts(model_cfg)["matmul"]
    m = model_cfg
    attention = 12.0 * m.n_layers * m.n_heads * m.dim_per_head * seq_len
    if causal:
        attention /= 2.0
    return 6.0 * n + attention


# ----------------------------------------------------------------------------- peak FLOP/s

# Dense (not 2:4-sparse) peak FLOP/s per JAX device. Sources: Google Cloud TPU
# system-architecture pages (v4, v5e, v5p, v6e, per chip = per JAX device) and
# NVIDIA datasheets (H100 SXM5 / PCIe, H200 SXM, A100 SXM4). NVIDIA headline
# tensor figures "with sparsity" are 2x these (H100 1979 T bf16 is the sparse
# figure). GPU "fp32" is the plain (non-tensor-core) FP32 rate. TPUs publish no
# fp32 rate: XLA runs f32 matmuls on the MXU as bf16 passes, so fp32 maps to bf16.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "TPU v4": {"bf16": 275e12},
    "TPU v5e": {"bf16": 197e12},
    "TPU v5p": {"bf16": 459e12},
    "TPU v6e": {"bf16": 918e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},  # H100 SXM5
    "H100 PCIe": {"bf16": 756e12, "fp32": 51e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},  # same compute die as H100 SXM
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
}

# `device.device_kind` substrings (lower case) -> PEAK_FLOPS key, most specific
# first: JAX calls v5e "TPU v5 lite", v5p "TPU v5" and v6e "TPU v6 lite".
_KIND_PATTERNS: tuple[tuple[str, str], ...] = (
    ("tpu v5 lite", "TPU v5e"),
    ("tpu v5e", "TPU v5e"),
    ("tpu v5p", "TPU v5p"),
    ("tpu v5", "TPU v5p"),
    ("tpu v6 lite", "TPU v6e"),
    ("tpu v6e", "TPU v6e"),
    ("tpu v4", "TPU v4"),
    ("h100 pcie", "H100 PCIe"),
    ("h100", "H100"),
    ("h200", "H200"),
    ("a100", "A100"),
)

_PROBE_SIZE = 2048
_PROBE_RUNS = 8
_probe_cache: dict[str, float] = {}


def _normalise_dtype(dtype: str) -> str:
    names = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}
    # fp16 tensor-core rates equal bf16 on A100/H100; TPUs have no fp16 path.
    names.update({"fp16": "bf16", "float16": "bf16"})
    if dtype not in names:
        raise ValueError(f"dtype must be 'fp32' or 'bf16' (or 'fp16'), got {dtype!r}")
    return names[dtype]


def table_peak(device_kind: str, dtype: str = "bf16") -> float | None:
    """Looks up the datasheet peak FLOP/s of one device.

    Args:
        device_kind: ``jax.Device.device_kind``, e.g. ``"TPU v5 lite"`` or
            ``"NVIDIA H100 80GB HBM3"``.
        dtype: ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        FLOP/s, or None when the kind is not in the table.
    """
    dtype = _normalise_dtype(dtype)
    kind = device_kind.lower()
    for pattern, key in _KIND_PATTERNS:
        if pattern in kind:
            entry = PEAK_FLOPS[key]
            return entry.get(dtype, entry["bf16"])
    return None


def _probe(device: Any, dtype: str) -> float:
    """Measures matmul FLOP/s on one device: the fastest of a few timed runs, compile excluded.

    The fastest run, not the median: a peak is what the hardware can do, and on a shared
    CPU other load only ever slows a run down (a median taken under load once gave an
    MFU above 100%).
    """
    jdtype = jnp.float32 if dtype == "fp32" else jnp.bfloat16
    n = _PROBE_SIZE
    a = jax.device_put(jnp.ones((n, n), jdtype), device)
    b = jax.device_put(jnp.full((n, n), 0.5, jdtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # compile and warm up; not timed
    times = []
    for _ in range(_PROBE_RUNS):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / min(times)


def _probe_key(device: Any, dtype: str) -> str:
    # The host name keeps a shared cache file from handing one machine's figure to another.
    return f"{platform.node()}|{device.platform}|{device.device_kind}|{dtype}"


def _read_cache(path: str | None) -> dict[str, float]:
    if not path or not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}  # a corrupt cache only costs a re-measurement


def _write_cache(path: str | None, key: str, value: float) -> None:
    if not path:
        return
    data = _read_cache(path)
    data[key] = value
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic, so concurrent processes never read half a file
    except OSError:
        pass  # the in-process cache still holds the figure


def measured_peak(device: Any, dtype: str = "fp32", cache_path: str | None = None) -> float:
    """Measured matmul FLOP/s of one device, probed once per process (and per cache file).

    Args:
        device: a ``jax.Device``.
        dtype: ``fp32`` or ``bf16`` (``fp16`` is probed as bf16).
        cache_path: optional JSON file shared across processes.

    Returns:
        FLOP/s of a jitted 2048x2048 matmul.
    """
    dtype = _normalise_dtype(dtype)
    key = _probe_key(device, dtype)
    if key not in _probe_cache:
        cached = _read_cache(cache_path).get(key)
        if cached is None:
            cached = _probe(device, dtype)
            _write_cache(cache_path, key, cached)
        _probe_cache[key] = cached
    return _probe_cache[key]


def peak_flops_per_second(
    devices: Sequence[Any] | None = None,
    dtype: str = "fp32",
    cache_path: str | None = None,
) -> float:
    """Peak FLOP/s of a whole set of devices, the denominator of MFU.

    Accelerators in :data:`PEAK_FLOPS` contribute their datasheet figure each;
    unknown accelerators contribute a measured probe each. CPU devices are
    measured with the matmul probe once per process and counted once per
    process, not per device: XLA's CPU devices in one process share one thread
    pool over the same cores (``--xla_force_host_platform_device_count=8``
    makes 8 views of 2 cores), and the probe on one device already uses all of
    them, so multiplying by the device count would overstate the peak 8x.
    Each process is taken to be its own host; several processes on one machine
    therefore overstate the CPU peak.

    Args:
        devices: the devices the step runs on; ``jax.devices()`` when None.
        dtype: ``fp32`` or ``bf16`` (``fp16`` uses the bf16 figures).
        cache_path: optional JSON file caching CPU probe results across processes.

    Returns:
        The total peak FLOP/s.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("peak_flops_per_second needs at least one device")
    total = 0.0
    cpu_processes: dict[int, Any] = {}
    for device in devices:
        if device.platform == "cpu":
            cpu_processes.setdefault(device.process_index, device)
            continue
        peak = table_peak(device.device_kind, dtype)
        total += peak if peak is not None else measured_peak(device, dtype, cache_path)
    if cpu_processes:
        # Only this process's devices can run the probe; other processes are assumed
        # to be identical hosts.
        local = [d for d in cpu_processes.values() if d.process_index == jax.process_index()]
        probe_device = local[0] if local else jax.local_devices(backend="cpu")[0]
        total += len(cpu_processes) * measured_peak(probe_device, dtype, cache_path)
    return total


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over peak FLOP/s.

    Args:
        tokens_per_sec: trained tokens per second (whole job).
        flops_per_token: from :func:`train_flops_per_token`.
        peak: from :func:`peak_flops_per_second` (same set of devices).

    Returns:
        A fraction (0.5 means 50%).
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak}")
    return tokens_per_sec * flops_per_token / peak
