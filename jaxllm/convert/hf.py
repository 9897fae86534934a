"""Hugging Face checkpoints <-> jaxllm workdirs (``jaxllm convert``).

``hf-to-jaxllm SRC DST``: SRC is a Hugging Face folder (``config.json``,
``model.safetensors`` or a sharded index, ``tokenizer.json`` or ``tokenizer.model``);
DST becomes a workdir every jaxllm command accepts (``config.yaml``, the
checkpoint's own tokenizer, a parameters-only checkpoint): ``jaxllm eval``,
``jaxllm generate`` and ``init_from: DST`` in a fine-tuning config.

Each parameter is created directly on the mesh with
``jax.make_array_from_callback``: every process reads, from the memory-mapped
safetensors, only the slices its own devices hold, so no host needs the whole
checkpoint in memory (see :mod:`jaxllm.convert.safetensors_io`).

``jaxllm-to-hf SRC DST`` writes ``config.json``, ``model.safetensors`` and the
tokenizer files, loadable by ``transformers`` ``AutoModelForCausalLM``.
Architectures covered: see :mod:`jaxllm.convert.hf_layout`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jaxllm.config import from_dict, save_config
from jaxllm.convert import hf_layout
from jaxllm.convert.safetensors_io import SINGLE, SafetensorsReader, write_safetensors
from jaxllm.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2")
# The HF config.json kept beside an imported model: export restores its model_type
# and the fields jaxllm does not model (token ids, architectures).
HF_CONFIG_COPY = "hf_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"'{path}' not found; give a Hugging Face checkpoint folder")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"'{path}' is not valid JSON ({e})") from e


def _rope(hf: dict) -> dict:
    """RoPE settings from a v5 ``rope_parameters`` or a v4 ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        return out
    if kind not in ("linear", "llama3"):
        raise UserError(
            f"rope scaling '{kind}' is not supported; jaxllm converts none, linear and llama3"
        )
    out.update(rope_scaling=kind, rope_factor=float(params["factor"]))
    if kind == "llama3":
        out.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_len=int(params["original_max_position_embeddings"]),
        )
    return out


def _window(hf: dict, kind: str) -> dict:
    if kind == "mistral" and hf.get("sliding_window"):
        return {"attention": "local", "window": int(hf["sliding_window"])}
    if kind == "qwen2" and hf.get("use_sliding_window"):
        types = set(hf.get("layer_types") or [])
        if types == {"sliding_attention"}:
            return {"attention": "local", "window": int(hf["sliding_window"])}
        raise UserError(
            "this Qwen2 checkpoint mixes sliding-window and full layers (max_window_layers); "
            "jaxllm converts Qwen2 with every layer full or every layer sliding"
        )
    return {}


def model_config_from_hf(hf: dict) -> dict:
    """jaxllm ``model`` config keys for a Hugging Face ``config.json`` dict.

    Raises:
      UserError: For an architecture or option jaxllm does not reproduce exactly, or
        a config.json missing a required field.
    """
    try:
        return _model_config(hf)
    except KeyError as e:
        raise UserError(
            f"config.json of model_type '{hf.get('model_type')}' lacks {e}; is it complete?"
        ) from None


def _model_config(hf: dict) -> dict:
    kind = hf.get("model_type", "")
    if kind not in SUPPORTED:
        raise UserError(
            f"model_type '{kind}' is not supported; jaxllm converts {', '.join(SUPPORTED)}"
        )
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UserError(f"GPT-2 activation '{act}' is not supported (only gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise UserError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        d = int(hf["n_embd"])
        return {
            "flavour": "gpt2",
            "vocab_size": int(hf["vocab_size"]),
            "d_model": d,
            "n_layers": int(hf["n_layer"]),
            "n_heads": int(hf["n_head"]),
            "d_ff": int(hf.get("n_inner") or 4 * d),
            "max_len": int(hf["n_positions"]),
            "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
            "use_bias": True,
        }
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{kind} hidden_act '{hf['hidden_act']}' is not supported (only silu)")
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    attention_bias = bool(hf.get("attention_bias", False))
    out = {
        "flavour": "llama",
        "vocab_size": int(hf["vocab_size"]),
        "d_model": d,
        "n_layers": int(hf["num_hidden_layers"]),
        "n_heads": heads,
        "n_kv_heads": int(hf.get("num_key_value_heads") or heads),
        "head_dim": int(hf.get("head_dim") or d // heads),
        "d_ff": int(hf["intermediate_size"]),
        "max_len": int(hf.get("max_position_embeddings", 2048)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "use_bias": bool(hf.get("mlp_bias", False)),
        "qkv_bias": True if kind == "qwen2" else attention_bias,
        "out_bias": False if kind == "qwen2" else attention_bias,
        **_rope(hf),
        **_window(hf, kind),
    }
    return out


def hf_config_from_model(m: Any, base: dict | None = None) -> dict:
    """A Hugging Face ``config.json`` dict for jaxllm model config `m`.

    Args:
      m: a ``ModelConfig``.
      base: the imported model's original config (kept fields: token ids,
        architectures), or None for a model trained in jaxllm.

    Raises:
      UserError: For a model with no covered HF equivalent (classifier, alternating
        attention, or a bias layout none of the covered families has).
    """
    if m.num_classes:
        raise UserError("jaxllm-to-hf exports causal LMs; this workdir is a classifier")
    if m.quant != "none":
        raise UserError("jaxllm-to-hf exports float models; export the stage before ptq/qat")
    if m.attention == "alternating":
        raise UserError("alternating local/global attention has no covered HF equivalent")
    out = dict(base or {})
    for k in ("rope_scaling", "rope_parameters", "_name_or_path", "transformers_version"):
        out.pop(k, None)
    common = {"vocab_size": m.vocab_size, "tie_word_embeddings": m.tied, "dtype": "float32"}
    if m.flavour == "gpt2":
        if not (m.bias and m.qkv_biased and m.out_biased) or m.attention != "global":
            raise UserError("GPT-2 export needs biases on every layer and global attention")
        out.update(
            model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=m.d_model,
            n_layer=m.n_layers, n_head=m.n_heads, n_inner=m.ff_dim, n_positions=m.max_len,
            layer_norm_epsilon=m.norm_eps, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common,
        )  # fmt: skip
        return out
    if m.qkv_biased and not m.out_biased and not m.bias:
        kind, arch = "qwen2", "Qwen2ForCausalLM"
    elif m.attention == "local":
        kind, arch = "mistral", "MistralForCausalLM"
        if m.qkv_biased or m.out_biased or m.bias:
            raise UserError("a sliding-window model with biases has no covered HF equivalent")
    elif m.qkv_biased == m.out_biased:
        kind, arch = "llama", "LlamaForCausalLM"
    else:
        raise UserError("this attention-bias layout has no covered HF equivalent")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling != "none":
        rope.update(rope_type=m.rope_scaling, factor=m.rope_factor)
    if m.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
            original_max_position_embeddings=m.rope_original_max_len,
        )  # fmt: skip
    out.update(
        model_type=kind, architectures=[arch], hidden_size=m.d_model,
        intermediate_size=m.ff_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads,
        head_dim=m.dim_per_head, max_position_embeddings=m.max_len, rms_norm_eps=m.norm_eps,
        hidden_act="silu", rope_theta=m.rope_theta, rope_parameters=rope,
        attention_dropout=0.0, **common,
    )  # fmt: skip
    if kind == "llama":
        out.update(attention_bias=m.qkv_biased, mlp_bias=m.bias)
    if kind == "mistral":
        out["sliding_window"] = m.window if m.attention == "local" else None
    if kind == "qwen2":
        local = m.attention == "local"
        out.update(use_sliding_window=local, sliding_window=m.window if local else None)
        out["layer_types"] = ["sliding_attention" if local else "full_attention"] * m.n_layers
        out["max_window_layers"] = m.n_layers
    return out


def _rules(m: Any, reader: SafetensorsReader | None = None):
    if m.flavour == "gpt2":
        prefix = "transformer." if reader is None or "transformer.wte.weight" in reader else ""
        top, layer = hf_layout.gpt2_rules(m, prefix)
        if not m.tied:
            top.append(hf_layout.Rule("lm_head/kernel", "lm_head.weight", lambda w: w.T))
        return top, layer
    return hf_layout.llama_rules(m)


class _Stacked:
    """Layer views stacked on a leading axis without reading them (scanned models)."""

    def __init__(self, views: list):
        self.views = views
        self.shape = (len(views), *views[0].shape)

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = index[0], index[1:]
        picked = self.views[first] if isinstance(first, slice) else [self.views[first]]
        return np.stack([np.asarray(v[rest]) for v in picked])


def _sources(m: Any, reader: SafetensorsReader) -> dict[str, Any]:
    """jaxllm parameter path -> a lazily indexable view of its HF tensor(s)."""
    top, layer = _rules(m, reader)
    out = {r.path: r.to_jax(reader.view(r.hf)) for r in top}
    per_layer = {
        r.path: [r.to_jax(reader.view(r.hf.format(i=i))) for i in range(m.n_layers)] for r in layer
    }
    if m.scan_layers:
        out.update({f"layers/{p}": _Stacked(v) for p, v in per_layer.items()})
    else:
        for p, views in per_layer.items():
            out.update({f"layer_{i}/{p}": v for i, v in enumerate(views)})
    return out


def abstract_params(cfg: Any, mesh: Any) -> Any:
    """Shapes, dtypes and shardings of `cfg`'s parameters on `mesh` (nothing allocated)."""
    from jaxllm import sharding
    from jaxllm.model import build_model
    from jaxllm.precision import get_policy
    from jaxllm.step import init_params, strip_boxes

    model = build_model(cfg.model, get_policy(cfg.precision))
    rules = sharding.logical_rules(cfg.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(lambda: init_params(model, cfg, jax.random.PRNGKey(0)))
        shardings = sharding.tree_shardings(boxed, mesh, rules)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        strip_boxes(boxed),
        shardings,
    )


def load_hf_params(folder: str, cfg: Any, abstract: Any) -> Any:
    """The parameters of the HF checkpoint in `folder`, placed as `abstract` says.

    Every device's shard is read straight from the memory-mapped file (only the
    addressable shards of this process).

    Raises:
      UserError: A tensor is missing or has the wrong shape for `cfg`.
    """
    reader = SafetensorsReader(folder)
    sources = _sources(cfg.model, reader)
    flat = traverse_util.flatten_dict(abstract, sep="/")
    missing = sorted(set(flat) - set(sources))
    if missing:
        raise UserError(f"no HF tensor maps to {missing[:4]}; is config.json the model's own?")
    out = {}
    for path, spec in flat.items():
        src = sources[path]
        if tuple(src.shape) != tuple(spec.shape):
            raise UserError(
                f"HF tensor for '{path}' has shape {tuple(src.shape)}, the config gives "
                f"{tuple(spec.shape)}; config.json and the weights disagree"
            )

        def read(index, src=src, dtype=spec.dtype):
            return np.asarray(src[index], dtype=dtype)

        out[path] = jax.make_array_from_callback(spec.shape, spec.sharding, read)
    return traverse_util.unflatten_dict(out, sep="/")


def _tokenizer_files(src: str) -> list[str]:
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if os.path.isfile(os.path.join(src, "tokenizer.model")):
        return ["tokenizer.model"]
    raise UserError(
        f"'{src}' has no tokenizer.json or tokenizer.model; a converted model must keep "
        "its own tokenizer: save it with tokenizer.save_pretrained(SRC)"
    )


def hf_to_jaxllm(src: str, dst: str, overrides: list[str] = (), devices: Any = None) -> str:
    """Converts the Hugging Face checkpoint folder `src` into the jaxllm workdir `dst`.

    Args:
      src: HF folder: config.json, safetensors weights, tokenizer files.
      dst: New workdir (must not hold another model).
      overrides: config overrides for `dst`'s config.yaml (e.g. ``mesh.fsdp=8``).
      devices: devices of the mesh the parameters are placed on (default: all).

    Returns:
      `dst`.
    """
    from jaxllm import sharding
    from jaxllm.checkpoint import Checkpointer
    from jaxllm.data.tokenizer import load_tokenizer

    hf = _read_json(os.path.join(src, "config.json"))
    SafetensorsReader(src)  # refuses pickled or missing weights before anything is written
    model = model_config_from_hf(hf)
    tok_files = _tokenizer_files(src)
    if os.path.isdir(os.path.join(dst, "checkpoints")):
        raise UserError(f"'{dst}' already holds a checkpoint; choose an empty folder")
    os.makedirs(dst, exist_ok=True)
    for name in tok_files:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    tokenizer = os.path.join(dst, tok_files[0])
    seq_len = min(128, model["max_len"])
    cfg = from_dict(
        {"task": "lm", "model": model, "data": {"tokenizer": tokenizer, "seq_len": seq_len}},
        list(overrides),
    )
    n_tok = load_tokenizer(tokenizer).vocab_size
    if n_tok > cfg.model.vocab_size:
        raise UserError(
            f"the tokenizer has {n_tok} tokens, the model's vocab_size is "
            f"{cfg.model.vocab_size}; config.json and the tokenizer disagree"
        )
    mesh = sharding.make_mesh(cfg.mesh, devices)
    params = load_hf_params(src, cfg, abstract_params(cfg, mesh))
    if jax.process_index() == 0:
        save_config(cfg, os.path.join(dst, "config.yaml"))
        with open(os.path.join(dst, HF_CONFIG_COPY), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
    ckpt = Checkpointer(os.path.join(dst, "checkpoints"), keep=1, async_save=False)
    try:
        ckpt.save(0, {"params": params}, {}, force=True)
    finally:
        ckpt.close()
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    log.info("converted %s (%s, %s parameters) -> %s", src, hf["model_type"], f"{n:,}", dst)
    return dst


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def jaxllm_to_hf(src: str, dst: str, devices: Any = None) -> str:
    """Writes the jaxllm workdir `src` as a Hugging Face folder `dst`.

    ``config.json`` (the imported model's own, updated, when `src` came from
    :func:`hf_to_jaxllm`), ``model.safetensors`` (float32) and the tokenizer files.
    A LoRA-trained workdir is exported merged.

    Returns:
      `dst`.
    """
    from jaxllm.step import model_params
    from jaxllm.workdir import restore_params, workdir_config

    cfg = workdir_config(src, [])
    m = cfg.model
    base_path = os.path.join(src, HF_CONFIG_COPY)
    base = _read_json(base_path) if os.path.isfile(base_path) else None
    hf = hf_config_from_model(m, base)
    session, params, _ = restore_params(src, cfg, devices)
    if base is None:  # a jaxllm-trained model: its tokenizer's ids go to generate()
        tok = session.tokenizer
        hf.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    flat = traverse_util.flatten_dict(model_params(params), sep="/")
    top, layer = _rules(m)
    tensors: dict[str, np.ndarray] = {}
    fused: dict[str, list] = {}

    def put(rule, value, name):
        value = hf_layout.to_hf_tensor(rule, value, m)
        if rule.part is None:
            tensors[name] = np.ascontiguousarray(value, np.float32)
        else:
            fused.setdefault(name, [None] * 3)[rule.part] = value

    for r in top:
        put(r, _host(flat[r.path]), r.hf)
    for r in layer:
        if m.scan_layers:
            stacked = _host(flat[f"layers/{r.path}"])
            for i in range(m.n_layers):
                put(r, stacked[i], r.hf.format(i=i))
        else:
            for i in range(m.n_layers):
                put(r, _host(flat[f"layer_{i}/{r.path}"]), r.hf.format(i=i))
    for name, parts in fused.items():  # GPT-2 c_attn: q, k, v side by side
        tensors[name] = np.ascontiguousarray(np.concatenate(parts, axis=-1), np.float32)
    if jax.process_index() == 0:
        os.makedirs(dst, exist_ok=True)
        tok = cfg.data.tokenizer
        names = _tokenizer_files(os.path.dirname(tok)) if tok.endswith(".json") else []
        for name in names:
            shutil.copyfile(os.path.join(os.path.dirname(tok), name), os.path.join(dst, name))
        if not names and tok:
            shutil.copyfile(tok, os.path.join(dst, "tokenizer.model"))
        write_safetensors(os.path.join(dst, SINGLE), dict(sorted(tensors.items())))
        with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf, f, indent=2)
    log.info("exported %s -> %s (%s)", src, dst, hf["model_type"])
    return dst
