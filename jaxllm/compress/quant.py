"""Quantisation: straight-through fake quant (QAT), PTQ calibration, int8/int4 weights.

All quantisation here is symmetric: ``q = clip(round(x / s), -qmax, qmax)`` with
``qmax = 2**(bits-1) - 1`` (127 for int8, 7 for int4) and ``x ≈ q * s``.

* QAT: :func:`fake_quant` rounds in the forward pass and lets gradients straight through
  (identity inside the clip range, zero outside). :func:`fake_quant_dot_general` makes a
  Flax ``dot_general_cls`` that fake-quantises every kernel per output channel and every
  activation per token (or per tensor); pass it as ``build_model(cfg,
  dot_general_cls=...)``: it reaches every MLP ``nn.Dense`` and attention
  ``Projection``. The logits head and attention scores are not quantised.
* PTQ: :func:`calibrate_scale` picks a static activation scale (absmax, percentile or
  MSE-optimal clipping).
* Real integers: :func:`quantize_params` turns kernels into ``{"qvalue": int8,
  "scale": float32}`` dicts (per output channel, or per group of ``group_size`` input
  weights); :func:`int8_dot_general` multiplies with them: W8A8 as int8 x int8 -> int32
  then one float rescale, or weight-only.

Model hook note: Flax's ``self.param("kernel", ...)`` checks the kernel's shape, so a
``{"qvalue", "scale"}`` dict cannot stand in for a kernel without a model change. To
*serve* int8 weights (memory saved at run time), ``nn.Dense``/``Projection`` would declare
``qvalue`` (int8) and ``scale`` variables instead of ``kernel`` and call
``int8_dot_general(x, qvalue, scale, dims)``. Until then the same numerics run on the
unchanged model with ``dequantize_params(qparams)`` and ``dot_general_cls=
int8_dot_general_cls()``: re-quantising a dequantised per-channel int8 kernel gives back
the same int8 values (scales to an ulp), so the integer matmul is the one served.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.compress.prune import (
    DEFAULT_EXCLUDE,
    DEFAULT_INCLUDE,
    kernel_layout,
    path_str,
    selected,
)

ACT_MODES = ("dynamic_per_token", "static_per_tensor")


def qmax(bits: int) -> int:
    """Largest symmetric integer level: 127 for 8 bits, 7 for 4 bits."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return 2 ** (bits - 1) - 1


def _fq_forward(x: jax.Array, scale: jax.Array, q: int) -> jax.Array:
    # Rounding in float32 whatever the compute dtype: bf16 cannot hold x / s exactly.
    levels = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -q, q)
    return (levels * scale).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _quantize_ste(x: jax.Array, scale: jax.Array, q: int) -> jax.Array:
    return _fq_forward(x, scale, q)


def _ste_fwd(x, scale, q):
    return _fq_forward(x, scale, q), (x, scale)


def _ste_bwd(q, res, g):
    x, scale = res
    # "Inside the clip range" is judged on the rounded level, as PyTorch's
    # fake_quantize does: an absmax element whose x/s lands a hair above qmax (float
    # error) still rounds to qmax, so its gradient must not be cut.
    inside = jnp.abs(jnp.round(x.astype(jnp.float32) / scale)) <= q
    # The scale gets no gradient: it is a statistic (or a constant), not learned.
    return jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(scale)


_quantize_ste.defvjp(_ste_fwd, _ste_bwd)


def _absmax_scale(x: jax.Array, q: int, reduce_axes: Sequence[int] | None) -> jax.Array:
    """absmax / qmax over `reduce_axes` (kept as size-1 dims); 1.0 for all-zero slices."""
    axes = None if reduce_axes is None else tuple(reduce_axes)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
    return jax.lax.stop_gradient(jnp.where(amax > 0, amax / q, 1.0))


def fake_quant(
    x: jax.Array,
    bits: int = 8,
    axis: int | Sequence[int] | None = None,
    scale: float | jax.Array | None = None,
) -> jax.Array:
    """Symmetric fake quantisation with a straight-through gradient.

    Forward: ``clip(round(x / s), -qmax, qmax) * s``. Backward: the incoming gradient
    where ``|round(x / s)| <= qmax`` (inside the clip range), zero elsewhere.

    Args:
      x: array to quantise (any float dtype; the result has the same dtype).
      bits: bit width (8: levels -127..127).
      axis: channel axis/axes that keep their own scale (``s = absmax / qmax`` reduced
        over all other axes); None: one scale for the tensor.
      scale: a static scale (scalar or broadcastable to ``x``) instead of absmax; then
        values beyond ``qmax * scale`` are clipped and get zero gradient.

    Returns:
      The fake-quantised array.
    """
    q = qmax(bits)
    if scale is None:
        if axis is None:
            reduce = None
        else:
            keep = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
            reduce = tuple(a for a in range(x.ndim) if a not in keep)
        scale = _absmax_scale(x, q, reduce)
    return _quantize_ste(x, jnp.asarray(scale, jnp.float32), q)


@dataclasses.dataclass(frozen=True)
class QuantDotGeneral:
    """A ``lax.dot_general`` that fake-quantises its operands first (QAT).

    ``rhs`` is the kernel: quantised per output channel (absmax over its contracted
    dims). ``lhs`` is the activation: per token (absmax over its contracted dims) or per
    tensor (``act_scale``, or the tensor's absmax when None). Gradients pass straight
    through both.

    Attributes:
      weight_bits: kernel bits (None: kernel left in float).
      act_bits: activation bits (None: weight-only QAT).
      act_mode: ``"dynamic_per_token"`` or ``"static_per_tensor"``.
      act_scale: static per-tensor scale (e.g. from :func:`calibrate_scale`).
    """

    weight_bits: int | None = 8
    act_bits: int | None = 8
    act_mode: str = "dynamic_per_token"
    act_scale: float | None = None

    def __post_init__(self):
        if self.act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {self.act_mode!r}")
        for bits in (self.weight_bits, self.act_bits):
            if bits is not None:
                qmax(bits)

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        (lhs_contract, rhs_contract), _ = dimension_numbers
        if self.weight_bits:
            qw = qmax(self.weight_bits)
            rhs = _quantize_ste(rhs, _absmax_scale(rhs, qw, rhs_contract), qw)
        if self.act_bits:
            qa = qmax(self.act_bits)
            if self.act_mode == "dynamic_per_token":
                scale = _absmax_scale(lhs, qa, lhs_contract)
            elif self.act_scale is not None:
                scale = jnp.asarray(self.act_scale, jnp.float32)
            else:
                scale = _absmax_scale(lhs, qa, None)
            lhs = _quantize_ste(lhs, scale, qa)
        return jax.lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )


def fake_quant_dot_general(
    weight_bits: int | None = 8,
    act_bits: int | None = 8,
    act_mode: str = "dynamic_per_token",
    act_scale: float | None = None,
) -> Callable[[], QuantDotGeneral]:
    """A Flax ``dot_general_cls`` for quantisation-aware training.

    Args:
      weight_bits: kernel bits, per output channel (None: float kernels).
      act_bits: activation bits (None: weight-only).
      act_mode: ``"dynamic_per_token"`` or ``"static_per_tensor"``.
      act_scale: the static per-tensor activation scale (None: dynamic per tensor).

    Returns:
      A zero-argument factory (what Flax calls ``dot_general_cls``) returning a
      :class:`QuantDotGeneral`. Validated now, so a bad argument fails at build time.
    """
    kw = dict(weight_bits=weight_bits, act_bits=act_bits, act_mode=act_mode, act_scale=act_scale)
    QuantDotGeneral(**kw)
    return functools.partial(QuantDotGeneral, **kw)


def calibrate_scale(
    samples: jax.Array | Sequence[jax.Array],
    method: str = "absmax",
    bits: int = 8,
    percentile: float = 99.99,
    grid: int = 100,
) -> jax.Array:
    """A static per-tensor scale from calibration samples (PTQ).

    Args:
      samples: an array or a list of arrays (e.g. one activation batch each).
      method: ``"absmax"``: ``max|x| / qmax`` (nothing clipped); ``"percentile"``:
        the ``percentile`` of ``|x|`` over qmax (outliers clipped); ``"mse"``: the clip
        ratio ``r`` in ``{1/grid, ..., 1}`` minimising ``mean((fq(x, r*absmax/qmax) -
        x)^2)``; a heavy tail gives a smaller scale and finer levels for the bulk.
      bits: bit width.
      percentile: for ``"percentile"``, in (0, 100].
      grid: number of clip ratios tried by ``"mse"``.

    Returns:
      A float32 scalar scale (1.0 for all-zero samples).
    """
    if isinstance(samples, list | tuple):
        samples = [jnp.ravel(jnp.asarray(s)) for s in samples]
        x = jnp.concatenate(samples)
    else:
        x = jnp.ravel(jnp.asarray(samples))
    x = x.astype(jnp.float32)
    q = qmax(bits)
    amax = jnp.max(jnp.abs(x))
    if method == "absmax":
        scale = amax / q
    elif method == "percentile":
        scale = jnp.percentile(jnp.abs(x), percentile) / q
    elif method == "mse":
        ratios = jnp.arange(1, grid + 1, dtype=jnp.float32) / grid

        def err(r):
            s = jnp.maximum(r * amax / q, jnp.finfo(jnp.float32).tiny)
            return jnp.mean((_fq_forward(x, s, q) - x) ** 2)

        # lax.map, not vmap: one candidate at a time keeps memory at one copy of x.
        scale = ratios[jnp.argmin(jax.lax.map(err, ratios))] * amax / q
    else:
        raise ValueError(f"method must be absmax, percentile or mse, got {method!r}")
    return jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)


def is_quantized(node: Any) -> bool:
    """True for a ``{"qvalue", "scale"}`` dict made by :func:`quantize_params`."""
    return isinstance(node, Mapping) and set(node) == {"qvalue", "scale"}


def quantize_tensor(
    w: jax.Array,
    reduce_axes: Sequence[int],
    bits: int = 8,
    group_axis: int | None = None,
    group_size: int | None = None,
) -> dict:
    """Quantises one array to integers with absmax scales.

    Args:
      w: float array.
      reduce_axes: axes that share a scale (a kernel's input dims: one scale per output
        channel). Ignored when grouping.
      bits: bit width; values are stored in int8 whatever the width (int4: -7..7).
      group_axis: with ``group_size``, the axis cut into groups of ``group_size``
        consecutive entries, each with its own scale (per every other index).
      group_size: group length (must divide ``w.shape[group_axis]``).

    Returns:
      ``{"qvalue": int8 like w, "scale": float32}``; ``scale`` has ``w``'s rank, size 1
      on shared axes and ``n // group_size`` on the grouped axis.
    """
    q = qmax(bits)
    w32 = jnp.asarray(w).astype(jnp.float32)
    if group_size:
        a = group_axis % w32.ndim
        n = w32.shape[a]
        if n % group_size:
            raise ValueError(f"group_size {group_size} does not divide axis {a} of size {n}")
        view = w32.reshape(w32.shape[:a] + (n // group_size, group_size) + w32.shape[a + 1 :])
        scale = _absmax_scale(view, q, (a + 1,))
        qvalue = jnp.clip(jnp.round(view / scale), -q, q).reshape(w32.shape)
        scale = scale.reshape(w32.shape[:a] + (n // group_size,) + w32.shape[a + 1 :])
    else:
        scale = _absmax_scale(w32, q, reduce_axes)
        qvalue = jnp.clip(jnp.round(w32 / scale), -q, q)
    return {"qvalue": qvalue.astype(jnp.int8), "scale": scale}


def _expand_scale(scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Broadcastable scale: group axes (size n // g) are repeated back to size n."""
    for axis, (s, n) in enumerate(zip(scale.shape, shape, strict=True)):
        if s not in (1, n):
            scale = jnp.repeat(scale, n // s, axis=axis)
    return scale


def dequantize(node: Mapping, dtype: Any = jnp.float32) -> jax.Array:
    """``qvalue * scale`` of one ``{"qvalue", "scale"}`` dict."""
    qvalue = jnp.asarray(node["qvalue"])
    scale = jnp.asarray(node["scale"])
    if scale.ndim:
        scale = _expand_scale(scale, qvalue.shape)
    return (qvalue.astype(jnp.float32) * scale).astype(dtype)


def quantize_params(
    params: Any,
    bits: int = 8,
    *,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = DEFAULT_EXCLUDE,
    group_size: int | None = None,
) -> Any:
    """Replaces the selected kernels by integer values and float32 scales.

    Args:
      params: parameter pytree.
      bits: 8 (int8) or fewer (int4: values in -7..7, still stored as int8).
      include: regex of paths to quantise (as :func:`jaxllm.compress.prune.prunable`).
      exclude: regex of paths left in float (embeddings and norms by default).
      group_size: None: one scale per output channel (and layer of a scanned stack).
        An int: one scale per ``group_size`` consecutive input weights (along the last
        input dim, e.g. ``head_dim`` of the attention ``out`` kernel) and output
        channel, the usual int4 weight-only layout.

    Returns:
      The tree with each selected kernel replaced by ``{"qvalue", "scale"}``; other
      leaves unchanged.
    """

    return _quantize_tree(params, bits, include, exclude, group_size)


# Compiled as one program (paths are static tree structure): quantising leaf by leaf
# eagerly would compile a dozen small ops per kernel shape.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_tree(params, bits, include, exclude, group_size):
    def one(path, w):
        p = path_str(path)
        if not selected(p, include, exclude):
            return w
        lead, n_in = kernel_layout(p, jnp.ndim(w))
        in_axes = tuple(range(lead, lead + n_in))
        if group_size and in_axes:
            return quantize_tensor(w, in_axes, bits, group_axis=in_axes[-1], group_size=group_size)
        return quantize_tensor(w, in_axes, bits)

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize_params(qparams: Any, dtype: Any = jnp.float32) -> Any:
    """The float tree back from :func:`quantize_params` (``qvalue * scale``)."""
    return _dequantize_tree(qparams, dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _dequantize_tree(qparams, dtype):
    return jax.tree.map(
        lambda n: dequantize(n, dtype) if is_quantized(n) else n, qparams, is_leaf=is_quantized
    )


def int8_dot_general(
    lhs: jax.Array,
    rhs_q: jax.Array,
    rhs_scale: jax.Array,
    dimension_numbers,
    *,
    act_quant: str | None = "dynamic_per_token",
    act_scale: float | jax.Array | None = None,
    act_bits: int = 8,
) -> jax.Array:
    """A dot_general with an integer kernel.

    Args:
      lhs: float activations.
      rhs_q: int8 kernel values (``qvalue``).
      rhs_scale: its scale, as :func:`quantize_tensor` makes it (rank of ``rhs_q``) or
        a scalar.
      dimension_numbers: as ``lax.dot_general`` (no batch dims).
      act_quant: ``"dynamic_per_token"`` (absmax over lhs's contracted dims) or
        ``"static_per_tensor"`` (``act_scale``, else the tensor absmax): W8A8, int8 x
        int8 accumulated exactly in int32, then ``acc * s_lhs * s_rhs`` in float32.
        None: weight-only, a float dot with the integer values then ``* s_rhs``
        (dequantising first when the scales are group-wise).
      act_scale: static activation scale for ``"static_per_tensor"``.
      act_bits: activation bit width.

    Returns:
      The product in ``lhs.dtype``.

    Raises:
      ValueError: group-wise scales with an activation quantiser (the scale then varies
        along the contraction and cannot be applied after the integer dot).
    """
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb:
        raise NotImplementedError("int8_dot_general supports no batch dims")
    rhs_scale = jnp.asarray(rhs_scale, jnp.float32)
    lhs_free = [a for a in range(lhs.ndim) if a not in lc]
    rhs_free = [a for a in range(rhs_q.ndim) if a not in rc]
    per_channel = rhs_scale.ndim == 0 or all(rhs_scale.shape[a] == 1 for a in rc)
    if not per_channel:
        if act_quant is not None:
            raise ValueError("group-wise weight scales need act_quant=None (weight-only)")
        w = dequantize({"qvalue": rhs_q, "scale": rhs_scale}, lhs.dtype)
        return jax.lax.dot_general(lhs, w, dimension_numbers).astype(lhs.dtype)
    # The contracted dims of the scale have size 1: dropping them lays it out like the
    # rhs part of the output, which dot_general puts last.
    rs = rhs_scale.reshape([rhs_scale.shape[a] for a in rhs_free]) if rhs_scale.ndim else rhs_scale
    if act_quant is None:
        acc = jax.lax.dot_general(
            lhs, rhs_q.astype(lhs.dtype), dimension_numbers, preferred_element_type=jnp.float32
        )
        return (acc * rs).astype(lhs.dtype)
    qa = qmax(act_bits)
    if act_quant == "dynamic_per_token":
        ls = _absmax_scale(lhs, qa, lc)
    elif act_quant == "static_per_tensor":
        ls = _absmax_scale(lhs, qa, None) if act_scale is None else jnp.asarray(act_scale)
        ls = ls.astype(jnp.float32)
    else:
        raise ValueError(f"act_quant must be one of {ACT_MODES} or None, got {act_quant!r}")
    lhs_q = jnp.clip(jnp.round(lhs.astype(jnp.float32) / ls), -qa, qa).astype(jnp.int8)
    acc = jax.lax.dot_general(
        lhs_q, rhs_q.astype(jnp.int8), dimension_numbers, preferred_element_type=jnp.int32
    )
    if ls.ndim:  # per token: lhs's free dims lead the output, the rhs's follow
        ls = ls.reshape([ls.shape[a] for a in lhs_free] + [1] * len(rhs_free))
    return (acc.astype(jnp.float32) * ls * rs).astype(lhs.dtype)


@dataclasses.dataclass(frozen=True)
class Int8DotGeneral:
    """A ``lax.dot_general`` running :func:`int8_dot_general` on a per-channel int8 kernel.

    The kernel is quantised on the fly (per output channel), so the unchanged model
    runs integer matmuls; meant for inference (rounding has no useful gradient).

    Attributes:
      act_quant: as :func:`int8_dot_general` (None: weight-only).
      act_scale: static activation scale for ``"static_per_tensor"``.
      weight_bits: kernel bits (values stay in int8 storage).
    """

    act_quant: str | None = "dynamic_per_token"
    act_scale: float | None = None
    weight_bits: int = 8

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision  # integer math has one precision
        (_, rhs_contract), _ = dimension_numbers
        qw = quantize_tensor(rhs, rhs_contract, self.weight_bits)
        out = int8_dot_general(
            lhs,
            qw["qvalue"],
            qw["scale"],
            dimension_numbers,
            act_quant=self.act_quant,
            act_scale=self.act_scale,
        )
        return out if preferred_element_type is None else out.astype(preferred_element_type)


def int8_dot_general_cls(
    act_quant: str | None = "dynamic_per_token",
    act_scale: float | None = None,
    weight_bits: int = 8,
) -> Callable[[], Int8DotGeneral]:
    """A Flax ``dot_general_cls`` running every dense layer as :class:`Int8DotGeneral`."""
    if act_quant is not None and act_quant not in ACT_MODES:
        raise ValueError(f"act_quant must be one of {ACT_MODES} or None, got {act_quant!r}")
    qmax(weight_bits)
    return functools.partial(
        Int8DotGeneral, act_quant=act_quant, act_scale=act_scale, weight_bits=weight_bits
    )


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays in a pytree (int8 values count 1 byte, fp32 four)."""
    return int(
        sum(
            math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype")
        )
    )
