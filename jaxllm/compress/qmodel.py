"""The quantised model: integer kernels held by the model, activation calibration, config hook.

`model.quant` in the config picks what every attention and MLP projection does:

* ``none``: float kernels and ``lax.dot_general``.
* ``fake``: float kernels, fake-quantised in the forward pass with straight-through
  gradients (:func:`jaxllm.compress.quant.fake_quant_dot_general`): QAT.
* ``int``: the projection's ``kernel`` parameter *is* ``{"qvalue": int8, "scale":
  float32}`` (what :func:`jaxllm.compress.quant.quantize_params` makes), and the matmul is
  :func:`jaxllm.compress.quant.int8_dot_general`: int8 x int8 -> int32 for W8A8, or an
  int8-weight / float-activation dot for weight-only. The parameters in memory and in
  the checkpoint are int8, so a workdir with ``model.quant=int`` is a compressed model
  that ``jaxllm eval`` and ``jaxllm generate`` read like any other.

Embeddings, norms and the output heads stay in float, as in LLM.int8() and torchao's
defaults: they are a small share of a transformer's matmul work and the most sensitive
to rounding. With ``quant_act=static_per_tensor`` each projection also holds an
``act_scale`` scalar, set from calibration batches by :func:`calibrate_activations`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.compress.prune import path_str
from jaxllm.compress.quant import (
    QuantDotGeneral,
    calibrate_scale,
    fake_quant_dot_general,
    int8_dot_general,
    quantize_params,
)

# The kernels the model holds as integers under quant=int: attention query/key/value/out
# and the MLP's fc/gate/up/proj, in unrolled (layer_3/...) and scanned (layers/...) stacks.
QUANTIZED_KERNELS = r"(^|/)(attn|mlp)/[^/]+/kernel$"


@dataclasses.dataclass(frozen=True)
class StoredIntKernel:
    """A ``dot_general_cls`` that makes `Projection` hold an integer kernel.

    Attributes:
      act_quant: ``"dynamic_per_token"`` / ``"static_per_tensor"`` (W8A8) or None
        (weight-only).
      group_size: inputs per weight scale along the last input dim (0: per channel).
    """

    stored_kernel: ClassVar[bool] = True  # what `Projection` checks
    act_quant: str | None = "dynamic_per_token"
    group_size: int = 0

    def apply(
        self,
        module: nn.Module,
        x: jax.Array,
        n_in: int,
        features: tuple[int, ...],
        in_axes: tuple[str, ...],
        out_axes: tuple[str, ...],
    ) -> jax.Array:
        """Declares the integer kernel (and static scale) on `module` and multiplies.

        Args:
          module: the calling `Projection` (parameters are declared in its scope).
          x: activations; the last `n_in` dims are contracted.
          features: output dims.
          in_axes / out_axes: logical axis names of the kernel's dims.

        Returns:
          ``x @ kernel`` in the module's compute dtype.
        """
        shape = (*x.shape[-n_in:], *features)
        scale_shape = [1] * n_in + list(features)
        if self.group_size:  # one scale per group of the last input dim, per other index
            scale_shape = list(shape)
            scale_shape[n_in - 1] = shape[n_in - 1] // self.group_size
        # Scales keep the kernel's rank; their size-1 (or grouped) input dims are not sharded.
        scale_names = (None,) * n_in + tuple(out_axes)

        box = nn.LogicallyPartitioned  # logical names: the config's rules place them

        def init(_rng):
            return {
                "qvalue": box(jnp.zeros(shape, jnp.int8), (*in_axes, *out_axes)),
                "scale": box(jnp.ones(scale_shape, jnp.float32), scale_names),
            }

        kernel = module.param("kernel", init)
        act_scale = None
        if self.act_quant == "static_per_tensor":
            act_scale = module.param("act_scale", lambda _: box(jnp.ones((), jnp.float32), ()))
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return int8_dot_general(
            x.astype(module.dtype),
            kernel["qvalue"],
            kernel["scale"],
            (contract, ((), ())),
            act_quant=self.act_quant,
            act_scale=act_scale,
        )


@dataclasses.dataclass(frozen=True)
class HookFactory:
    """A hashable ``dot_general_cls``: equal configs give equal factories.

    Flax modules are static arguments of jitted decode loops; a ``functools.partial``
    compares by identity, so every rebuilt model would compile the loop again.
    """

    cls: type
    kwargs: tuple[tuple[str, Any], ...] = ()

    def __call__(self) -> Any:
        return self.cls(**dict(self.kwargs))


def dot_general_for(cfg: Any) -> Any:
    """The ``dot_general_cls`` a `ModelConfig`'s ``quant*`` keys ask for (None: float)."""
    act = None if cfg.quant_act == "none" else cfg.quant_act
    if cfg.quant == "fake":
        # Static per-tensor scales are a deployment choice; during QAT the per-tensor
        # activation scale follows the batch's absmax.
        kw = dict(
            weight_bits=cfg.quant_weight_bits,
            act_bits=None if act is None else 8,
            act_mode=act or "dynamic_per_token",
        )
        fake_quant_dot_general(**kw)  # validates the settings now
        return HookFactory(QuantDotGeneral, tuple(kw.items()))
    if cfg.quant == "int":
        kw = dict(act_quant=act, group_size=cfg.quant_group_size)
        return HookFactory(StoredIntKernel, tuple(kw.items()))
    return None


def quantize_model_params(params: Any, cfg: Any) -> Any:
    """Float parameters -> the parameters of the ``quant=int`` model of `cfg`.

    Args:
      params: float parameters of the same architecture.
      cfg: the target `ModelConfig` (``quant_weight_bits``, ``quant_group_size``).

    Returns:
      The tree with every attention/MLP kernel as ``{"qvalue", "scale"}``.
    """
    return quantize_params(
        params,
        cfg.quant_weight_bits,
        include=QUANTIZED_KERNELS,
        exclude=None,
        group_size=cfg.quant_group_size or None,
    )


def calibration_inputs(model: nn.Module, params: Any, batches: list[dict]) -> dict[str, list]:
    """Each projection's input activations over `batches` (float model, forward only).

    Returns:
      ``{module path: [array per batch]}``; under a scanned stack each array has a
      leading layer axis.
    """
    from jaxllm.tasks import model_kwargs

    @jax.jit
    def run(params, batch):
        _, state = model.apply(
            {"params": params}, batch["inputs"], mutable=["calibration"], **model_kwargs(batch)
        )
        return state["calibration"]

    found: dict[str, list] = {}
    for batch in batches:
        sown = run(params, batch)
        for path, leaf in jax.tree_util.tree_leaves_with_path(sown):
            # sow keeps a tuple per call: the path ends at ".../inputs/0".
            module = re.sub(r"/inputs(/\d+)?$", "", path_str(path))
            found.setdefault(module, []).append(np.asarray(leaf))
    if not found:
        raise ValueError("no projection sowed calibration inputs: is the model float?")
    return found


def calibrate_activations(
    model: nn.Module,
    params: Any,
    batches: list[dict],
    method: str = "percentile",
    percentile: float = 99.99,
    scanned: bool = False,
) -> dict[str, np.ndarray]:
    """Static per-tensor int8 activation scales, one per projection (PTQ).

    Args:
      model: the float model.
      params: its parameters.
      batches: calibration batches (``inputs`` and the task's model inputs).
      method: ``absmax``, ``percentile`` or ``mse`` (see ``calibrate_scale``).
      percentile: for ``percentile``.
      scanned: the model scans its layers (one scale per layer of the stack).

    Returns:
      ``{module path: scale}``; a scalar, or ``[n_layers]`` for a scanned stack.
    """
    scales = {}
    for module, arrays in calibration_inputs(model, params, batches).items():
        if scanned and module.split("/")[0] == "layers":
            per_layer = [[a[i] for a in arrays] for i in range(arrays[0].shape[0])]
            scales[module] = np.stack(
                [np.asarray(calibrate_scale(s, method, percentile=percentile)) for s in per_layer]
            )
        else:
            scales[module] = np.asarray(calibrate_scale(arrays, method, percentile=percentile))
    return scales


def attach_act_scales(qparams: Any, scales: dict[str, np.ndarray]) -> Any:
    """Adds each projection's calibrated ``act_scale`` next to its integer kernel."""
    out = jax.tree.map(lambda x: x, qparams)  # a copy whose dicts may be edited

    def visit(node, prefix):
        for key, value in list(node.items()):
            path = f"{prefix}/{key}" if prefix else key
            if path in scales:
                node[key] = {**value, "act_scale": jnp.asarray(scales[path], jnp.float32)}
            elif isinstance(value, dict):
                visit(value, path)

    visit(out, "")
    missing = set(scales) - _module_paths(out)
    if missing:
        raise ValueError(f"calibrated modules not in the parameters: {sorted(missing)[:3]}")
    return out


def _module_paths(tree: Any, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            paths.add(path)
            paths |= _module_paths(value, path)
    return paths
