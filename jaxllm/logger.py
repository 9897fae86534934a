"""Metrics sinks: `metrics.jsonl` (the CLI contract), TensorBoard event files, traces.

Only process 0 writes, so a multi-host run produces one log. Every record is one
JSON object per logged step, flushed at once, so a killed run keeps what it logged.

Every ``train.histogram_every`` steps TensorBoard also gets the parameters themselves
(:func:`param_summaries`): a histogram per parameter, the fraction of exact zeros of
each prunable kernel (pruning progress), and the range of the quantisation scales
(stored int8 kernel and activation scales; under QAT the per-channel scales the
fake-quantiser derives from the weights). :class:`StepProfiler` captures a
``jax.profiler`` trace of ``train.profile_steps`` steps into ``WORKDIR/profile/``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from jaxllm.errors import UserError


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep the information as text
    return value


class MetricsLogger:
    """Appends step records to `<workdir>/metrics.jsonl` and TensorBoard scalars."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.primary = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tensorboard")
        # Held open for the whole run (closed in close()); appends survive a restart.
        self._file = open(self.path, "a", encoding="utf-8") if self.primary else None  # noqa: SIM115
        self._tb = None
        self._tensorboard = tensorboard
        if tensorboard and self.primary:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Logs one record; `step` is the number of completed optimizer steps."""
        if not self.primary:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            raise UserError(
                f"writing '{self.path}' failed ({e.strerror or e}); free disk space, then "
                "rerun the same command to resume from the last checkpoint"
            ) from e
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def write_params(self, step: int, params: Any, model_cfg: Any = None) -> None:
        """Logs :func:`param_summaries` of `params` to TensorBoard at `step`.

        Every process must call it (a multi-host run gathers the sharded parameters
        with a collective); only process 0 writes.
        """
        if not self._tensorboard:
            return
        host = _gather_to_host(params)
        if self._tb is None:
            return
        histograms, scalars = param_summaries(host, model_cfg)
        for tag, values in histograms.items():
            self._tb.add_histogram(tag, values, step)
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _gather_to_host(params: Any) -> Any:
    """`params` as host numpy arrays (all-gathered across processes when sharded)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def param_summaries(params: Any, model_cfg: Any = None) -> tuple[dict, dict]:
    """Histograms and scalars that describe a parameter tree.

    Args:
      params: host parameters (plain pytree of arrays).
      model_cfg: the `ModelConfig`; with ``quant=fake`` (QAT) the per-channel weight
        scales the fake-quantiser would use are summarised too.

    Returns:
      ``(histograms, scalars)``: ``{"params/PATH": values}`` for every leaf, and
      ``sparsity/PATH`` (fraction of exact zeros of each prunable kernel, plus
      ``sparsity/total``), ``quant/MODULE/{weight,act}_scale_{min,max,mean}``.
    """
    from jaxllm.compress.prune import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, path_str, selected

    histograms: dict[str, np.ndarray] = {}
    scalars: dict[str, float] = {}
    zeros = size = 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path, arr = path_str(key_path), np.asarray(leaf)
        histograms[f"params/{path}"] = arr.astype(np.float64).ravel()
        if selected(path, DEFAULT_INCLUDE, DEFAULT_EXCLUDE) and arr.size:
            n_zero = int(arr.size - np.count_nonzero(arr))
            scalars[f"sparsity/{path}"] = n_zero / arr.size
            zeros, size = zeros + n_zero, size + arr.size
        if path.endswith("kernel/scale"):  # an int8 kernel's stored scales
            scalars.update(_range(f"quant/{path[: -len('/kernel/scale')]}/weight_scale", arr))
        elif path.endswith("/act_scale"):  # a calibrated static activation scale
            scalars.update(_range(f"quant/{path[: -len('/act_scale')]}/act_scale", arr))
    if size:
        scalars["sparsity/total"] = zeros / size
    if model_cfg is not None and model_cfg.quant == "fake":
        scalars.update(_qat_weight_scales(params, model_cfg.quant_weight_bits))
    return histograms, scalars


def _range(tag: str, values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {
        f"{tag}_min": float(v.min()),
        f"{tag}_max": float(v.max()),
        f"{tag}_mean": float(v.mean()),
    }


def _qat_weight_scales(params: Any, bits: int) -> dict[str, float]:
    """The per-output-channel scales (absmax / qmax) QAT quantises each kernel with."""
    import re

    from jaxllm.compress.prune import kernel_layout, path_str
    from jaxllm.compress.qmodel import QUANTIZED_KERNELS
    from jaxllm.compress.quant import qmax

    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(key_path)
        if not re.search(QUANTIZED_KERNELS, path):
            continue
        arr = np.abs(np.asarray(leaf, np.float32))
        lead, n_in = kernel_layout(path, arr.ndim)
        amax = arr.max(axis=tuple(range(lead, lead + n_in)))
        scale = np.where(amax > 0, amax / qmax(bits), 1.0)
        out.update(_range(f"quant/{path[: -len('/kernel')]}/weight_scale", scale))
    return out


class StepProfiler:
    """Traces steps ``[start, start + steps)`` with ``jax.profiler`` into ``DIR/profile``.

    The trace opens in TensorBoard's profile plugin (``tensorboard --logdir
    DIR/profile``, with ``tensorboard-plugin-profile`` / xprof installed). Start after
    the first step so the trace shows steady-state steps, not the compile.
    """

    def __init__(self, workdir: str, start: int, steps: int):
        self.dir = os.path.join(workdir, "profile")
        self.start, self.stop = start, start + steps
        self.enabled, self.active = steps > 0, False

    def before_step(self, step: int) -> None:
        """Called with the index of the step about to run (completed steps so far)."""
        if self.enabled and not self.active and step == self.start:
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after_step(self, done: int, outputs: Any) -> None:
        """Called after a step; ends the trace once `done` reaches the last traced step."""
        if self.active and done >= self.stop:
            jax.block_until_ready(outputs)  # the traced steps' device work belongs in it
            self.close()

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Ends an open trace (a run that stops inside the traced window)."""
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
