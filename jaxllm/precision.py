"""Mixed-precision policy and dynamic loss scaling.

A :class:`Policy` names three dtypes: the dtype parameters are stored (and
updated) in, the dtype matmuls and activations run in, and the dtype logits and
the loss are computed in. Parameters stay fp32 in every policy so that small
optimizer updates are not rounded away; only the forward/backward compute is
narrowed.

fp16 has a 5-bit exponent, so small gradients underflow to zero. Dynamic loss
scaling multiplies the loss by a large factor before differentiation and divides
the gradients by it afterwards; when a step overflows (inf/nan gradients) the
step is skipped and the scale halved, and after ``growth_interval`` clean steps
the scale is doubled again (Micikevicius et al. 2018, "Mixed Precision
Training"). Everything here is a pure function of pytrees so it lives inside the
jitted train step::

    ls = init_loss_scale(cfg.loss_scale, enabled=policy.loss_scaling)
    ...                                           # inside the jitted step:
    grads = jax.grad(lambda p: scale_loss(ls, loss_fn(p)))(params)
    grads = unscale(ls, grads)
    finite = all_finite(grads)
    new_params, new_opt = apply_optimizer(params, opt_state, grads)
    params = select_tree(finite, new_params, params)     # skip the step on overflow
    opt_state = select_tree(finite, new_opt, opt_state)
    ls = update_loss_scale(ls, finite, cfg.loss_scale)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm.config import LossScaleConfig
from jaxllm.errors import UserError

# Growth stops here so the scale stays a finite fp32 number: an inf scale could
# never back off again (inf / 2 == inf). 2**64 is far above any useful fp16 scale.
_MAX_SCALE = 2.0**64


@dataclasses.dataclass(frozen=True)
class Policy:
    """The dtypes of one precision mode.

    Attributes:
        param_dtype: dtype parameters are stored and updated in.
        compute_dtype: dtype of matmuls and activations.
        output_dtype: dtype of logits and the loss.
        name: the config name (``fp32``, ``bf16`` or ``fp16``).
    """

    param_dtype: Any
    compute_dtype: Any
    output_dtype: Any
    name: str = "custom"

    @property
    def loss_scaling(self) -> bool:
        """Whether this policy needs dynamic loss scaling (only fp16 compute does)."""
        return jnp.dtype(self.compute_dtype) == jnp.float16


_POLICIES = {
    "fp32": Policy(jnp.float32, jnp.float32, jnp.float32, "fp32"),
    # bf16 keeps fp32's exponent range, so no loss scaling is needed (TPU default).
    "bf16": Policy(jnp.float32, jnp.bfloat16, jnp.float32, "bf16"),
    "fp16": Policy(jnp.float32, jnp.float16, jnp.float32, "fp16"),
}


def get_policy(name: str) -> Policy:
    """Returns the precision policy for a config name.

    Args:
        name: ``fp32`` (all fp32), ``bf16`` (fp32 params, bf16 compute, fp32
            logits/loss) or ``fp16`` (fp32 params, fp16 compute, fp32
            logits/loss, with dynamic loss scaling).

    Returns:
        The matching :class:`Policy`.

    Raises:
        UserError: if the name is not one of the three.
    """
    try:
        return _POLICIES[name]
    except KeyError:
        raise UserError(
            f"unknown precision '{name}'; allowed values: {', '.join(_POLICIES)}"
        ) from None


def _cast_floating(tree: Any, dtype: Any) -> Any:
    def cast(x):
        # Integer leaves (token ids, step counters, masks) must keep their dtype.
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(dtype)
        return x

    return jax.tree_util.tree_map(cast, tree)


def cast_compute(tree: Any, policy: Policy) -> Any:
    """Casts every floating-point leaf of ``tree`` to the policy's compute dtype.

    Args:
        tree: any pytree (params, activations, a batch).
        policy: the precision policy.

    Returns:
        The tree with floating leaves in ``policy.compute_dtype``; other leaves unchanged.
    """
    return _cast_floating(tree, policy.compute_dtype)


def cast_output(tree: Any, policy: Policy) -> Any:
    """Casts every floating-point leaf of ``tree`` to the policy's output dtype (logits, loss).

    Args:
        tree: any pytree.
        policy: the precision policy.

    Returns:
        The tree with floating leaves in ``policy.output_dtype``; other leaves unchanged.
    """
    return _cast_floating(tree, policy.output_dtype)


@struct.dataclass
class LossScale:
    """Dynamic loss-scale state; a pytree, so it can live in the train state.

    Attributes:
        scale: fp32 scalar the loss is multiplied by.
        good_steps: int32 scalar, finite steps since the last change of scale.
        enabled: static flag; when False every function here is the identity and
            the scale stays exactly 1.
    """

    scale: jax.Array
    good_steps: jax.Array
    enabled: bool = struct.field(pytree_node=False, default=True)


def init_loss_scale(cfg: LossScaleConfig, enabled: bool) -> LossScale:
    """Creates the initial loss-scale state.

    Args:
        cfg: initial scale, growth interval and factor.
        enabled: True for fp16; False gives a fixed scale of 1 (a no-op).

    Returns:
        A :class:`LossScale` with ``good_steps`` 0.
    """
    initial = max(float(cfg.initial), 1.0) if enabled else 1.0
    return LossScale(
        scale=jnp.asarray(initial, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        enabled=bool(enabled),
    )


def scale_loss(ls: LossScale, loss: jax.Array) -> jax.Array:
    """Multiplies the loss by the current scale (call inside the differentiated function).

    Args:
        ls: loss-scale state.
        loss: scalar loss.

    Returns:
        ``loss * scale``, or ``loss`` itself when scaling is disabled.
    """
    if not ls.enabled:
        return loss
    return loss * ls.scale.astype(loss.dtype)


def unscale(ls: LossScale, grads: Any) -> Any:
    """Divides gradients by the current scale, undoing :func:`scale_loss`.

    Args:
        ls: loss-scale state.
        grads: gradient pytree.

    Returns:
        The unscaled gradients (in their own dtypes), or ``grads`` when disabled.
    """
    if not ls.enabled:
        return grads
    return jax.tree_util.tree_map(lambda g: (g / ls.scale).astype(g.dtype), grads)


def all_finite(grads: Any) -> jax.Array:
    """Checks that no gradient leaf holds an inf or nan.

    Args:
        grads: gradient pytree.

    Returns:
        A boolean scalar array (True for an empty tree).
    """
    leaves = jax.tree_util.tree_leaves(grads)
    if not leaves:
        return jnp.asarray(True)
    return jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]).all()


def update_loss_scale(ls: LossScale, finite: jax.Array, cfg: LossScaleConfig) -> LossScale:
    """Advances the loss scale after a step.

    On overflow (``finite`` False) the scale is divided by ``cfg.factor`` (but
    never below 1) and the good-step count reset. After ``cfg.growth_interval``
    consecutive finite steps the scale is multiplied by ``cfg.factor`` and the
    count reset.

    Args:
        ls: loss-scale state before the step.
        finite: boolean scalar from :func:`all_finite`.
        cfg: growth interval and factor.

    Returns:
        The new state; ``ls`` unchanged when scaling is disabled.
    """
    if not ls.enabled:
        return ls
    factor = jnp.float32(cfg.factor)
    good = ls.good_steps + 1
    grow = good >= max(int(cfg.growth_interval), 1)
    grown = jnp.where(grow, jnp.minimum(ls.scale * factor, _MAX_SCALE), ls.scale)
    scale = jnp.where(finite, grown, jnp.maximum(ls.scale / factor, 1.0))
    good_steps = jnp.where(finite & ~grow, good, 0).astype(jnp.int32)
    return ls.replace(scale=scale.astype(jnp.float32), good_steps=good_steps)


def select_tree(pred: jax.Array, new: Any, old: Any) -> Any:
    """Picks ``new`` where ``pred`` is True and ``old`` otherwise, leaf by leaf.

    Used to skip an overflowed step without a Python branch (so it stays inside
    jit): ``params = select_tree(finite, new_params, params)``.

    Args:
        pred: boolean scalar.
        new: pytree taken when ``pred`` is True.
        old: pytree of the same structure taken otherwise.

    Returns:
        A pytree of the same structure and dtypes.
    """

    def pick(n, o):
        o = jnp.asarray(o)
        return jnp.where(pred, n, o).astype(o.dtype)

    return jax.tree_util.tree_map(pick, new, old)
