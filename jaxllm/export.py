"""`jaxllm export`: a trained workdir's forward pass as a StableHLO or ONNX artifact.

The exported function is the model's forward, ``tokens [batch, seq] int32 -> logits
[batch, seq, vocab] float`` (``[batch, num_classes]`` for a classifier), with the
parameters baked in as constants. Baking in is what a deployer wants: one
self-contained file that a serving runtime (IREE, a PJRT plugin, ONNX Runtime) loads
without jaxllm, Flax or the checkpoint's pytree layout; an integer model keeps its int8
constants. Beside the artifact goes ``PATH.json``, a manifest of shapes, dtypes,
vocabulary, tokenizer file (copied next to the artifact) and provenance.

* ``stablehlo``: :func:`jax.export.export`, serialised with ``Exported.serialize()``;
  batch and sequence length are symbolic (``seq <= model.max_len``). Load it with
  ``jax.export.deserialize(bytes).call(tokens)``.
* ``onnx``: ``jax2onnx.to_onnx`` (the ``[export]`` extra). Batch is symbolic, the
  sequence length is fixed to ``data.seq_len``: jax2onnx 0.17 cannot trace the
  model's default ``positions = broadcast(arange(seq))`` over a symbolic length. The
  model is causal, so right-padding a shorter input leaves the logits of its real
  positions unchanged. A scanned stack is exported unrolled (jax2onnx cannot trace
  Flax's ``nn.scan`` body), and a W8A8 model's int8 x int8 products run on int8 values
  widened to int32 in the graph: ONNX Runtime's CPU Einsum has no int8 kernel, and
  int32 accumulation of int8 products is exact, so the numbers are the int8 model's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.compress.qmodel import StoredIntKernel
from jaxllm.compress.quant import int8_dot_general, qmax
from jaxllm.errors import UserError

FORMATS = ("stablehlo", "onnx")
INSTALL_HINT = "pip install 'jaxllm[export]'"


@dataclasses.dataclass(frozen=True)
class WidenedIntKernel(StoredIntKernel):
    """:class:`StoredIntKernel` whose W8A8 product multiplies int8 values as int32.

    Identical numbers (int8 x int8 sums are exact in int32 either way); the graph
    then holds only ops ONNX Runtime's CPU provider implements. The kernel stays an
    int8 constant in the graph, cast to int32 where it is used.
    """

    def apply(self, module, x, n_in, features, in_axes, out_axes):
        """Reads the stored integer kernel (and static scale) and multiplies."""

        # Flax checks a stored parameter against its initialiser's shapes, so the
        # initialisers describe the same layout as StoredIntKernel's.
        shape = (*x.shape[-n_in:], *features)
        scale_shape = [1] * n_in + list(features)
        if self.group_size:
            scale_shape = list(shape)
            scale_shape[n_in - 1] = shape[n_in - 1] // self.group_size

        def kernel_init(_rng):
            return {
                "qvalue": jnp.zeros(shape, jnp.int8),
                "scale": jnp.ones(scale_shape, jnp.float32),
            }

        kernel = nn.unbox(module.param("kernel", kernel_init))
        act_scale = None
        if self.act_quant == "static_per_tensor":
            act_scale = module.param("act_scale", lambda _: jnp.ones((), jnp.float32))
        contract = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
        return widened_int8_dot_general(
            x.astype(module.dtype),
            kernel["qvalue"],
            kernel["scale"],
            contract,
            act_quant=self.act_quant,
            act_scale=act_scale,
        )


def widened_int8_dot_general(lhs, rhs_q, rhs_scale, dimension_numbers, *, act_quant, act_scale):
    """:func:`jaxllm.compress.quant.int8_dot_general` with int32 operands for W8A8.

    Weight-only and group-wise kernels already run a float dot there; they are passed
    through unchanged.
    """
    rhs_scale = jnp.asarray(rhs_scale, jnp.float32)
    (lc, rc), _ = dimension_numbers
    per_channel = rhs_scale.ndim == 0 or all(rhs_scale.shape[a] == 1 for a in rc)
    if act_quant is None or not per_channel:
        return int8_dot_general(
            lhs, rhs_q, rhs_scale, dimension_numbers, act_quant=act_quant, act_scale=act_scale
        )
    lhs_free = [a for a in range(lhs.ndim) if a not in lc]
    rhs_free = [a for a in range(rhs_q.ndim) if a not in rc]
    rs = rhs_scale.reshape([rhs_scale.shape[a] for a in rhs_free]) if rhs_scale.ndim else rhs_scale
    qa = qmax(8)
    x = lhs.astype(jnp.float32)
    if act_quant == "dynamic_per_token":
        amax = jnp.max(jnp.abs(x), axis=tuple(lc), keepdims=True)
        ls = jnp.where(amax > 0, amax / qa, 1.0)
    elif act_scale is None:
        amax = jnp.max(jnp.abs(x))
        ls = jnp.where(amax > 0, amax / qa, 1.0)
    else:
        ls = jnp.asarray(act_scale, jnp.float32)
    lhs_q = jnp.clip(jnp.round(x / ls), -qa, qa).astype(jnp.int8)
    acc = jax.lax.dot_general(
        lhs_q.astype(jnp.int32),
        rhs_q.astype(jnp.int32),
        dimension_numbers,
        preferred_element_type=jnp.int32,
    )
    if ls.ndim:
        ls = ls.reshape([ls.shape[a] for a in lhs_free] + [1] * len(rhs_free))
    return (acc.astype(jnp.float32) * ls * rs).astype(lhs.dtype)


def unscan_params(params: dict, n_layers: int) -> dict:
    """A scanned stack's parameters (``layers/...`` with a leading layer axis) unrolled.

    Returns:
      The tree the same model with ``scan_layers=False`` reads (``layer_0/...``).
    """
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(n_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def forward_fn(model_cfg: Any, params: Any, policy: Any = None, onnx: bool = False) -> Any:
    """``tokens -> logits`` of the inference model of `model_cfg`, `params` closed over.

    Args:
      model_cfg: the `ModelConfig`.
      params: plain (unboxed) parameters; host arrays become constants of the export.
      policy: precision policy (default fp32).
      onnx: build the ONNX-traceable variant (unrolled stack, widened W8A8 products).

    Returns:
      A function of one int32 ``[batch, seq]`` array.
    """
    from jaxllm.compress.qmodel import HookFactory
    from jaxllm.model import build_model

    kw = {}
    if onnx:
        if model_cfg.scan_layers:
            params = unscan_params(params, model_cfg.n_layers)
            model_cfg = dataclasses.replace(model_cfg, scan_layers=False)
        if model_cfg.quant == "int":
            act = None if model_cfg.quant_act == "none" else model_cfg.quant_act
            kw["dot_general_cls"] = HookFactory(
                WidenedIntKernel,
                (("act_quant", act), ("group_size", model_cfg.quant_group_size)),
            )
    if model_cfg.remat != "none":  # inference: nothing to rematerialise
        model_cfg = dataclasses.replace(model_cfg, remat="none")
    model = build_model(model_cfg, policy, **kw)
    params = jax.tree.map(np.asarray, params)
    # The parameters enter a jitted function as arguments, so what the model computes
    # from them (an int8 kernel widened or dequantised) is traced into the graph; the
    # constants themselves stay as stored (int8 stays int8). Closed over directly, such
    # casts would run eagerly at trace time and bake a 4x larger float/int32 constant.
    apply = jax.jit(lambda p, tokens: model.apply({"params": p}, tokens))

    def forward(tokens):
        return apply(params, tokens)

    return forward


def export_stablehlo(forward: Any, max_len: int) -> tuple[bytes, dict]:
    """Serialised StableHLO of `forward` over symbolic ``[batch, seq]`` int32 tokens.

    Returns:
      ``(bytes, io)``: the ``Exported.serialize()`` bytes and the manifest's shapes.
    """
    from jax import export

    b, s = export.symbolic_shape("batch, seq", constraints=(f"seq <= {max_len}",))
    exported = export.export(jax.jit(forward))(jax.ShapeDtypeStruct((b, s), jnp.int32))
    (out,) = exported.out_avals
    io = {
        "inputs": [{"name": "tokens", "shape": ["batch", "seq"], "dtype": "int32"}],
        "outputs": [{"name": "logits", "shape": _dims(out.shape), "dtype": str(out.dtype)}],
        "constraints": [f"seq <= {max_len}"],
        "platforms": list(exported.platforms),
    }
    return bytes(exported.serialize()), io


def export_onnx(forward: Any, seq_len: int) -> tuple[bytes, dict]:
    """An ONNX model of `forward` over ``[batch, seq_len]`` int32 tokens (batch symbolic).

    Raises:
      UserError: If jax2onnx/onnx are not installed, or the model uses an operation
        jax2onnx cannot convert.
    """
    try:
        from jax2onnx import to_onnx
    except ImportError as e:
        raise UserError(f"ONNX export needs jax2onnx and onnx: {INSTALL_HINT}") from e
    spec = jax.ShapeDtypeStruct(("batch", seq_len), jnp.int32)
    try:
        model = to_onnx(
            forward,
            [spec],
            model_name="jaxllm",
            input_names=["tokens"],
            output_names=["logits"],
        )
    except (NotImplementedError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"jax2onnx cannot convert this model ({first[:200]}); export --format stablehlo instead"
        ) from e
    out = model.graph.output[0].type.tensor_type
    out_shape = [d.dim_param or d.dim_value for d in out.shape.dim]
    io = {
        "inputs": [{"name": "tokens", "shape": ["batch", seq_len], "dtype": "int32"}],
        "outputs": [{"name": "logits", "shape": out_shape, "dtype": "float32"}],
        "opset": max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0
        ),
        "note": f"sequence length fixed to {seq_len}: right-pad shorter inputs (causal model)",
    }
    return model.SerializeToString(), io


def _dims(shape: tuple) -> list:
    return [d if isinstance(d, int) else str(d) for d in shape]


def export_workdir(workdir: str, fmt: str, out: str, overwrite: bool = False) -> dict:
    """Exports the latest parameters of `workdir` to `out`; writes ``out + ".json"``.

    Args:
      workdir: a trained (or converted, or compressed) workdir.
      fmt: ``stablehlo`` or ``onnx``.
      out: the artifact's path.
      overwrite: replace an existing `out`.

    Returns:
      The manifest.

    Raises:
      UserError: unknown format, missing workdir, existing `out`, missing packages.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}'; valid: {', '.join(FORMATS)}")
    if not os.path.isdir(workdir):
        raise UserError(f"workdir '{workdir}' does not exist; pass a trained workdir")
    if os.path.exists(out) and not overwrite:
        raise UserError(f"'{out}' already exists; choose another --out or pass --overwrite")
    if fmt == "onnx":
        try:
            import jax2onnx  # noqa: F401
            import onnx  # noqa: F401
        except ImportError as e:
            raise UserError(f"ONNX export needs jax2onnx and onnx: {INSTALL_HINT}") from e
    from jaxllm.precision import get_policy
    from jaxllm.workdir import restore_params, workdir_config

    cfg = workdir_config(workdir, [])
    _, params, step = restore_params(workdir, cfg)
    forward = forward_fn(
        cfg.model, jax.device_get(params), get_policy(cfg.precision), onnx=fmt == "onnx"
    )
    if fmt == "stablehlo":
        blob, io = export_stablehlo(forward, cfg.model.max_len)
    else:
        blob, io = export_onnx(forward, cfg.data.seq_len)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "wb") as f:
        f.write(blob)
    tokenizer = ""
    if cfg.data.tokenizer and os.path.isfile(cfg.data.tokenizer):
        tokenizer = out + "." + os.path.basename(cfg.data.tokenizer)
        shutil.copyfile(cfg.data.tokenizer, tokenizer)
    manifest = build_manifest(cfg, fmt, io, workdir, step, tokenizer, len(blob))
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def build_manifest(cfg, fmt, io, workdir, step, tokenizer, size) -> dict:
    """The JSON written beside an export: what a deployer needs to call it."""
    import jaxllm

    return {
        "format": fmt,
        "jaxllm_version": jaxllm.__version__,
        "jax_version": jax.__version__,
        "source_workdir": os.path.abspath(workdir),
        "step": int(step),
        "task": cfg.task,
        "flavour": cfg.model.flavour,
        "vocab_size": cfg.model.vocab_size,
        "max_len": cfg.model.max_len,
        "precision": cfg.precision,
        "quant": cfg.model.quant,
        "quant_act": cfg.model.quant_act,
        "tokenizer": os.path.basename(tokenizer) if tokenizer else None,
        "params": "baked in as constants",
        "bytes": size,
        **io,
    }
