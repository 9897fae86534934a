"""Distillation inside the train step: the teacher's forward and the student's loss.

`jaxllm.step` calls :func:`make_distill_loss_fn` when `StepHooks.teacher` is set: the
teacher runs in the same jitted, sharded step as the student, its outputs under
``stop_gradient`` (no teacher gradients are ever formed), and the loss mixes

* soft targets: ``T^2 * KL(teacher_T || student_T)`` (Hinton et al. 2015) with weight
  ``alpha`` and the task's hard-label loss with ``1 - alpha``;
* hidden-state MSE on the final hidden states (through the learned ``distill_proj``
  when the widths differ), weight ``hidden_weight``;
* attention-map transfer between mapped layers, weight ``attention_weight``.

With ``topk`` the soft target is the teacher's top-k logits only; with ``cached`` those
come precomputed in the batch (`jaxllm.compress.teacher_cache`) and the teacher does
not run in the step at all.

All terms are sums over the task's weights, divided by the global token count like the
task loss, so micro-batches and shards add up exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import tasks
from jaxllm.attention import partitioned
from jaxllm.compress import distill

PROJ = "distill_proj"  # the projection's top-level name (step.EXTRA_PARAM_PREFIX)
# Batch keys of a cached teacher's top-k logits (teacher_cache.TopKCache adds them).
TOPK_VALUES, TOPK_INDICES = "teacher_topk_values", "teacher_topk_indices"
TOPK_LSE = "teacher_lse"  # logsumexp(teacher logits / T): the top-k's share of the mass


@dataclasses.dataclass
class Teacher:
    """A trained model whose outputs the student learns from.

    Attributes:
      model: the teacher's Flax module (built from its own config).
      params: its parameters, on the student's mesh.
      d_model: its hidden width (a projection is learned when the student's differs).
      temperature: softmax temperature of the soft targets.
      alpha: weight of the soft-target loss (1 - alpha on the hard labels).
      hidden_weight: weight of the hidden-state MSE (0: off).
      attention_weight: weight of the attention-map transfer (0: off).
      layer_map: teacher layer matched to each student layer (attention transfer).
      topk: > 0: the soft target keeps only the teacher's k largest logits.
      cached: the top-k come in the batch (TOPK_VALUES, TOPK_INDICES, TOPK_LSE),
        precomputed once; the teacher's forward is not part of the step (`params` may
        be None).
    """

    model: nn.Module
    params: Any
    d_model: int
    temperature: float = 2.0
    alpha: float = 0.5
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    layer_map: list[int] = dataclasses.field(default_factory=list)
    topk: int = 0
    cached: bool = False


def projection_params(student_d: int, teacher: Teacher):
    """`StepHooks.extra_params` for the hidden-state projection (None when not needed)."""
    if not teacher.hidden_weight or student_d == teacher.d_model:
        return None

    def make(rng):
        init = partitioned(nn.initializers.lecun_normal(), "embed", None)
        return {PROJ: {"kernel": init(rng, (student_d, teacher.d_model), jnp.float32)}}

    return make


def _attention_maps(state: dict | None) -> list[jax.Array]:
    """The sown attention probabilities, one [B, H, T, T] array per layer, in layer order."""
    found = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(state or {}):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        layer = next((k for k in keys if isinstance(k, str) and k.startswith("layer")), "")
        if leaf.ndim == 5:  # a scanned stack: [layers, B, H, T, T]
            found.extend((f"{layer}_{i:04d}", leaf[i]) for i in range(leaf.shape[0]))
        else:
            index = int(layer.split("_")[1]) if "_" in layer else 0
            found.append((f"layer_{index:04d}", leaf))
    return [leaf for _, leaf in sorted(found, key=lambda t: t[0])]


def _weights(cfg: Any, batch: dict, class_weights: Any) -> jax.Array:
    if cfg.task != "classify":
        return batch["weights"]
    valid = batch["label"] >= 0
    w = valid.astype(jnp.float32)
    if class_weights is not None:
        w = w * jnp.asarray(class_weights, jnp.float32)[jnp.where(valid, batch["label"], 0)]
    return w


def _real_tokens(batch: dict) -> jax.Array:
    """[B, T] weights of the real (non-padding) query positions."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).astype(jnp.float32)
    return jnp.ones(batch["inputs"].shape, jnp.float32)


def make_distill_loss_fn(model: nn.Module, cfg: Any, teacher: Teacher, class_weights: Any):
    """loss(params, batch, rng, total_weight, teacher_params) -> (scalar, sums).

    The sums are the task's (hard-label ``ce_sum`` etc., so logged loss and accuracy
    stay comparable with plain training) plus ``kd_sum``, ``hidden_sum``, ``attn_sum``.
    """
    if teacher.cached and (teacher.hidden_weight or teacher.attention_weight or not teacher.topk):
        raise ValueError("a cached teacher gives top-k logits only: no hidden or attention terms")
    deterministic = cfg.model.dropout == 0.0
    want_maps = teacher.attention_weight > 0
    mutable = ["intermediates"] if want_maps else False

    def run(m, params, batch, **kw):
        out = m.apply(
            {"params": params},
            batch["inputs"],
            return_hidden=True,
            mutable=mutable,
            **tasks.model_kwargs(batch),
            **kw,
        )
        if want_maps:
            (logits, hidden), state = out
            return logits, hidden, _attention_maps(state.get("intermediates"))
        return out[0], out[1], []

    def loss_fn(params, batch, rng, total_weight, teacher_params):
        own = {k: v for k, v in params.items() if k != PROJ}
        s_logits, s_hidden, s_maps = run(
            model, own, batch, deterministic=deterministic, rngs={"dropout": rng}
        )
        topk = None
        if teacher.cached:
            # The teacher ran once, before training: only its top-k travel with the batch.
            t_logits, t_hidden, t_maps = None, None, []
            topk = (batch[TOPK_VALUES], batch[TOPK_INDICES], batch[TOPK_LSE])
        else:
            t_logits, t_hidden, t_maps = jax.lax.stop_gradient(
                run(teacher.model, teacher_params, batch)
            )
            if teacher.topk:
                topk = distill.teacher_topk(t_logits, teacher.topk, teacher.temperature)
        hard = tasks.loss_sums(cfg.task, s_logits, batch, cfg.train, class_weights)
        weights = _weights(cfg, batch, class_weights)
        sums = distill.kd_loss_sums(
            s_logits,
            t_logits,
            hard,
            weights,
            temperature=teacher.temperature,
            alpha=teacher.alpha,
            teacher_topk=topk,
        )
        zero = jnp.zeros((), jnp.float32)
        sums["hidden_sum"], sums["attn_sum"] = zero, zero
        if teacher.hidden_weight:
            if cfg.task == "classify":  # one pooled row per example: compare the last token
                s_hidden, t_hidden = s_hidden[:, -1], t_hidden[:, -1]
            proj = params[PROJ]["kernel"] if PROJ in params else None
            sums["hidden_sum"] = distill.hidden_mse_sum(s_hidden, t_hidden, weights, proj)
            sums["loss_sum"] = sums["loss_sum"] + teacher.hidden_weight * sums["hidden_sum"]
        if want_maps:
            attn = zero
            for i, t_index in enumerate(teacher.layer_map[: len(s_maps)]):
                w = weights if cfg.task != "classify" else _real_tokens(batch)
                attn = attn + distill.attention_transfer_sum(s_maps[i], t_maps[t_index], w)
            sums["attn_sum"] = attn
            sums["loss_sum"] = sums["loss_sum"] + teacher.attention_weight * attn
        return sums["loss_sum"] / total_weight, sums

    return loss_fn
