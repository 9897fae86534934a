"""Magnitude pruning: masks are pytrees, keeping them is an optax transform.

Everything here is a pure function of (unboxed) parameter pytrees::

    masks = magnitude_masks(params, 0.5)                 # or pattern=(2, 4), scope="global"
    params = apply_masks(params, masks)
    tx = optax.chain(optax.adamw(...), keep_masked(masks))          # keep_masked goes LAST
    tx = optax.chain(optax.adamw(...), gradual_magnitude_pruning(0.9, 100, 1000, every=50))

Conventions:

* A leaf's path is its "/"-joined dict keys, e.g. ``layer_0/attn/query/kernel``. Which
  leaves are prunable is a regex choice (:func:`prunable`): by default dense kernels, not
  embeddings or norms.
* A mask tree has exactly the structure of the parameters: one bool array per leaf,
  True = keep. Leaves that are not prunable get an all-True mask. A full tree (rather
  than ``None`` holes) costs one byte per non-prunable parameter and buys compatibility
  with everything that maps over params-shaped trees: ``optax.tree_map_params`` (which
  ``jaxllm.sharding`` uses to shard optimizer state like the parameters), orbax
  checkpoints, and plain ``jax.tree.map(f, params, masks)``.
* The *input* (contracted) dims of a kernel are axis 0 of a Dense kernel [in, out] and
  of the attention query/key/value kernels [embed, heads, head_dim], and axes 0-1 of
  the attention output kernel [heads, head_dim, embed]. Under a scanned stack (a path
  through ``layers``) a leading layer axis comes first; each layer is pruned on its own.
* Ties are broken deterministically: among equal magnitudes the lower flat index is
  pruned first (unstructured) or kept first (N:M), via stable sorts.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

DEFAULT_INCLUDE = r"kernel$"
DEFAULT_EXCLUDE = r"(embed|norm)"


def path_str(path: tuple) -> str:
    """Joins the dict keys (and sequence indices) of a pytree key path with "/"."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
    # Attribute keys (the `.value` of flax boxes) are skipped: they name no parameter.
    return "/".join(parts)


def selected(path: str, include: str | None, exclude: str | None) -> bool:
    """True if ``re.search(include, path)`` (None: any) and not ``re.search(exclude, path)``."""
    if include is not None and not re.search(include, path):
        return False
    return not (exclude and re.search(exclude, path))


def kernel_layout(path: str, ndim: int) -> tuple[int, int]:
    """Where a kernel's input dims are.

    Args:
      path: the leaf's "/"-joined path.
      ndim: its number of dims.

    Returns:
      ``(lead, n_in)``: 1 leading layer axis under a scanned ``layers`` stack (else 0),
      and the number of input (contracted) dims that follow it: all but the last for
      the attention ``out`` kernel, otherwise 1 (0 for a scalar).
    """
    parts = path.split("/")
    lead = 1 if ("layers" in parts and ndim >= 1) else 0
    rest = ndim - lead
    if rest <= 1:
        return lead, rest
    module = parts[-2] if len(parts) >= 2 else ""
    return lead, (rest - 1 if module == "out" else 1)


def prunable(
    params: Any, include: str | None = DEFAULT_INCLUDE, exclude: str | None = DEFAULT_EXCLUDE
) -> Any:
    """Which leaves may be pruned, by regex on their paths.

    Args:
      params: parameter pytree.
      include: a leaf is prunable only if ``re.search(include, path)`` (None: all).
      exclude: ... and not if ``re.search(exclude, path)`` (None: nothing excluded).

    Returns:
      A pytree of Python bools with the structure of ``params``.
    """
    return jax.tree_util.tree_map_with_path(
        lambda p, _: selected(path_str(p), include, exclude), params
    )


# A pruning rule for one leaf: ("unstructured", s) per layer, ("global", s) for the
# shared pool, or ("nm", n, m). `s` and `n` may be traced (gradual pruning).


def _check_sparsity(s: float) -> float:
    s = float(s)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {s}")
    return s


def _check_pattern(pattern) -> tuple[int, int]:
    n, m = (int(v) for v in pattern)
    if not 0 < n <= m:
        raise ValueError(f"an N:M pattern needs 0 < n <= m, got {n}:{m}")
    return n, m


def _as_rule(value) -> tuple:
    if isinstance(value, tuple | list):
        return ("nm", *_check_pattern(value))
    return ("unstructured", _check_sparsity(value))


def _resolve_rules(paths, sparsity, pattern, scope, overrides, include, exclude) -> list:
    """One rule (or None: not prunable) per leaf, from the static arguments."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity (unstructured) or pattern (N:M)")
    if pattern is not None:
        default = ("nm", *_check_pattern(pattern))
    else:
        default = ("global" if scope == "global" else "unstructured", _check_sparsity(sparsity))
    rules = []
    for path in paths:
        if not selected(path, include, exclude):
            rules.append(None)
            continue
        rule = default
        for regex, value in (overrides or {}).items():
            if re.search(regex, path):  # first matching override wins
                rule = _as_rule(value)
                break
        rules.append(rule)
    return rules


def _prune_count(sparsity, size: int):
    """floor(sparsity * size); the guard makes 0.29 * 100 prune 29, not 28."""
    if isinstance(sparsity, jax.Array):
        return jnp.floor(sparsity.astype(jnp.float32) * size + 1e-3).astype(jnp.int32)
    return int(math.floor(float(sparsity) * size + 1e-6))


def _rank_keep(score: jax.Array, k) -> jax.Array:
    """Keeps all but the k lowest scores of a 1-D array (stable: lower index pruned first)."""
    order = jnp.argsort(score, stable=True)
    rank = jnp.zeros(score.shape, jnp.int32).at[order].set(jnp.arange(score.size, dtype=jnp.int32))
    return rank >= k


def _leaf_keep(score: jax.Array, path: str, rule: tuple) -> jax.Array:
    lead, n_in = kernel_layout(path, score.ndim)
    if rule[0] == "unstructured":
        rows = score.reshape(score.shape[0], -1) if lead else score.reshape(1, -1)
        k = _prune_count(rule[1], rows.shape[1])
        return jax.vmap(_rank_keep, in_axes=(0, None))(rows, k).reshape(score.shape)
    _, n, m = rule
    in_size = math.prod(score.shape[lead : lead + n_in])
    if n_in == 0 or in_size % m:
        raise ValueError(
            f"{path}: N:M pruning groups {m} consecutive input weights, but the input "
            f"size is {in_size}; choose m dividing it or exclude this leaf"
        )
    # Input dims follow the (optional) layer axis, so one reshape exposes the groups.
    view = score.reshape(score.shape[:lead] + (in_size // m, m, -1))
    order = jnp.argsort(-view, axis=lead + 1, stable=True)
    rank = jnp.argsort(order, axis=lead + 1, stable=True)
    return (rank < n).reshape(score.shape)


def _masks_from_rules(leaves, paths, rules, prev=None) -> list:
    """Bool keep-mask per leaf; `prev` (masks) makes earlier pruning permanent."""
    scores = []
    for i, (leaf, rule) in enumerate(zip(leaves, rules, strict=True)):
        if rule is None:
            scores.append(None)
            continue
        s = jnp.abs(leaf).astype(jnp.float32)
        if prev is not None:
            # Already-pruned weights rank below every live one, so a growing sparsity
            # never regrows them (they are zero anyway; this settles ties with live zeros).
            s = jnp.where(prev[i], s, -1.0)
        scores.append(s)
    keeps = [
        None if r is None or r[0] == "global" else _leaf_keep(s, p, r)
        for s, p, r in zip(scores, paths, rules, strict=True)
    ]
    pool = [i for i, r in enumerate(rules) if r is not None and r[0] == "global"]
    if pool:
        # One threshold over every pooled weight: rank the concatenation, split it back.
        flat = jnp.concatenate([scores[i].ravel() for i in pool])
        keep = _rank_keep(flat, _prune_count(rules[pool[0]][1], flat.size))
        offset = 0
        for i in pool:
            size = scores[i].size
            keeps[i] = keep[offset : offset + size].reshape(scores[i].shape)
            offset += size
    return [
        jnp.ones(jnp.shape(leaf), bool) if k is None else k
        for leaf, k in zip(leaves, keeps, strict=True)
    ]


def magnitude_masks(
    params: Any,
    sparsity: float | None = None,
    *,
    scope: str = "layer",
    pattern: tuple[int, int] | None = None,
    overrides: Mapping[str, float | tuple[int, int]] | None = None,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = DEFAULT_EXCLUDE,
) -> Any:
    """Keep-masks that prune the smallest-magnitude weights.

    Traceable (jnp sorts only), so it may run inside ``jax.jit`` with static arguments.

    Args:
      params: parameter pytree.
      sparsity: fraction to prune, unstructured. ``scope="layer"``: exactly
        ``floor(sparsity * size)`` weights of each leaf (of each layer of a scanned
        stack); ``scope="global"``: ``floor(sparsity * total)`` over all prunable
        leaves together, i.e. one magnitude threshold shared by every layer.
      scope: ``"layer"`` or ``"global"`` (ignored for N:M, which is per group).
      pattern: ``(n, m)``, e.g. ``(2, 4)``: in every group of ``m`` consecutive weights
        along the input dim keep the ``n`` largest. Give this or ``sparsity``.
      overrides: ``{regex: sparsity or (n, m)}``; a prunable leaf whose path matches a
        regex (first match wins) is pruned per layer at that setting instead (it then
        leaves the global pool). ``0.0`` spares it.
      include: regex of prunable paths (see :func:`prunable`).
      exclude: regex of paths never pruned.

    Returns:
      A pytree with the structure of ``params``: a bool array per leaf, True = keep;
      all True for leaves that are not prunable.

    Raises:
      ValueError: bad sparsity/pattern/scope, or an input size not divisible by ``m``.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    rules = _resolve_rules(paths, sparsity, pattern, scope, overrides, include, exclude)
    return treedef.unflatten(_jit_masks([x for _, x in flat], tuple(paths), tuple(rules)))


@functools.partial(jax.jit, static_argnames=("paths", "rules"))
def _jit_masks(leaves, paths, rules):
    # One compiled program instead of dozens of eagerly dispatched sorts and scatters.
    return _masks_from_rules(leaves, paths, rules)


def apply_masks(params: Any, masks: Any) -> Any:
    """Zeroes the masked-out weights (pure).

    Args:
      params: parameter pytree.
      masks: bool pytree of the same structure (True = keep).

    Returns:
      ``params`` with exact zeros where the mask is False.
    """
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def _keep(updates: Any, params: Any, masks: Any) -> Any:
    # updates = -params where pruned: optax.apply_updates computes p + (-p), which is
    # exactly 0.0 in IEEE arithmetic, whatever momentum or weight decay proposed.
    return jax.tree.map(
        lambda u, p, m: jnp.where(m, u, -jnp.asarray(p).astype(u.dtype)), updates, params, masks
    )


class KeepMaskedState(NamedTuple):
    """State of :func:`keep_masked`: the masks travel with the optimizer state."""

    masks: Any


def keep_masked(masks: Any | Callable[[Any], Any]) -> optax.GradientTransformation:
    """An optax transform that keeps pruned weights exactly zero.

    Put it LAST in the chain (``optax.chain(adamw(...), keep_masked(m))``, or
    ``jaxllm.optim.make_optimizer(cfg, steps, extra=[keep_masked(m)])``): it rewrites
    the final updates to ``-params`` at masked positions, so after
    ``optax.apply_updates`` those weights are exactly 0.0 regardless of Adam moments
    or weight decay. Weights not yet zero (params never passed through
    :func:`apply_masks`) become zero on the first update.

    Args:
      masks: a bool mask pytree (True = keep), or a function ``params -> masks``
        (e.g. ``functools.partial(magnitude_masks, sparsity=0.5)``) called at ``init``.

    Returns:
      A ``GradientTransformation`` whose state (:class:`KeepMaskedState`) holds the
      masks, so checkpoints of the optimizer state carry them. ``update`` needs params.
    """

    def init(params):
        m = masks(params) if callable(masks) else masks
        return KeepMaskedState(masks=jax.tree.map(lambda x: jnp.asarray(x, bool), m))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("keep_masked needs params: call tx.update(grads, state, params)")
        return _keep(updates, params, state.masks), state

    return optax.GradientTransformation(init, update)


def polynomial_sparsity(step, final: float, start: int, end: int, initial: float = 0.0):
    """Gradual-pruning sparsity schedule (Zhu & Gupta 2017).

    ``s_t = s_f + (s_i - s_f) * (1 - progress)^3`` with
    ``progress = clip((step - start) / (end - start), 0, 1)``; for ``s_i = 0`` that is
    ``s_f * (1 - (1 - progress)^3)``: fast pruning early, gentle near the end.

    Args:
      step: current step (int or traced array).
      final: sparsity reached at ``end`` and kept after.
      start: first pruning step (sparsity ``initial`` until then).
      end: step at which ``final`` is reached.
      initial: sparsity at ``start``.

    Returns:
      A float32 scalar array.
    """
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)
    progress = jnp.where(step >= end, 1.0, progress)
    return (final + (initial - final) * (1.0 - progress) ** 3).astype(jnp.float32)


def _leaf_rules(who, params, sparsity, pattern, scope, overrides, include, exclude):
    """(flat leaves with paths, treedef, path strings, per-leaf rules) of a pruner's params."""
    if params is None:
        raise ValueError(f"{who} needs params: call tx.update(grads, state, params)")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_str(p) for p, _ in flat]
    rules = _resolve_rules(paths, sparsity, pattern, scope, overrides, include, exclude)
    return flat, treedef, paths, rules


class GradualPruningState(NamedTuple):
    """State of :func:`gradual_magnitude_pruning`: update count and current masks."""

    count: jax.Array
    masks: Any


def gradual_magnitude_pruning(
    final_sparsity: float | None,
    start: int,
    end: int,
    every: int = 1,
    pattern: tuple[int, int] | None = None,
    *,
    initial: float = 0.0,
    scope: str = "layer",
    overrides: Mapping[str, float | tuple[int, int]] | None = None,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = DEFAULT_EXCLUDE,
    decay: bool = False,
) -> optax.GradientTransformation:
    """Gradual magnitude pruning as an optax transform (put it LAST in the chain).

    At update ``t`` (the transform's own count: updates applied so far) with
    ``start <= t <= end`` and ``(t - start) % every == 0`` (and always at ``t == end``)
    the masks are recomputed from the current params at
    ``polynomial_sparsity(t, final, start, end, initial)``; every update then keeps the
    masked weights exactly zero, as :func:`keep_masked`. Pruning is monotone: once
    pruned, a weight stays pruned. After the update at ``t == end`` the params have the
    final sparsity. The step test is ``lax.cond``, so this runs inside ``jax.jit``.

    Args:
      final_sparsity: unstructured sparsity reached at ``end`` (None with ``pattern``).
      start: update count of the first pruning.
      end: update count at which the final sparsity is reached.
      every: prune every this many updates in between.
      pattern: ``(n, m)``: ramp N:M instead, from keeping all ``m`` of each group to
        keeping ``n``; the pruned-per-group count follows the same cubic schedule.
      initial: sparsity at ``start``.
      scope: ``"layer"`` or ``"global"``, as in :func:`magnitude_masks`.
      overrides: per-path final settings, as in :func:`magnitude_masks`; each ramps on
        the same schedule.
      include: regex of prunable paths.
      exclude: regex of paths never pruned.
      decay: fade the pruned weights out instead of cutting them (see
        :func:`decaying_magnitude_pruning`); ``every`` and ``initial`` are then unused.

    Returns:
      A ``GradientTransformation`` with :class:`GradualPruningState` (or
      :class:`DecayPruningState`); ``update`` needs params.
    """
    if not 0 <= start <= end or every < 1:
        raise ValueError(f"need 0 <= start <= end and every >= 1, got {start}, {end}, {every}")
    if pattern is not None:
        n, m = _check_pattern(pattern)
        if final_sparsity is not None and abs(final_sparsity - (1 - n / m)) > 1e-9:
            raise ValueError(f"pattern {n}:{m} implies sparsity {1 - n / m}, not {final_sparsity}")
        final_sparsity = None
    if decay:
        return decaying_magnitude_pruning(
            final_sparsity, start, end, pattern, scope=scope, overrides=overrides,
            include=include, exclude=exclude,
        )  # fmt: skip

    def at_step(rule, step):
        if rule is None:
            return None
        if rule[0] == "nm":
            _, n, m = rule
            s = polynomial_sparsity(step, 1.0 - n / m, start, end, initial)
            pruned = jnp.clip(jnp.floor(s * m + 1e-3).astype(jnp.int32), 0, m - n)
            return ("nm", m - pruned, m)
        return (rule[0], polynomial_sparsity(step, rule[1], start, end, initial))

    def init(params):
        masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
        return GradualPruningState(count=jnp.zeros([], jnp.int32), masks=masks)

    def update(updates, state, params=None):
        flat, treedef, paths, rules = _leaf_rules(
            "gradual_magnitude_pruning", params, final_sparsity, pattern, scope, overrides,
            include, exclude,
        )  # fmt: skip
        step = state.count

        def recompute(prev):
            rules_t = [at_step(r, step) for r in rules]
            leaves = [x for _, x in flat]
            return treedef.unflatten(
                _masks_from_rules(leaves, paths, rules_t, treedef.flatten_up_to(prev))
            )

        due = (step >= start) & (step <= end) & (((step - start) % every == 0) | (step == end))
        masks = jax.lax.cond(due, recompute, lambda prev: prev, state.masks)
        new_state = GradualPruningState(count=optax.safe_int32_increment(step), masks=masks)
        return _keep(updates, params, masks), new_state

    return optax.GradientTransformation(init, update)


class DecayPruningState(NamedTuple):
    """State of :func:`decaying_magnitude_pruning`.

    Attributes:
      count: updates applied so far.
      masks: the current keep-masks (final once ``count > end``).
      dense: the dense shadow weights the updates accumulate into while pruned weights
        fade; it mirrors the parameters (one more parameter-sized buffer, like an Adam
        moment, for the length of the pruning stage).
    """

    count: jax.Array
    masks: Any
    dense: Any


def decaying_magnitude_pruning(
    final_sparsity: float | None,
    start: int,
    end: int,
    pattern: tuple[int, int] | None = None,
    *,
    scope: str = "layer",
    overrides: Mapping[str, float | tuple[int, int]] | None = None,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = DEFAULT_EXCLUDE,
) -> optax.GradientTransformation:
    """Gradual pruning by decaying the pruned weights (put it LAST in the chain).

    The "pruning mask decay" recipe of Kao et al. 2022 ("Training Recipes for N:M
    Structured Sparsity with Decaying Pruned Weights"): updates accumulate into dense
    shadow weights ``w``; at every update ``t`` with ``start <= t <= end`` the final
    masks (e.g. 2:4) are chosen afresh from ``|w|`` and the parameters become
    ``w * (mask + beta_t * (1 - mask))`` with ``beta_t = (1 - progress)^3``, the cubic
    schedule of :func:`polynomial_sparsity` read as the fraction of magnitude the
    pruned weights keep. A weight that the gradients favour can therefore grow back
    into its group while the pruned ones fade, which cutting (monotone masks) does not
    allow. At ``t == end`` ``beta`` is 0 and the masks freeze: from then on this acts as
    :func:`keep_masked`. ``start == end == 0`` is one-shot pruning.

    Args:
      final_sparsity: unstructured sparsity (None with ``pattern``).
      start: update count at which the fading starts (dense until then).
      end: update count at which the pruned weights reach zero.
      pattern: ``(n, m)`` N:M masks instead of unstructured ones.
      scope: ``"layer"`` or ``"global"``, as in :func:`magnitude_masks`.
      overrides: per-path final settings, as in :func:`magnitude_masks`.
      include: regex of prunable paths.
      exclude: regex of paths never pruned.

    Returns:
      A ``GradientTransformation`` with :class:`DecayPruningState`; ``update`` needs
      params.
    """
    if not 0 <= start <= end:
        raise ValueError(f"need 0 <= start <= end, got {start}, {end}")

    def init(params):
        masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
        return DecayPruningState(count=jnp.zeros([], jnp.int32), masks=masks, dense=params)

    def update(updates, state, params=None):
        _, treedef, paths, rules = _leaf_rules(
            "decaying_magnitude_pruning", params, final_sparsity, pattern, scope, overrides,
            include, exclude,
        )  # fmt: skip
        step = state.count

        def fading(_):
            # Straight-through: the update computed at the faded weights moves the
            # dense shadow, so a faded weight that keeps being pushed can return.
            dense = jax.tree.map(lambda w, u: w + u.astype(w.dtype), state.dense, updates)
            masks = treedef.unflatten(_masks_from_rules(treedef.flatten_up_to(dense), paths, rules))
            beta = 1.0 - polynomial_sparsity(step, 1.0, start, end)
            masks = jax.tree.map(lambda k: k | (step < start), masks)
            new = jax.tree.map(
                lambda w, k: jnp.where(k, w, (w * beta).astype(w.dtype)), dense, masks
            )
            out = jax.tree.map(lambda n, p, u: (n - p).astype(u.dtype), new, params, updates)
            return out, masks, dense

        def frozen(_):
            return _keep(updates, params, state.masks), state.masks, state.dense

        out, masks, dense = jax.lax.cond(step <= end, fading, frozen, None)
        new_state = DecayPruningState(
            count=optax.safe_int32_increment(step), masks=masks, dense=dense
        )
        return out, new_state

    return optax.GradientTransformation(init, update)


def sparsity_report(
    params: Any,
    masks: Any = None,
    *,
    include: str | None = DEFAULT_INCLUDE,
    exclude: str | None = DEFAULT_EXCLUDE,
) -> list[dict]:
    """Per-leaf sparsity of the prunable leaves, for logs and compression reports.

    Args:
      params: parameter pytree.
      masks: optional masks, applied first (report what the masks would leave).
      include: regex of paths to report.
      exclude: regex of paths to skip.

    Returns:
      One dict per prunable leaf, ``{"path", "size", "nonzero", "sparsity"}`` (Python
      numbers; sparsity = 1 - nonzero / size), then a ``{"path": "total", ...}`` row.
    """
    if masks is not None:
        params = apply_masks(params, masks)
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = path_str(path)
        if not selected(p, include, exclude):
            continue
        arr = np.asarray(jax.device_get(leaf))
        rows.append({"path": p, "size": int(arr.size), "nonzero": int(np.count_nonzero(arr))})
    total = {
        "path": "total",
        "size": sum(r["size"] for r in rows),
        "nonzero": sum(r["nonzero"] for r in rows),
    }
    for row in [*rows, total]:
        row["sparsity"] = 1.0 - row["nonzero"] / row["size"] if row["size"] else 0.0
    return [*rows, total]
