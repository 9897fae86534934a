"""Transfer learning: start a task from a pretrained jaxllm workdir (`init_from=DIR`).

The source's own config (``DIR/config.yaml``) says what its checkpoint holds; its
parameters are restored straight onto this run's mesh and shardings, then merged
into the freshly initialised parameters of this run's model, leaf by leaf:

- same path, same shape: loaded (the backbone);
- only in this model: kept as initialised (a new classification head), logged;
- only in the source: left out (an LM head a classifier does not use), logged;
- same path, different shape: a one-line error naming every such parameter and
  both shapes (e.g. a different vocabulary or width), since silently keeping a
  random tensor in the middle of a pretrained network is never what a user wants.

The tokenizer travels with the weights: with ``init_from`` and no ``data.tokenizer``
the run uses ``DIR/tokenizer.model`` (see :func:`pretrained_tokenizer`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from jaxllm.checkpoint import Checkpointer
from jaxllm.errors import UserError

log = logging.getLogger(__name__)


def pretrained_tokenizer(init_from: str) -> str:
    """``DIR/tokenizer.model`` (or ``tokenizer.json``) of a pretrained workdir, or ""."""
    from jaxllm.data.tokenizer import workdir_tokenizer

    return workdir_tokenizer(init_from)


def _source_config(init_from: str, cfg: Any) -> Any:
    from jaxllm.config import load_config

    path = os.path.join(init_from, "config.yaml")
    if not os.path.isdir(init_from):
        raise UserError(f"init_from='{init_from}' is not a directory; give a trained workdir")
    if not os.path.exists(path):
        raise UserError(
            f"init_from='{init_from}' has no config.yaml; give a workdir written by "
            "`jaxllm train` or `jaxllm convert`"
        )
    src = load_config(path)
    # Only the model shape matters here; the mesh is this run's.
    src.mesh = cfg.mesh
    return src


def _path(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def load_pretrained(
    init_from: str, params: Any, abstract_params: Any, cfg: Any, mesh: Any, rules: Any
) -> tuple[Any, dict[str, list[str]]]:
    """Merges the parameters of the workdir `init_from` into freshly initialised `params`.

    Args:
      init_from: A workdir with ``config.yaml`` and ``checkpoints/``.
      params: This run's initialised parameters (sharded).
      abstract_params: Their shapes and shardings (``CompiledSteps.abstract_state.params``).
      cfg: This run's config.
      mesh: This run's mesh.
      rules: Its logical-axis rules.

    Returns:
      ``(params, report)``; report lists the ``loaded``, ``new`` (kept as initialised)
      and ``unused`` (source-only) parameter paths.

    Raises:
      UserError: For a missing workdir or checkpoint, or parameters whose shapes differ.
    """
    from jaxllm import sharding
    from jaxllm.model import build_model
    from jaxllm.step import init_checkpoint_params, model_params, strip_boxes

    src_cfg = _source_config(init_from, cfg)
    src_model = build_model(src_cfg.model)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        # A LoRA-trained source holds adapters beside its base: restored, then merged.
        boxed = jax.eval_shape(
            lambda: init_checkpoint_params(src_model, src_cfg, jax.random.PRNGKey(0))
        )
        shardings = sharding.tree_shardings(boxed, mesh, rules)
    src_abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        strip_boxes(boxed),
        shardings,
    )
    source = Checkpointer(os.path.join(init_from, "checkpoints"), async_save=False)
    try:
        src_params, step = source.restore_params(src_abstract)
    finally:
        source.close()
    src_flat = traverse_util.flatten_dict(model_params(src_params))
    dst_flat = traverse_util.flatten_dict(params)
    dst_shapes = traverse_util.flatten_dict(abstract_params)
    mismatched = [
        f"{_path(k)} {tuple(src_flat[k].shape)} -> {tuple(dst_shapes[k].shape)}"
        for k in dst_flat
        if k in src_flat and tuple(src_flat[k].shape) != tuple(dst_shapes[k].shape)
    ]
    if mismatched:
        raise UserError(
            f"init_from='{init_from}': {len(mismatched)} parameter(s) differ in shape "
            f"(source -> this model): {'; '.join(mismatched[:6])}"
            f"{' ...' if len(mismatched) > 6 else ''}; use the same model.* settings as the "
            "pretrained run (see its config.yaml)"
        )
    report = {
        "loaded": [_path(k) for k in dst_flat if k in src_flat],
        "new": [_path(k) for k in dst_flat if k not in src_flat],
        "unused": [_path(k) for k in src_flat if k not in dst_flat],
    }
    if not report["loaded"]:
        raise UserError(
            f"init_from='{init_from}' shares no parameter with this model; check model.flavour"
        )
    merged = {
        k: src_flat[k].astype(dst_flat[k].dtype) if k in src_flat else v
        for k, v in dst_flat.items()
    }
    log.info(
        "init_from %s (step %d): loaded %d parameters; initialised %d new (%s); "
        "left out %d of the source (%s)",
        init_from, step, len(report["loaded"]), len(report["new"]),
        ", ".join(report["new"]) or "-", len(report["unused"]),
        ", ".join(report["unused"]) or "-",
    )  # fmt: skip
    return traverse_util.unflatten_dict(merged), report
