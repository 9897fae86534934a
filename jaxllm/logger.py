"""Metrics sinks: `metrics.jsonl` (the CLI contract) and TensorBoard event files.

Only process 0 writes, so a multi-host run produces one log. Every record is one
JSON object per logged step, flushed at once, so a killed run keeps what it logged.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

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

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
