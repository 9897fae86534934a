"""Which Hugging Face tensor is which jaxllm parameter, and how its layout changes.

Covered architectures (``config.json`` ``model_type``):

- ``gpt2``: learned positions, LayerNorm, ``gelu_new`` MLP, fused ``c_attn`` (Conv1D,
  stored ``[in, out]``), biases everywhere, embeddings tied.
- ``llama``: RoPE (``rope_theta``; ``rope_scaling`` ``linear`` or ``llama3``),
  RMSNorm, SwiGLU, grouped-query attention, ``attention_bias`` (q/k/v/o) and
  ``mlp_bias``, tied or untied embeddings, explicit ``head_dim``.
- ``mistral``: Llama plus ``sliding_window`` (every layer local).
- ``qwen2``: Llama with q/k/v biases and no output-projection bias; sliding
  window when every layer uses it.

A jaxllm kernel is ``[inputs..., outputs...]`` (query ``[embed, heads, head_dim]``,
output projection ``[heads, head_dim, embed]``); a PyTorch ``nn.Linear`` weight is
``[out, in]`` and GPT-2's Conv1D ``[in, out]``. Each rule below is a pair of pure
numpy functions (to jaxllm, back to HF) over *views*, so importing reads only the
slice a device needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from jaxllm.config import ModelConfig


@dataclass(frozen=True)
class Rule:
    """One jaxllm parameter (of one layer): where it comes from in the HF checkpoint.

    Attributes:
      path: jaxllm path inside a layer (``attn/query/kernel``) or at the top level.
      hf: HF tensor name (``{i}`` is the layer index).
      to_jax: HF array view -> jaxllm layout (views only, no copies).
      part: for a fused HF tensor (GPT-2 ``c_attn``): which third (0, 1, 2), else None.
    """

    path: str
    hf: str
    to_jax: Callable[[np.ndarray], np.ndarray]
    part: int | None = None


def _linear(shape_in: tuple, shape_out: tuple):
    # nn.Linear [out, in] -> [in..., out...]
    return lambda w: w.T.reshape(*shape_in, *shape_out)


def _reshape(*shape: int):
    return lambda w: w.reshape(*shape)


def _identity(w):
    return w


def gpt2_rules(cfg: ModelConfig, prefix: str) -> tuple[list[Rule], list[Rule]]:
    """(top-level rules, per-layer rules) of a GPT-2 checkpoint; `prefix` is
    ``"transformer."`` or ``""`` (both spellings exist in the wild)."""
    d, h, hd, f = cfg.d_model, cfg.n_heads, cfg.dim_per_head, cfg.ff_dim
    top = [
        Rule("token_embed/embedding", f"{prefix}wte.weight", _identity),
        Rule("pos_embed/embedding", f"{prefix}wpe.weight", _identity),
        Rule("final_norm/scale", f"{prefix}ln_f.weight", _identity),
        Rule("final_norm/bias", f"{prefix}ln_f.bias", _identity),
    ]
    p = f"{prefix}h.{{i}}."
    layer = [
        Rule("attn_norm/scale", p + "ln_1.weight", _identity),
        Rule("attn_norm/bias", p + "ln_1.bias", _identity),
        Rule("mlp_norm/scale", p + "ln_2.weight", _identity),
        Rule("mlp_norm/bias", p + "ln_2.bias", _identity),
        Rule("attn/out/kernel", p + "attn.c_proj.weight", _reshape(h, hd, d)),
        Rule("attn/out/bias", p + "attn.c_proj.bias", _identity),
        Rule("mlp/fc/kernel", p + "mlp.c_fc.weight", _reshape(d, f)),
        Rule("mlp/fc/bias", p + "mlp.c_fc.bias", _identity),
        Rule("mlp/proj/kernel", p + "mlp.c_proj.weight", _reshape(f, d)),
        Rule("mlp/proj/bias", p + "mlp.c_proj.bias", _identity),
    ]
    for j, name in enumerate(("query", "key", "value")):
        cols = slice(j * d, (j + 1) * d)
        layer.append(
            Rule(
                f"attn/{name}/kernel",
                p + "attn.c_attn.weight",
                lambda w, c=cols: w[:, c].reshape(d, h, hd),
                part=j,
            )  # fmt: skip
        )
        layer.append(
            Rule(
                f"attn/{name}/bias",
                p + "attn.c_attn.bias",
                lambda b, c=cols: b[c].reshape(h, hd),
                part=j,
            )  # fmt: skip
        )
    return top, layer


def llama_rules(cfg: ModelConfig) -> tuple[list[Rule], list[Rule]]:
    """(top-level rules, per-layer rules) of a Llama / Mistral / Qwen2 checkpoint."""
    d, h, kvh, hd, f = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.ff_dim
    top = [
        Rule("token_embed/embedding", "model.embed_tokens.weight", _identity),
        Rule("final_norm/scale", "model.norm.weight", _identity),
    ]
    if not cfg.tied:
        top.append(Rule("lm_head/kernel", "lm_head.weight", lambda w: w.T))
    p = "model.layers.{i}."
    heads = {"query": ("q_proj", h), "key": ("k_proj", kvh), "value": ("v_proj", kvh)}
    layer = [
        Rule("attn_norm/scale", p + "input_layernorm.weight", _identity),
        Rule("mlp_norm/scale", p + "post_attention_layernorm.weight", _identity),
        Rule("attn/out/kernel", p + "self_attn.o_proj.weight", _linear((h, hd), (d,))),
        Rule("mlp/gate/kernel", p + "mlp.gate_proj.weight", _linear((d,), (f,))),
        Rule("mlp/up/kernel", p + "mlp.up_proj.weight", _linear((d,), (f,))),
        Rule("mlp/proj/kernel", p + "mlp.down_proj.weight", _linear((f,), (d,))),
    ]
    for name, (hf, n) in heads.items():
        layer.append(Rule(f"attn/{name}/kernel", p + f"self_attn.{hf}.weight",
                          _linear((d,), (n, hd))))  # fmt: skip
        if cfg.qkv_biased:
            layer.append(Rule(f"attn/{name}/bias", p + f"self_attn.{hf}.bias",
                              _reshape(n, hd)))  # fmt: skip
    if cfg.out_biased:
        layer.append(Rule("attn/out/bias", p + "self_attn.o_proj.bias", _identity))
    if cfg.bias:
        for ours, hf in (("gate", "gate_proj"), ("up", "up_proj"), ("proj", "down_proj")):
            layer.append(Rule(f"mlp/{ours}/bias", p + f"mlp.{hf}.bias", _identity))
    return top, layer


def to_hf_tensor(rule: Rule, value: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """The inverse of ``rule.to_jax`` for one (unfused) tensor: jaxllm -> HF layout."""
    path = rule.path
    if cfg.flavour == "gpt2":
        # Conv1D keeps [in, out]: flatten the head dims back.
        if path.endswith("kernel"):
            n_in = 2 if path == "attn/out/kernel" else 1
            return value.reshape(int(np.prod(value.shape[:n_in])), -1)
        return value.reshape(-1) if path.endswith("bias") else value
    if path.endswith("kernel"):
        n_in = 2 if path == "attn/out/kernel" else 1
        return value.reshape(int(np.prod(value.shape[:n_in])), -1).T
    if path.endswith("bias"):
        return value.reshape(-1)
    return value
