"""Learning-rate schedules and the optimizer factory (optax).

Every schedule is a pure function ``step -> lr`` (jit-friendly, float32) and
starts with a linear warmup from 0 to ``cfg.lr`` over ``cfg.warmup_steps``
steps when that is > 0 (the optax/Flax-examples convention, so step 0 has lr 0).
``step`` is the optimizer's own update count: a step skipped by fp16 loss
scaling does not advance it.

The optimizer is one ``optax.chain``::

    clip_by_global_norm(clip_norm)   # if clip_norm > 0
    adamw | adafactor | sgd | lion   # schedule inside, weight decay masked to kernels
    *extra                           # e.g. keep-pruning-masks; always last

Weight decay follows AdamW's decoupled form for every optimizer, ``p -= lr *
wd * p``, and applies only to dense kernels (not norms, biases or embeddings).

The learning rate is *not* stored in the optimizer state (no
``optax.inject_hyperparams``): the schedule is a deterministic function of the
step, so :func:`current_lr` recomputes it for logging, and the state stays a
plain tree that checkpoints and shards without special cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import OptimConfig
from jaxllm.errors import UserError


def _with_warmup(lr: float, warmup: int, after: optax.Schedule) -> optax.Schedule:
    """Linear 0 -> lr over ``warmup`` steps, then ``after(step)``."""

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        value = after(s)
        if warmup > 0:
            value = jnp.where(s < warmup, lr * s / warmup, value)
        return jnp.asarray(value, jnp.float32)

    return schedule


def _piecewise(cfg: OptimConfig) -> optax.Schedule:
    # Boundaries are absolute steps (what a user writes in the config), not steps
    # after warmup. Repeated boundaries multiply, rather than the last one winning.
    scales: dict[int, float] = {}
    for boundary, factor in zip(cfg.boundaries, cfg.factors, strict=False):
        if factor < 0:
            raise UserError(
                f"optim.factors holds {factor}; piecewise learning-rate factors must be >= 0"
            )
        scales[int(boundary)] = scales.get(int(boundary), 1.0) * float(factor)
    return optax.piecewise_constant_schedule(cfg.lr, scales or None)


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Builds the learning-rate schedule named by ``cfg.schedule``.

    * ``warmup_cosine``: warmup, then cosine from ``lr`` to ``lr * min_lr_ratio``
      ending at step ``decay_steps`` (or ``total_steps``; warmup included), then flat.
    * ``warmup_linear``: warmup, then linear to ``lr * min_lr_ratio`` over the same span.
    * ``constant``: warmup (if any), then ``lr``.
    * ``piecewise``: warmup, then ``lr`` times the product of ``factors[i]`` for
      every ``boundaries[i] <= step`` (``optax.piecewise_constant_schedule``).
    * ``rsqrt``: warmup, then ``lr * sqrt(warmup / step)`` (t5x ``rsqrt_decay``);
      with no warmup, ``lr / sqrt(max(step, 1))``.

    A warmup longer than the decay span is clamped to it, so a misconfigured
    cosine still reaches ``lr`` and then decays instead of dividing by zero.

    Args:
        cfg: optimizer config (``lr``, ``schedule``, ``warmup_steps``, ...).
        total_steps: training length, used when ``cfg.decay_steps`` is 0.

    Returns:
        A function from step (int or int array) to a float32 learning rate.
    """
    lr = float(cfg.lr)
    floor = lr * float(cfg.min_lr_ratio)
    warmup = max(int(cfg.warmup_steps), 0)
    horizon = max(int(cfg.decay_steps or total_steps), 1)
    name = cfg.schedule

    if name in ("warmup_cosine", "warmup_linear"):
        warmup = min(warmup, horizon)
        span = max(horizon - warmup, 1)

        def decay(s):
            progress = jnp.clip((s - warmup) / span, 0.0, 1.0)
            if name == "warmup_linear":
                return lr + (floor - lr) * progress
            return floor + (lr - floor) * 0.5 * (1.0 + jnp.cos(math.pi * progress))

        return _with_warmup(lr, warmup, decay)
    if name == "constant":
        return _with_warmup(lr, warmup, lambda s: jnp.full_like(s, lr))
    if name == "piecewise":
        return _with_warmup(lr, warmup, _piecewise(cfg))
    if name == "rsqrt":
        w = max(warmup, 1)
        return _with_warmup(lr, warmup, lambda s: lr * jnp.sqrt(w / jnp.maximum(s, w)))
    raise UserError(
        f"optim.schedule is '{name}'; allowed values: "
        "warmup_cosine, warmup_linear, constant, piecewise, rsqrt"
    )


def current_lr(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """The learning rate the optimizer uses at ``step``, for logging.

    Args:
        cfg: optimizer config.
        total_steps: training length (as given to :func:`make_optimizer`).
        step: optimizer update count.

    Returns:
        ``make_schedule(cfg, total_steps)(step)`` as a Python float.
    """
    return float(make_schedule(cfg, total_steps)(step))


def _leaf_name(path: tuple) -> str | None:
    # The last dict key on the path is the parameter's name. Walking backwards
    # skips attribute keys such as the `.value` of flax `Partitioned` boxes.
    for entry in reversed(path):
        if isinstance(entry, jax.tree_util.DictKey):
            return str(entry.key)
    return None


def weight_decay_mask(params: Any) -> Any:
    """Marks which parameters get weight decay: leaves named ``kernel`` only.

    Norm scales, biases, token/position embeddings (``embedding``) are excluded,
    as in GPT-2/LLaMA training recipes; decaying them hurts and saves nothing.

    Args:
        params: parameter pytree (nested dicts, possibly with a stacked ``layers`` axis).

    Returns:
        A pytree of Python bools with the structure of ``params``.
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def _base_optimizer(cfg: OptimConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    wd = float(cfg.weight_decay)
    if cfg.name == "adamw":
        return optax.adamw(
            schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=weight_decay_mask
        )
    if cfg.name == "adafactor":
        # optax adds `weight_decay_rate * p` *after* the learning rate is applied
        # (t5x convention), so scale it by the schedule to mean the same as AdamW's
        # weight_decay; a bare 0.1 would shrink every kernel by 10% per step.
        return optax.adafactor(
            learning_rate=schedule,
            weight_decay_rate=(lambda count: wd * schedule(count)) if wd else None,
            weight_decay_mask=weight_decay_mask,
        )
    if cfg.name == "sgd":
        # Decoupled decay (SGDW, Loshchilov & Hutter): the decay term joins after
        # momentum so it is not accumulated by it, then both are scaled by lr.
        parts = []
        if cfg.momentum:
            parts.append(optax.trace(decay=cfg.momentum))
        if wd:
            parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
        parts.append(optax.scale_by_learning_rate(schedule))
        return optax.chain(*parts)
    if cfg.name == "lion":
        return optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=wd, mask=weight_decay_mask)
    raise UserError(f"optim.name is '{cfg.name}'; allowed values: adamw, adafactor, sgd, lion")


def make_optimizer(
    cfg: OptimConfig,
    total_steps: int,
    extra: Sequence[optax.GradientTransformation] = (),
) -> optax.GradientTransformation:
    """Builds ``chain(clip, optimizer(schedule), *extra)``.

    Args:
        cfg: optimizer config; ``clip_norm`` 0 disables clipping.
        total_steps: training length, for the schedule.
        extra: transformations applied to the final updates, in order (for
            example one that keeps pruned weights at zero).

    Returns:
        An optax gradient transformation; ``update`` needs ``params``.
    """
    parts: list[optax.GradientTransformation] = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(_base_optimizer(cfg, make_schedule(cfg, total_steps)))
    parts.extend(extra)
    return optax.chain(*parts)
