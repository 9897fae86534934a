"""Device mesh, logical-axis rules, and the shardings of params, optimizer state and batches.

The model names axes logically (`embed`, `heads`, ...); the config's rules table maps
those names to mesh axes (`data`, `fsdp`, `tensor`). This file is the only place that
turns names into `NamedSharding`s, so transforms (pruning, quantisation, distillation)
never see devices and the mesh never sees a transform.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxllm.config import MESH_AXES, DistributedConfig, MeshConfig
from jaxllm.errors import UserError

log = logging.getLogger(__name__)

Rules = list[tuple[str, Any]]


def init_distributed(cfg: DistributedConfig) -> None:
    """Starts the multi-controller runtime when several processes are configured.

    On Cloud TPU, `jax.distributed.initialize()` needs no arguments; on CPU/GPU the
    coordinator address, process count and id come from the config (or the launcher).
    `distributed.num_processes=-1` ("ask the cluster"; also any count > 1 with no
    coordinator) calls it without arguments: JAX reads the cluster's own variables
    (Cloud TPU metadata, SLURM inside `srun`, Open MPI). launch/tpu_vm.sh and
    launch/slurm.sbatch pass -1. A multi-host TPU slice computes without it, but Orbax
    needs the distributed client to save checkpoints from several processes.
    """
    if cfg.num_processes == 0 or cfg.num_processes < -1:
        raise UserError(
            f"distributed.num_processes={cfg.num_processes} is invalid; use the process "
            "count, or -1 to take it from the cluster (Cloud TPU, SLURM, Open MPI)"
        )
    if cfg.num_processes == 1 and not cfg.coordinator:
        return
    if jax.distributed.is_initialized():
        return
    if not cfg.coordinator:
        jax.distributed.initialize()
        return
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    auto = cfg.num_processes == -1  # count and rank from the cluster, coordinator given
    jax.distributed.initialize(
        cfg.coordinator,
        num_processes=None if auto else cfg.num_processes,
        process_id=None if auto else cfg.process_id,
    )


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolves the -1 entry ("the rest") and checks the product equals the device count."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise UserError(f"mesh.{name}={size} is invalid; use a positive size or -1 (the rest)")
    if sizes.count(-1) > 1:
        raise UserError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(
                f"mesh {sizes} does not divide {n_devices} devices: the fixed axes multiply "
                f"to {known}; choose sizes whose product divides {n_devices}"
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(
            f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs "
            f"{math.prod(sizes)} devices but {n_devices} are available; "
            "set one axis to -1 or make the product equal the device count"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh over `devices` (default: all devices)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    # Auto axes: the compiler propagates shardings from our logical constraints.
    return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * 3, devices=devices)


def logical_rules(cfg: MeshConfig) -> Rules:
    """The rules table as Flax expects it: (logical name, mesh axis | tuple | None)."""
    rules = []
    for logical, target in cfg.rules.items():
        rules.append((logical, tuple(target) if isinstance(target, list) else target))
    return rules


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Replicates any dimension that its mesh axes do not divide (e.g. 2 KV heads, 4-way)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
        size = math.prod(mesh.shape[a] for a in names)
        if size > 1 and dim % size:
            log.warning("dimension %d not divisible by mesh axes %s: replicated", dim, names)
            axes = None
        fitted.append(axes)
    return PartitionSpec(*fitted)


def tree_shardings(boxed_shapes: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (possibly logically boxed) abstract arrays."""
    specs = nn.get_partition_spec(boxed_shapes)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = jax.tree.map(
        lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
        boxed_shapes,
        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata),
    )
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit_spec(spec, x.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def opt_state_shardings(
    tx: optax.GradientTransformation,
    opt_shapes: Any,
    params_shapes: Any,
    param_shardings: Any,
    mesh: Mesh,
) -> Any:
    """Shards each optimizer-state leaf like its parameter when shapes match, else replicates.

    Adam moments mirror the parameters; Adafactor's factored row/column statistics do
    not, and counters are scalars: those are small, so replicating them costs nothing.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(state_leaf, param_shape, sharding):
        if isinstance(state_leaf, optax.MaskedNode):
            return state_leaf  # an empty node (a masked-out parameter): nothing to place
        if getattr(state_leaf, "shape", None) == param_shape.shape:
            return sharding
        return replicated

    if _has_partition(opt_shapes):
        # optax.multi_transform (jaxllm.finetune) builds its state from the parameters'
        # labels, which tree_map_params's placeholder parameters cannot stand in for.
        return _opt_shardings_by_path(opt_shapes, params_shapes, param_shardings, replicated)
    with _eager_host_context(mesh):
        return optax.tree_map_params(
            tx,
            pick,
            opt_shapes,
            params_shapes,
            param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )


def _eager_host_context(mesh: Mesh) -> Any:
    """Where eager ops run while `mesh` is the ambient mesh.

    tree_map_params calls `tx.init` eagerly on placeholder parameters (its step counters
    are real arrays). A mesh of compile-only devices (a TPU topology compiled ahead of
    time by `jaxllm plan`) cannot run them, so they run on a host CPU device instead.
    """
    client = mesh.devices.flat[0].client
    if "CompileOnly" not in type(client).__name__:
        return contextlib.nullcontext()
    return jax.set_mesh(Mesh(np.asarray(jax.local_devices(backend="cpu")[:1]), ("host",)))


def _has_partition(opt_state: Any) -> bool:
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.PartitionState))
    return any(isinstance(x, optax.PartitionState) for x in nodes)


def _opt_shardings_by_path(
    opt_shapes: Any, params_shapes: Any, param_shardings: Any, replicated: NamedSharding
) -> Any:
    """Shards a state leaf like the parameter whose path ends its own, if shapes match."""
    from jaxllm.compress.prune import path_str

    by_path = {}
    for (path, shape), sh in zip(
        jax.tree_util.tree_leaves_with_path(params_shapes),
        jax.tree.leaves(param_shardings),
        strict=True,
    ):
        by_path[path_str(path)] = (shape.shape, sh)

    def pick(path, leaf):
        if isinstance(leaf, optax.MaskedNode):
            return leaf
        parts = path_str(path).split("/")
        for i in range(len(parts)):
            found = by_path.get("/".join(parts[i:]))
            if found is not None and found[0] == getattr(leaf, "shape", None):
                return found[1]
        return replicated

    return jax.tree_util.tree_map_with_path(
        pick, opt_shapes, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input array: batch split, the rest replicated."""
    spec = nn.logical_to_mesh(PartitionSpec("batch", *([None] * (ndim - 1))), rules)
    return NamedSharding(mesh, spec)


def batch_ways(mesh: Mesh, rules: Rules) -> int:
    """How many shards the batch dimension is split into (a batch must divide by it)."""
    spec = batch_sharding(mesh, rules).spec[0]
    names = spec if isinstance(spec, tuple) else (spec,) if spec else ()
    return math.prod(mesh.shape[a] for a in names)


def check_batch_divides(global_batch: int, mesh: Mesh, rules: Rules) -> None:
    ways = batch_ways(mesh, rules)
    if global_batch % ways:
        raise UserError(
            f"train.batch_size={global_batch} is not divisible by the {ways} batch shards of "
            f"the mesh; use a multiple of {ways}"
        )
    if global_batch % jax.process_count():
        raise UserError(
            f"train.batch_size={global_batch} is not divisible by {jax.process_count()} processes"
        )


def make_global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict:
    """Assembles each host's slice of the batch into global jax.Arrays.

    Every process passes only the rows it read; the result is one logical batch spread
    over all devices of all hosts.
    """
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
        for k, v in local.items()
    }


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
