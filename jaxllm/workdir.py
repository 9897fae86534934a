"""Reading a trained workdir back: its config fitted to this machine, its latest parameters.

`jaxllm eval`, `jaxllm generate` and `jaxllm eval --compare` may run where training
did not (fewer or more devices), so the mesh is refitted and the eval batch rounded
to the batch shards; the workdir's own tokenizer copy is always used.
"""

from __future__ import annotations

import os
from typing import Any

from jaxllm.errors import UserError


def workdir_config(workdir: str, overrides: list[str]) -> Any:
    """The resolved config of a trained `workdir`, with `overrides` applied.

    Raises:
      UserError: If `workdir` has no config.yaml.
    """
    from jaxllm.config import load_config

    path = os.path.join(workdir, "config.yaml")
    if not os.path.exists(path):
        raise UserError(
            f"'{workdir}' has no config.yaml; run `jaxllm train ... --workdir {workdir}`"
        )
    cfg = load_config(path, overrides)
    if not any(o.startswith("mesh.") for o in overrides):
        fit_mesh_to_devices(cfg)
    from jaxllm.data.tokenizer import workdir_tokenizer

    tokenizer = workdir_tokenizer(workdir)
    if tokenizer:
        cfg.data.tokenizer = tokenizer
    # The weights are already in the checkpoint: no second load from a pretrained source.
    cfg.init_from = ""
    return cfg


def fit_mesh_to_devices(cfg: Any) -> None:
    """Eval/generate may run where training did not: let `data` absorb the device count.

    The fsdp/tensor split is kept when it divides the devices here (a large model still
    needs it to fit); otherwise everything becomes data parallel.
    """
    import jax

    n = jax.device_count()
    model_ways = max(cfg.mesh.fsdp, 1) * max(cfg.mesh.tensor, 1)
    if cfg.mesh.fsdp == -1 or cfg.mesh.tensor == -1 or n % model_ways:
        cfg.mesh.fsdp, cfg.mesh.tensor, model_ways = 1, 1, 1
    cfg.mesh.data = -1
    # The eval batch must split over the batch shards; padding rows carry no weight.
    batch_ways = n // max(cfg.mesh.tensor, 1)
    cfg.train.batch_size = -(-cfg.train.batch_size // batch_ways) * batch_ways


def restore_params(workdir: str, cfg: Any, devices: Any = None) -> tuple[Any, Any, int]:
    """Builds the session of `cfg` and restores the latest parameters of `workdir`.

    Args:
      workdir: A trained workdir.
      cfg: Its config (from :func:`workdir_config`).
      devices: Devices of the mesh (default: all).

    Returns:
      ``(session, params, step)``.
    """
    from jaxllm.train import build_session

    if cfg.finetune.mode == "lora":
        return _restore_merged(workdir, cfg, devices)
    session = build_session(cfg, workdir, devices)
    params, step = session.checkpointer.restore_params(session.steps.abstract_state.params)
    return session, params, step


def _restore_merged(workdir: str, cfg: Any, devices: Any) -> tuple[Any, Any, int]:
    """A LoRA workdir: restores base and adapters, returns the merged (plain) model.

    The session is built for the merged model (``finetune.mode=full``), so everything
    that restores a workdir -- eval, generate, a compression teacher -- sees one model.
    """
    import dataclasses

    import flax.linen as nn
    import jax

    from jaxllm import sharding
    from jaxllm.config import FinetuneConfig
    from jaxllm.step import init_checkpoint_params, model_params, strip_boxes
    from jaxllm.train import build_session

    session = build_session(dataclasses.replace(cfg, finetune=FinetuneConfig()), workdir, devices)
    cs = session.steps
    with jax.set_mesh(cs.mesh), nn.logical_axis_rules(cs.rules):
        boxed = jax.eval_shape(
            lambda: init_checkpoint_params(session.model, cfg, jax.random.PRNGKey(0))
        )
        shardings = sharding.tree_shardings(boxed, cs.mesh, cs.rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        strip_boxes(boxed),
        shardings,
    )
    restored, step = session.checkpointer.restore_params(abstract)
    merge = jax.jit(model_params, out_shardings=cs.state_shardings.params)
    return session, merge(restored), step
