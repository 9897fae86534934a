"""Fine-tuning modes: which parameters train, and an optimizer that leaves the rest alone.

``finetune.mode`` (`jaxllm.config.FinetuneConfig`):

* ``full``: every parameter trains (the default; nothing here runs).
* ``frozen``: parameters whose path matches ``finetune.freeze`` are frozen.
* ``lora``: the whole base model is frozen except ``finetune.trainable`` (a new
  classification head); low-rank adapters (:mod:`jaxllm.lora`) on the matrices that
  ``finetune.lora_targets`` selects train instead.

Frozen parameters cost no optimizer memory and no weight gradients: the optimizer is
``optax.multi_transform({"train": tx, "frozen": set_to_zero()}, labels)`` (no Adam
moments for frozen leaves; clipping sees only the trainable gradients), and the train
step applies the model to :func:`train_view`, where frozen leaves sit under
``stop_gradient`` so XLA drops their weight-gradient matmuls.

Labels are a tree of ``"train"`` / ``"frozen"`` strings with the parameters' structure,
a function of the parameter *paths* only (regexes searched in "/"-joined paths such as
``layer_0/attn/query/kernel``), so they are the same for abstract shapes, boxed
parameters and arrays.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jax
import optax

from jaxllm import lora
from jaxllm.compress.prune import path_str
from jaxllm.config import FinetuneConfig
from jaxllm.errors import UserError

log = logging.getLogger(__name__)

TRAIN, FROZEN = "train", "frozen"
# Top-level parameters that exist only for training (step.EXTRA_PARAM_PREFIX, e.g. the
# distillation projection) always train.
EXTRA_PREFIX = "distill_"
_LORA_STREAM = 0x10AA  # folded into the step's dropout key for LoRA dropout


def _is_box(x: Any) -> bool:
    import flax.linen as nn

    return isinstance(x, nn.meta.AxisMetadata)


def _paths(params: Any) -> list[str]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    return [path_str(p) for p, _ in flat]


def _no_match(key: str, regex: str, paths: list[str], what: str = "parameter") -> UserError:
    examples = ", ".join(paths[:4]) + (" ..." if len(paths) > 4 else "")
    return UserError(f"finetune.{key}={regex!r} matches no {what}; paths look like: {examples}")


def add_adapters(params: Any, cfg: FinetuneConfig, rng: jax.Array) -> Any:
    """`params` plus fresh LoRA adapters under ``"lora"`` (mode lora; else unchanged).

    Raises:
      UserError: If ``finetune.lora_targets`` selects no weight matrix.
    """
    if cfg.mode != "lora":
        return params
    if not lora.target_paths(params, cfg.lora_targets):
        matrices = [p for p in _paths(params) if re.search(r"kernel$|embedding$", p)]
        raise _no_match("lora_targets", cfg.lora_targets, matrices, "weight matrix")
    adapters = lora.init_adapters(params, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, rng)
    return {**params, lora.LORA_KEY: adapters}


def param_labels(
    params: Any, cfg: FinetuneConfig, *, check: bool = False, extra_prefix: str = EXTRA_PREFIX
) -> Any:
    """``"train"`` / ``"frozen"`` for every leaf of `params` (boxed leaves count as leaves).

    Args:
      params: Parameters (arrays, abstract shapes or boxed), with adapters in mode lora.
      cfg: The fine-tuning config.
      check: Raise when a regex the mode uses matches nothing (session build time).
      extra_prefix: Top-level names of training-only parameters, always trainable.

    Raises:
      UserError: With `check`: ``freeze`` (mode frozen) matches no parameter or every
        one; a non-default ``trainable`` (mode lora) matches no parameter.
    """
    base = [p for p in _paths(params) if not _special(p, extra_prefix)]
    if cfg.mode == "frozen":
        pattern = re.compile(cfg.freeze)
        frozen = [p for p in base if pattern.search(p)]
        if check and not frozen:
            raise _no_match("freeze", cfg.freeze, base)
        if check and len(frozen) == len(base):
            raise UserError(
                f"finetune.freeze={cfg.freeze!r} freezes every parameter: nothing would "
                "train; narrow the regex"
            )

        def label(path: str) -> str:
            return FROZEN if pattern.search(path) and not _special(path, extra_prefix) else TRAIN

    elif cfg.mode == "lora":
        pattern = re.compile(cfg.trainable) if cfg.trainable else None
        # The default (cls_head) may match nothing: an LM has no classification head.
        custom = pattern is not None and cfg.trainable != FinetuneConfig.trainable
        if check and custom and not any(pattern.search(p) for p in base):
            raise _no_match("trainable", cfg.trainable, base)

        def label(path: str) -> str:
            if path.startswith(extra_prefix):
                return TRAIN
            if path.startswith(lora.LORA_KEY + "/"):
                return FROZEN if path.endswith("/scale") else TRAIN
            return TRAIN if pattern is not None and pattern.search(path) else FROZEN

    else:

        def label(path: str) -> str:
            return TRAIN

    return jax.tree_util.tree_map_with_path(
        lambda p, _: label(path_str(p)), params, is_leaf=_is_box
    )


def _special(path: str, extra_prefix: str) -> bool:
    return path.startswith(extra_prefix) or path.startswith(lora.LORA_KEY + "/")


def wrap_optimizer(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """`tx` on the trainable leaves, zero updates (and no state) for the frozen ones."""
    return optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)


def train_view(params: Any, labels: Any, cfg: FinetuneConfig, rng: jax.Array | None = None) -> Any:
    """The parameters the train step applies the model to.

    Frozen leaves are put under ``stop_gradient`` (their gradients are exact zeros and
    XLA skips computing them); LoRA adapters are merged into their kernels, with LoRA
    dropout when `rng` is given. Training-only extras (``distill_*``) pass through.
    """
    params = jax.tree.map(
        lambda x, lab: jax.lax.stop_gradient(x) if lab == FROZEN else x, params, labels
    )
    if cfg.mode == "lora":
        key = None if rng is None else jax.random.fold_in(rng, _LORA_STREAM)
        params = lora.merge(params, dropout=cfg.lora_dropout, rng=key)
    return params


def count_trainable(params: Any, labels: Any | None) -> tuple[int, int]:
    """(trainable, total) parameter entries; LoRA scales are constants, not counted."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    marks = [TRAIN] * len(flat) if labels is None else jax.tree.leaves(labels)
    trainable = total = 0
    for (path, leaf), mark in zip(flat, marks, strict=True):
        p = path_str(path)
        if p.startswith(lora.LORA_KEY + "/") and p.endswith("/scale"):
            continue
        leaf = leaf.value if _is_box(leaf) else leaf
        size = int(getattr(leaf, "size", 1))
        total += size
        trainable += size if mark == TRAIN else 0
    return trainable, total


def describe(params: Any, labels: Any | None) -> str:
    """``"trainable 12,288 of 2,627,712 (0.47%)"``."""
    trainable, total = count_trainable(params, labels)
    return f"trainable {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
