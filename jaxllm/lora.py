"""LoRA adapters (Hu et al. 2021) as a pure transform over parameter pytrees.

The adapters live beside the model's parameters, under the top-level key ``lora``, in
a tree that mirrors the paths of the matrices they adapt::

    params = {**params, "lora": init_adapters(params, rank=8, alpha=16.0,
                                              targets=r"attn/(query|value)/kernel", rng=rng)}
    params["lora"]["layer_0"]["attn"]["query"]["kernel"]
        == {"a": [in, r], "b": [r, out], "scale": alpha / r}
    model.apply({"params": merge(params)}, tokens)      # the adapted model

so one checkpoint holds the frozen base and its adapters, and :func:`merge` turns them
into a plain model (for eval, decoding and export) with nothing but the parameters:
``W' = W + scale * (A @ B).reshape(W.shape)``.

Conventions:

* A kernel's layout is (optional layer axis under a scanned ``layers`` stack, input
  dims..., output dims...), as :func:`jaxllm.compress.prune.kernel_layout` reads it.
  ``A`` is ``[lead..., prod(in), r]`` and ``B`` is ``[lead..., r, prod(out)]``: one
  adapter per layer of a scanned stack.
* Initialisation follows Hugging Face peft: ``A`` Kaiming-uniform
  (``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), ``B`` zeros, so the adapted model starts
  exactly equal to the base.
* ``scale`` (``alpha / r``) is stored with each adapter, not trained (the training
  step puts it under ``stop_gradient`` and gives it no optimizer state): merging needs
  nothing but the checkpoint, and an ``alpha`` changed on the command line after
  training cannot silently change the model.
* Only matrices are adapted: leaves with at least two dims past the layer axis and a
  floating dtype (an integer ``quant=int`` kernel is not a target).
* ``A`` and ``B`` get no weight decay: `jaxllm.optim` decays leaves named ``kernel``
  only (Hugging Face's Trainer would decay them, with its default weight_decay of 0).
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jaxllm.compress.prune import kernel_layout, path_str

LORA_KEY = "lora"  # top-level parameter name of the adapters


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _unbox(x: Any) -> Any:
    return x.value if _is_box(x) else x


def is_matrix(path: str, leaf: Any) -> bool:
    """True for a floating leaf with >= 2 dims past its layer axis (a weight matrix)."""
    leaf = _unbox(leaf)
    shape = getattr(leaf, "shape", None)
    if shape is None or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return False
    lead, _ = kernel_layout(path, len(shape))
    return len(shape) - lead >= 2


def _base_leaves(params: Any) -> list[tuple[str, Any]]:
    """(path, leaf) of the model's own parameters: the adapters themselves excluded."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        {k: v for k, v in params.items() if k != LORA_KEY}, is_leaf=_is_box
    )
    return [(path_str(p), leaf) for p, leaf in flat]


def target_paths(params: Any, targets: str) -> list[str]:
    """Paths of the matrices that ``re.search(targets, path)`` selects, in tree order."""
    pattern = re.compile(targets)
    return [p for p, leaf in _base_leaves(params) if pattern.search(p) and is_matrix(p, leaf)]


def _split_dims(path: str, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(lead, n_in, prod(in dims), prod(out dims)) of a kernel."""
    lead, n_in = kernel_layout(path, len(shape))
    fan_in = math.prod(shape[lead : lead + n_in])
    fan_out = math.prod(shape[lead + n_in :])
    return lead, n_in, fan_in, fan_out


def _adapter_names(box: Any, lead: int, n_in: int) -> tuple[tuple, tuple]:
    """Logical axis names of A and B, from the kernel's own (None where dims are merged).

    A keeps the kernel's input axis name and B its output axis name when that side is a
    single dim, so ``A @ B`` comes out sharded like the kernel; the rank is replicated.
    """
    names = tuple(box.names)
    n_out = len(names) - lead - n_in
    a_in = names[lead] if n_in == 1 else None
    b_out = names[lead + n_in] if n_out == 1 else None
    return (*names[:lead], a_in, None), (*names[:lead], None, b_out)


def init_adapters(params: Any, rank: int, alpha: float, targets: str, rng: jax.Array) -> dict:
    """Fresh adapters for the matrices of `params` that `targets` selects.

    Args:
      params: The model's parameters, plain or boxed with logical axis names (the
        output of ``model.init``); boxed kernels give boxed adapters whose names make
        them sharded like their kernel's input / output dims.
      rank: The adapters' rank ``r`` (>= 1).
      alpha: LoRA alpha; the stored scale is ``alpha / rank``.
      targets: Regex searched in each "/"-joined parameter path.
      rng: PRNG key for ``A``.

    Returns:
      The tree to store under ``params["lora"]``: for each target path, a dict
      ``{"a": [lead..., in, r], "b": [lead..., r, out], "scale": float32 scalar}``
      (``a`` and ``b`` in the kernel's dtype).

    Raises:
      ValueError: If `targets` selects no matrix, or `rank` < 1.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    paths = set(target_paths(params, targets))
    if not paths:
        raise ValueError(f"LoRA targets {targets!r} select no weight matrix")
    flat: dict[tuple[str, ...], Any] = {}
    for i, (path, leaf) in enumerate(_base_leaves(params)):
        if path not in paths:
            continue
        kernel = _unbox(leaf)
        lead, n_in, fan_in, fan_out = _split_dims(path, kernel.shape)
        lead_shape = kernel.shape[:lead]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as torch Linear / peft
        a = jax.random.uniform(
            jax.random.fold_in(rng, i), (*lead_shape, fan_in, rank), kernel.dtype, -bound, bound
        )
        b = jnp.zeros((*lead_shape, rank, fan_out), kernel.dtype)
        scale = jnp.asarray(alpha / rank, jnp.float32)
        if _is_box(leaf):
            a_names, b_names = _adapter_names(leaf, lead, n_in)
            a, b = leaf.replace(value=a, names=a_names), leaf.replace(value=b, names=b_names)
            scale = leaf.replace(value=scale, names=())
        key = tuple(path.split("/"))
        flat.update({(*key, "a"): a, (*key, "b"): b, (*key, "scale"): scale})
    return traverse_util.unflatten_dict(flat)


def adapters(params: Any) -> dict[str, dict[str, Any]]:
    """The adapters of `params` by kernel path: ``{path: {"a", "b", "scale"}}``."""
    flat = traverse_util.flatten_dict(params.get(LORA_KEY, {}))
    out: dict[str, dict[str, Any]] = {}
    for key, leaf in flat.items():
        out.setdefault("/".join(key[:-1]), {})[key[-1]] = leaf
    return out


def delta(kernel_shape: tuple[int, ...], a: jax.Array, b: jax.Array, scale: Any) -> jax.Array:
    """``scale * (A @ B)`` in float32, reshaped to the kernel's shape."""
    ab = jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return jnp.asarray(scale, jnp.float32) * ab.reshape(kernel_shape)


def merge(params: Any, *, dropout: float = 0.0, rng: jax.Array | None = None) -> Any:
    """The adapted model's parameters: every adapted kernel ``W + scale * A @ B``.

    The sum is formed in float32 and cast back to the kernel's dtype. Parameters
    without a ``lora`` entry are returned unchanged (the same dict).

    Args:
      params: Parameters holding adapters under ``"lora"`` (plain arrays).
      dropout: LoRA dropout rate; applied only when `rng` is given (training).
      rng: PRNG key of this training step (None: eval / export, no dropout).

    Peft's LoRA dropout drops entries of each token's input to the adapter path,
    ``x W + scale * (drop(x) A) B``, which no single weight can express. Merged in
    weight space, dropout here drops *rows of A* (input features of the adapter, scaled
    by ``1 / (1 - p)``), one mask per adapter (per layer of a scanned stack) per step,
    shared by every token of the batch. It has the same expectation and regularises the
    same adapter inputs, with a coarser (per-step instead of per-token) noise.

    Returns:
      The parameters without ``"lora"``, adapted kernels replaced.
    """
    if LORA_KEY not in params:
        return params
    base = {k: v for k, v in params.items() if k != LORA_KEY}
    flat = traverse_util.flatten_dict(base)
    for i, (path, ad) in enumerate(sorted(adapters(params).items())):
        key = tuple(path.split("/"))
        if key not in flat:
            raise ValueError(f"LoRA adapter {path!r} has no kernel in the parameters")
        kernel = flat[key]
        a = ad["a"]
        if dropout > 0.0 and rng is not None:
            keep = jax.random.bernoulli(
                jax.random.fold_in(rng, i), 1.0 - dropout, (*a.shape[:-1], 1)
            )
            a = jnp.where(keep, a / (1.0 - dropout), 0.0).astype(a.dtype)
        d = delta(kernel.shape, a, ad["b"], jax.lax.stop_gradient(ad["scale"]))
        flat[key] = (kernel.astype(jnp.float32) + d).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def adapter_output(x: jax.Array, a: jax.Array, b: jax.Array, scale: Any, n_in: int) -> jax.Array:
    """The adapter path of one (unscanned) projection, unmerged: ``scale * (x A) B``.

    Args:
      x: [..., in dims...] the projection's input; its last `n_in` dims are contracted.
      a: [prod(in), r].
      b: [r, prod(out)].
      scale: alpha / r.
      n_in: Number of input dims of the kernel.

    Returns:
      [..., prod(out)] (reshape to the projection's output features).
    """
    lead = x.shape[: x.ndim - n_in]
    xf = x.reshape(*lead, -1).astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    return jnp.asarray(scale, jnp.float32) * jnp.matmul(
        jnp.matmul(xf, a.astype(jnp.float32), precision=hp),
        b.astype(jnp.float32),
        precision=hp,
    )


def num_adapter_params(params: Any) -> int:
    """Trainable adapter entries (A and B; the scales are constants)."""
    return sum(
        int(math.prod(_unbox(leaf).shape))
        for ad in adapters(params).values()
        for name, leaf in ad.items()
        if name in ("a", "b")
    )
