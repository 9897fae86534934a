"""What keeps a long run safe: preflight checks, preemption, divergence.

- `preflight_workdir` / `preflight_disk`: fail before compiling anything if the
  workdir cannot be written or cannot hold the checkpoints the run will write.
- `PreemptionWatcher`: SIGTERM (a preemptible TPU's notice) only sets a flag; the
  loop finishes the step in flight, saves a checkpoint and exits 0.
- `check_divergence`: non-finite steps are skipped inside the step; after
  `train.max_nonfinite_steps` of them in a row the run stops with a clear error and
  its last good checkpoint untouched.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from typing import Any

import jax
import numpy as np

from jaxllm.errors import UserError

log = logging.getLogger(__name__)


def preflight_workdir(workdir: str) -> None:
    """Creates `workdir` and proves a file can be written there."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(
            f"workdir '{workdir}' is not writable ({e.strerror or e}); pick another --workdir"
        ) from e


def state_bytes(abstract_state: Any) -> int:
    """Bytes of one checkpoint of `abstract_state` (all hosts together)."""
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def preflight_disk(workdir: str, abstract_state: Any, copies: int) -> None:
    """Refuses to start when the disk cannot hold `copies` checkpoints plus one in flight."""
    need = state_bytes(abstract_state) * (copies + 1)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise UserError(
            f"'{workdir}' has {free / 2**20:.0f} MiB free but {copies} checkpoints plus one "
            f"being written need about {need / 2**20:.0f} MiB; free space, lower "
            "train.keep_checkpoints, or set train.preflight_disk=false to start anyway"
        )


class PreemptionWatcher:
    """Turns SIGTERM into a flag the loop polls between steps (context manager).

    Only the main thread may install signal handlers; elsewhere (a notebook worker
    thread) the watcher is inert and SIGTERM keeps its default behaviour.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            log.warning("SIGTERM received: finishing this step, then saving a checkpoint")
        self.requested = True

    def __enter__(self) -> PreemptionWatcher:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_divergence(metrics: dict, step: int, limit: int, last_checkpoint: int | None) -> None:
    """Raises once `limit` consecutive steps were non-finite (and therefore skipped).

    Args:
      metrics: the (device) metrics of step `step`; reading them syncs with that step
        only, so the loop calls this one step late to keep the device busy.
      step: number of completed steps those metrics belong to.
      limit: `train.max_nonfinite_steps`.
      last_checkpoint: newest saved step, for the message.
    """
    streak = int(jax.device_get(metrics["nonfinite_streak"]))
    if streak >= limit:
        kept = f"step {last_checkpoint}" if last_checkpoint is not None else "none saved yet"
        raise UserError(
            f"loss or gradients were NaN/Inf for {streak} steps in a row (up to step {step}); "
            f"those steps were skipped and the last good checkpoint ({kept}) is kept; lower "
            "optim.lr, enable optim.clip_norm, or use precision=fp32, then rerun"
        )
