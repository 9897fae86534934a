"""DP-SGD: per-example clipping and Gaussian noise as pure pieces, and privacy accounting.

The train step (`jaxllm.step`) swaps its gradient function for
:func:`make_clipped_grad_sum` when ``privacy.dp`` is on: every row of a (micro-)batch
gets its own gradient (``jax.vmap`` of ``jax.grad`` over the rows, the batch staying
split over the mesh's batch axes), each is scaled to L2 norm at most ``clip_norm`` (the
global norm over all parameter leaves), and the clipped gradients are summed over rows
and micro-batches. :func:`noised_mean` then adds ``N(0, (noise_multiplier *
clip_norm)^2)`` once per step and divides by the global batch size (Abadi et al. 2016,
"Deep Learning with Differential Privacy"). The noise key depends only on
``(train.seed, step)``: every device draws the same noise and a resumed run draws what an
uninterrupted one would.

Each row's objective is its own loss normalised by its own weight (its token count for
lm, 1 for a classify example), never by the batch total, which would let one example
change the others' gradients. With equal-weight rows (full lm windows, unweighted
classify) and no clipping or noise this is exactly the plain step.

Accounting uses Google's ``dp_accounting`` RDP accountant for the Poisson-subsampled
Gaussian mechanism, composed over the steps, with sampling rate ``q = global batch /
training examples``. That bound assumes Poisson sampling while the pipeline draws
shuffled fixed-size batches, as most Opacus and TF Privacy users do; the reported
epsilon is the usual one for that practice, not a proof for shuffling. The privacy unit
is one training row: one classify example, one translate/dialogue example, one lm window
(not one document). ``train.class_weights=balanced`` reads the training label counts
outside the DP mechanism.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import precision, sharding
from jaxllm.errors import UserError

log = logging.getLogger(__name__)

PLAN_FILE = "privacy.json"
_NOISE_TAG = 0xD95D  # separates the noise stream from dropout and init keys


class _QuietOrderExclusions(logging.Filter):
    """Drops dp_accounting's per-order "failed to converge" warnings.

    Fractional RDP orders near 1 often do not converge at small noise; the accountant
    then leaves those orders out, which can only loosen the bound, never break it. A
    noise search evaluates hundreds of them, so the warnings would bury the log.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietOrderExclusions())


# ----------------------------------------------------------------------------- accounting


def epsilon_and_order(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Sequence[float] | None = None,
) -> tuple[float, float]:
    """(epsilon, optimal RDP order) of `steps` Poisson-subsampled Gaussian steps.

    Args:
      sampling_rate: q, the chance that an example is in a batch.
      noise_multiplier: sigma, noise std divided by the clip norm.
      steps: Number of composed steps.
      delta: The delta of the (epsilon, delta) guarantee.
      orders: RDP orders (default: dp_accounting's).

    Returns:
      ``(epsilon, order)``; epsilon is inf without noise and 0 after no steps.
    """
    if steps <= 0 or sampling_rate <= 0:
        return 0.0, float("nan")
    if noise_multiplier <= 0:
        return float("inf"), float("nan")
    # Imported here: dp_accounting pulls in scipy (~3 s), which every `jaxllm` start
    # would otherwise pay, private or not.
    import dp_accounting

    accountant = dp_accounting.rdp.RdpAccountant(list(orders) if orders else None)
    event = dp_accounting.PoissonSampledDpEvent(
        min(sampling_rate, 1.0), dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, int(steps)))
    eps, order = accountant.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def epsilon(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Sequence[float] | None = None,
) -> float:
    """Epsilon of DP-SGD after `steps` steps (see :func:`epsilon_and_order`)."""
    return epsilon_and_order(sampling_rate, noise_multiplier, steps, delta, orders)[0]


def noise_for_target_epsilon(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, tol: float = 1e-4
) -> float:
    """The smallest noise multiplier (within `tol`) whose epsilon is <= the target.

    Epsilon falls as the noise grows, so a doubling search brackets the answer and a
    bisection narrows it; the upper (private enough) end is returned.

    Raises:
      UserError: If no noise multiplier up to 1e4 reaches the target.
    """
    lo, hi = 0.0, 1.0
    while epsilon(sampling_rate, hi, steps, delta) > target_epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:
            raise UserError(
                f"privacy.target_epsilon={target_epsilon} is out of reach for {steps} steps "
                f"at sampling rate {sampling_rate:.4g}; raise it or train fewer steps"
            )
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if epsilon(sampling_rate, mid, steps, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


@dataclasses.dataclass(frozen=True)
class DpPlan:
    """What a DP-SGD run uses and what it spends.

    Attributes:
      noise_multiplier: sigma (derived from privacy.target_epsilon if that was set).
      clip_norm: C.
      sampling_rate: q = batch_size / examples (at most 1).
      steps: train.steps.
      delta: privacy.delta.
      examples: Training rows the sampling rate is computed from.
      batch_size: The global batch.
    """

    noise_multiplier: float
    clip_norm: float
    sampling_rate: float
    steps: int
    delta: float
    examples: int
    batch_size: int

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon spent after `steps` steps (default: the whole run)."""
        steps = self.steps if steps is None else steps
        return epsilon(self.sampling_rate, self.noise_multiplier, steps, self.delta)

    def report(self, steps: int | None = None) -> dict[str, float]:
        """Flat `dp_*` entries for metrics, summaries and eval.json."""
        return {
            "dp_epsilon": self.epsilon(steps),
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_clip_norm": self.clip_norm,
            "dp_sampling_rate": self.sampling_rate,
        }

    def save(self, workdir: str) -> None:
        """Writes the plan next to the checkpoints, so eval reports what training used."""
        with open(os.path.join(workdir, PLAN_FILE), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)


def load_plan(workdir: str) -> DpPlan | None:
    """The plan a DP run saved in `workdir`, or None for a non-private run."""
    path = os.path.join(workdir, PLAN_FILE)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return DpPlan(**json.load(f))


def make_plan(cfg: Any, examples: int) -> DpPlan:
    """The DP plan of `cfg` over `examples` training rows (noise derived if targeted).

    Raises:
      UserError: If the split is empty or the target epsilon cannot be reached.
    """
    p, batch = cfg.privacy, cfg.train.batch_size
    if examples <= 0:
        raise UserError("privacy.dp=true needs a non-empty training split")
    q = min(batch / examples, 1.0)
    sigma = p.noise_multiplier
    if p.target_epsilon:
        sigma = noise_for_target_epsilon(p.target_epsilon, q, cfg.train.steps, p.delta)
        log.info(
            "privacy.target_epsilon=%g over %d steps at q=%.4f: noise multiplier %.4f",
            p.target_epsilon,
            cfg.train.steps,
            q,
            sigma,
        )
    if p.delta >= 1.0 / examples:
        log.warning(
            "privacy.delta=%g is not below 1/examples=%g; the guarantee is weak",
            p.delta,
            1.0 / examples,
        )
    if sigma == 0:
        log.warning("privacy.dp=true without noise: clipping only, epsilon is infinite")
    return DpPlan(sigma, p.clip_norm, q, cfg.train.steps, p.delta, int(examples), batch)


# ----------------------------------------------------------------------------- the step


def example_norms(grads: Any) -> jax.Array:
    """[B] global L2 norms of per-example gradients (every leaf has a leading B)."""
    squares = [
        jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree.leaves(grads)
    ]
    return jnp.sqrt(sum(squares))


def clip_per_example(grads: Any, clip_norm: float) -> tuple[Any, jax.Array]:
    """Scales each example's gradient to global L2 norm <= `clip_norm`.

    Args:
      grads: Per-example gradients, every leaf [B, ...].
      clip_norm: C > 0.

    Returns:
      ``(clipped, norms)``: gradients multiplied by ``min(1, C / norm)`` per example
      (unchanged where the norm is below C) and the [B] norms before clipping.
    """
    norms = example_norms(grads)
    factor = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-12))

    def scale(g):
        return (g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype)).astype(g.dtype)

    return jax.tree.map(scale, grads), norms


def _inner_rules(cfg: Any) -> tuple[Any, Any]:
    """(rules without the batch's mesh axes, the batch's mesh axes).

    Inside the per-example vmap the model sees rows of one example, whose batch dim of
    1 cannot be split: the vmapped dimension carries the batch's mesh axes instead, so
    no other logical axis may use them there (activations' `embed` leaves `fsdp`).
    """
    rules = sharding.logical_rules(cfg.mesh)
    batch_axes = dict(rules).get("batch")
    taken = set(batch_axes if isinstance(batch_axes, tuple) else [batch_axes]) - {None}

    def free(target):
        if isinstance(target, tuple):
            left = tuple(a for a in target if a not in taken)
            return left or None
        return None if target in taken else target

    return [(k, None if k == "batch" else free(v)) for k, v in rules], batch_axes


def per_example_grads(
    objective: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]],
    params: Any,
    batch: dict,
    rng: jax.Array,
    cfg: Any,
) -> tuple[Any, dict]:
    """Gradients of `objective` for every row of `batch` separately.

    Args:
      objective: (params, one-row batch, rng) -> (scalar, sums); rows have a batch
        dimension of 1.
      params: Parameters (shared by all rows).
      batch: Arrays with a leading batch dimension B.
      rng: Row r uses ``fold_in(rng, r)`` (its own dropout masks).
      cfg: The config (mesh rules: the rows stay split over the batch's mesh axes).

    Returns:
      ``(grads, sums)``, every leaf with a leading dimension B.
    """
    rules, batch_axes = _inner_rules(cfg)
    rows = jax.tree.leaves(batch)[0].shape[0]

    def one(example, index):
        row = jax.tree.map(lambda x: x[None], example)
        with nn.logical_axis_rules(rules):
            return jax.grad(objective, has_aux=True)(params, row, jax.random.fold_in(rng, index))

    return jax.vmap(one, spmd_axis_name=batch_axes)(batch, jnp.arange(rows))


def make_clipped_grad_sum(loss_fn: Callable, cfg: Any) -> Callable:
    """A drop-in for the step's gradient function that returns clipped per-example sums.

    Args:
      loss_fn: The step's loss, ``(params, batch, rng, total_weight, teacher_params)
        -> (loss, sums)``.
      cfg: The config (`privacy.clip_norm`, mesh rules).

    Returns:
      ``(params, batch, rng, total_weight, loss_scale, teacher_params) -> (grad_sum,
      sums)``: the sum over rows of the clipped (and unscaled) per-example gradients,
      and the rows' summed loss sums plus ``dp_clipped_sum`` (rows whose norm exceeded
      the clip norm).
    """
    clip = cfg.privacy.clip_norm

    def grad_sum(params, batch, rng, total_weight, scale, teacher_params):
        del total_weight  # each row is normalised by its own weight (module docstring)

        def objective(p, row, r):
            loss, sums = loss_fn(p, row, r, 1.0, teacher_params)
            per_row = loss / jnp.maximum(jax.lax.stop_gradient(sums["count_sum"]), 1.0)
            return precision.scale_loss(scale, per_row), sums

        grads, sums = per_example_grads(objective, params, batch, rng, cfg)
        grads = precision.unscale(scale, grads)
        clipped, norms = clip_per_example(grads, clip)
        sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
        sums["dp_clipped_sum"] = jnp.sum((norms > clip).astype(jnp.float32))
        return jax.tree.map(lambda g: jnp.sum(g, axis=0), clipped), sums

    return grad_sum


def noise_key(seed: int, step: jax.Array) -> jax.Array:
    """The step's noise key: a function of (seed, step) only (replicated, resumable)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _NOISE_TAG), step)


def noised_mean(grad_sum: Any, key: jax.Array, stddev: float, batch_size: int) -> Any:
    """``(grad_sum + N(0, stddev^2)) / batch_size``, independent noise per element.

    Args:
      grad_sum: Summed clipped gradients.
      key: From :func:`noise_key`.
      stddev: noise_multiplier * clip_norm (0 = no noise).
      batch_size: The global batch size (fixed, not the rows present).
    """
    leaves, treedef = jax.tree.flatten(grad_sum)
    if stddev:
        keys = jax.random.split(key, len(leaves))
        leaves = [
            g + stddev * jax.random.normal(k, g.shape, jnp.float32).astype(g.dtype)
            for g, k in zip(leaves, keys, strict=True)
        ]
    return jax.tree.unflatten(treedef, [g / batch_size for g in leaves])


def count_examples(cfg: Any, tokenizer: Any) -> int:
    """Training rows DP-SGD samples from: records, or lm windows of seq_len + 1 tokens."""
    from jaxllm import data

    split = cfg.data.train_split
    if cfg.task == "lm" and not cfg.data.pack:
        return len(data.split_tokens(cfg.data, tokenizer, split)) // (cfg.data.seq_len + 1)
    return len(data.load_records(cfg.data, split, cfg.task))


def log_plan(plan: DpPlan) -> None:
    log.info(
        "DP-SGD: noise multiplier %.4f, clip norm %g, q=%d/%d=%.4f, %d steps: "
        "epsilon %.3f at delta %g (RDP, Poisson-sampling assumption)",
        plan.noise_multiplier,
        plan.clip_norm,
        plan.batch_size,
        plan.examples,
        plan.sampling_rate,
        plan.steps,
        plan.epsilon(),
        plan.delta,
    )
