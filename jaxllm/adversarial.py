"""Adversarial training on input embeddings: FGM and PGD inside an L2 ball.

Text is discrete, so the perturbation goes where the model is continuous: it is added
to the token embeddings before the first block (`Transformer(...,
embed_perturbation=r)`). Each example's perturbation ``r`` ([length, d_model]) lies in
the L2 ball of radius ``epsilon``:

- FGM (Miyato et al. 2017, "Adversarial Training Methods for Semi-Supervised Text
  Classification"): ``r = epsilon * g / ||g||`` with ``g`` the gradient of the loss with
  respect to the perturbation at zero;
- PGD (Madry et al. 2018): ``steps`` normalised ascent steps of length ``step_size``
  from zero, each projected back onto the ball.

The perturbation is a constant of the training loss (``stop_gradient``): the parameters
are trained on ``clean + weight * adversarial`` without differentiating through the
attack. Norms are per example, so padding rows (zero gradient) get no perturbation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

_TINY = 1e-12


def example_norms(x: jax.Array) -> jax.Array:
    """[B] L2 norms over every dimension but the first."""
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1))


def _per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def fgm_perturbation(grad: jax.Array, epsilon: float) -> jax.Array:
    """``epsilon * g / ||g||`` per example (zero where the gradient is zero).

    Args:
      grad: [B, ...] gradient of the loss with respect to the perturbation.
      epsilon: The L2 radius.

    Returns:
      [B, ...] perturbations of norm exactly `epsilon` (0 for zero-gradient rows).
    """
    norms = example_norms(grad)
    return epsilon * grad / _per_example(jnp.maximum(norms, _TINY), grad)


def project_l2(delta: jax.Array, epsilon: float) -> jax.Array:
    """Projects each example's perturbation onto the L2 ball of radius `epsilon`."""
    norms = example_norms(delta)
    return delta * _per_example(jnp.minimum(1.0, epsilon / jnp.maximum(norms, _TINY)), delta)


def pgd_perturbation(
    loss_grad: Callable[[jax.Array], jax.Array],
    shape: tuple[int, ...],
    epsilon: float,
    steps: int,
    step_size: float,
) -> jax.Array:
    """Projected gradient ascent from zero: ``steps`` L2-normalised steps in the ball.

    Args:
      loss_grad: perturbation -> gradient of the loss with respect to it.
      shape: [B, ...] perturbation shape.
      epsilon: The ball's radius.
      steps: Ascent steps.
      step_size: L2 length of each step (per example).

    Returns:
      [B, ...] perturbations with per-example norm <= `epsilon`.
    """

    def body(_, delta):
        step = fgm_perturbation(loss_grad(delta), step_size)
        return project_l2(delta + step, epsilon)

    return jax.lax.fori_loop(0, steps, body, jnp.zeros(shape, jnp.float32))


def perturbation(
    sums_at: Callable[[Any, jax.Array | None], dict],
    params: Any,
    shape: tuple[int, ...],
    cfg: Any,
) -> jax.Array:
    """The attack of `cfg` (an `AdversarialConfig`) against `sums_at` at `params`.

    Args:
      sums_at: (params, perturbation) -> the task's loss sums (``loss_sum`` ascends).
      params: Parameters (held constant by the attack).
      shape: [B, T, d_model].
      cfg: ``method`` (fgm|pgd), ``epsilon``, ``steps``, ``step_size``.

    Returns:
      A [B, T, d_model] float32 perturbation, gradient-stopped.
    """
    fixed = jax.lax.stop_gradient(params)

    def loss_grad(delta):
        return jax.grad(lambda d: sums_at(fixed, d)["loss_sum"])(delta)

    if cfg.method == "fgm":
        r = fgm_perturbation(loss_grad(jnp.zeros(shape, jnp.float32)), cfg.epsilon)
    elif cfg.method == "pgd":
        size = cfg.step_size or 2.5 * cfg.epsilon / cfg.steps
        r = pgd_perturbation(loss_grad, shape, cfg.epsilon, cfg.steps, size)
    else:
        raise ValueError(f"unknown adversarial method {cfg.method!r}")
    return jax.lax.stop_gradient(r)


def with_adversarial_loss(
    sums_at: Callable[[Any, jax.Array | None], dict],
    params: Any,
    shape: tuple[int, ...],
    cfg: Any,
) -> dict:
    """Clean sums whose ``loss_sum`` also holds ``weight *`` the adversarial loss.

    The other sums (cross-entropy, accuracy, counts) stay the clean ones, so logged
    metrics mean what they mean without the attack; ``adv_ce_sum`` is the cross-entropy
    under attack.
    """
    sums = dict(sums_at(params, None))
    adv = sums_at(params, perturbation(sums_at, params, shape, cfg))
    sums["loss_sum"] = sums["loss_sum"] + cfg.weight * adv["loss_sum"]
    sums["adv_ce_sum"] = adv["ce_sum"]
    return sums
