"""A cache of the teacher's top-k logits: the teacher runs once, not in every step.

Distilling from a large teacher costs a teacher forward per student step. When the
same student (or several students, or a resumed run) trains on the same batches, the
teacher's answers can be computed once and read back: only the k largest logits per
position are kept (values and indices) with the log-normaliser of the tempered
logits, which is what sparse/cached distillation needs (`distill.topk_kl_sum`: the
top-k plus the rest of the teacher's mass as one bucket).

The training data pipeline is deterministic (seeded grain/LM iterators), so training
step ``i`` sees the ``i``-th batch of a fresh iterator: the cache is indexed by step.
Each process stores its own rows (its slice of every global batch) under
``DIR/process_NNN/`` as ``.npy`` files read by memory map, plus a copy of the input
tokens, so a batch that does not match what the cache was built from (the data or
batch settings changed) is a clear error instead of silently wrong targets.
``meta.json`` is written last: a build that was interrupted is rebuilt, not trusted.

Size: ``steps * local_batch * seq_len * (k * 8 + 4)`` bytes (float32 values and
log-normaliser, int32 indices); lm_tiny's 300 steps with k = 16 hold 81 MB.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxllm import sharding, tasks
from jaxllm.compress.distill import teacher_topk
from jaxllm.compress.distill_step import TOPK_INDICES, TOPK_LSE, TOPK_VALUES
from jaxllm.errors import UserError

log = logging.getLogger(__name__)

META = "meta.json"


def _process_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, f"process_{jax.process_index():03d}")


class TopKCache:
    """The teacher's top-k logits of every training step of this process (read-only).

    Attributes:
      values: [steps, local_batch, ..., k] float32 memory map.
      indices: [steps, local_batch, ..., k] int32 memory map.
      lse: [steps, local_batch, ...] float32 ``logsumexp(teacher logits / T)``.
      inputs: [steps, local_batch, seq_len] the input tokens each row was computed on.
    """

    def __init__(self, path: str):
        self.path = path
        self.values = np.load(os.path.join(path, "values.npy"), mmap_mode="r")
        self.indices = np.load(os.path.join(path, "indices.npy"), mmap_mode="r")
        self.lse = np.load(os.path.join(path, "lse.npy"), mmap_mode="r")
        self.inputs = np.load(os.path.join(path, "inputs.npy"), mmap_mode="r")

    @property
    def steps(self) -> int:
        return self.values.shape[0]

    def batch_extras(self, step: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The cached top-k for training step `step`, after checking its input tokens.

        Raises:
          UserError: the step is past the cache, or the batch is not the one cached.
        """
        if step >= self.steps:
            raise UserError(
                f"the teacher cache in {self.path} holds {self.steps} steps, not step "
                f"{step}; delete it to rebuild for train.steps={step + 1} or more"
            )
        if not np.array_equal(np.asarray(batch["inputs"]), self.inputs[step]):
            raise UserError(
                f"step {step}'s batch is not the one the teacher cache in {self.path} was "
                "built from (data or batch settings changed); delete the cache to rebuild it"
            )
        return {TOPK_VALUES: np.asarray(self.values[step]),
                TOPK_INDICES: np.asarray(self.indices[step]),
                TOPK_LSE: np.asarray(self.lse[step])}  # fmt: skip


def _read_meta(path: str) -> dict | None:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _teacher_topk_fn(
    model: nn.Module, params: Any, k: int, temperature: float, mesh: Any, rules: Any
) -> Callable:
    """jit(batch -> (values, indices, lse)) of the teacher, batch-sharded like training."""
    batch_sh = sharding.batch_sharding(mesh, rules, ndim=1)

    def forward(p, batch):
        logits = model.apply({"params": p}, batch["inputs"], **tasks.model_kwargs(batch))
        return teacher_topk(logits, k, temperature)

    fn = jax.jit(
        forward,
        in_shardings=(jax.tree.map(lambda x: x.sharding, params), batch_sh),
        out_shardings=batch_sh,
    )

    def run(batch):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return fn(params, batch)

    return run, batch_sh.spec


def build_topk_cache(
    session: Any,
    model: nn.Module,
    params: Any,
    k: int,
    temperature: float,
    steps: int,
    cache_dir: str,
) -> TopKCache:
    """Runs the teacher over the first `steps` training batches; stores its top-k.

    A complete cache with the same settings already in `cache_dir` is reused (a resumed
    or repeated run pays for the teacher once).

    Args:
      session: the *student's* training session (its data, mesh and batch settings).
      model: the teacher's Flax module.
      params: the teacher's parameters, placed on the session's devices.
      k: how many of the largest logits to keep per position (<= the output size).
      temperature: the distillation temperature (the stored log-normaliser uses it).
      steps: training steps to cover.
      cache_dir: where to store it (each process in its own subfolder).

    Returns:
      The cache, opened read-only.
    """
    from jaxllm.evaluation import batch_iterator

    cfg, cs = session.cfg, session.steps
    path = _process_dir(cache_dir)
    want = {"k": k, "temperature": temperature, "steps": steps, "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len, "source": cfg.data.source, "seed": cfg.train.seed,
            "process_count": jax.process_count()}  # fmt: skip
    if _read_meta(path) == want:
        log.info("teacher top-%d cache: reusing %s", k, path)
        return TopKCache(path)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, META)):
        os.remove(os.path.join(path, META))  # stale settings: the files below are rewritten
    run, spec = _teacher_topk_fn(model, params, k, temperature, cs.mesh, cs.rules)
    it = batch_iterator(session, cfg.data.train_split, train=True)
    files: dict[str, np.ndarray] = {}
    for step in range(steps):
        local = next(it)
        out = run(sharding.make_global_batch(local, cs.mesh, cs.rules))
        # Each process keeps the rows it will feed: its slice of the global batch.
        values, indices, lse = multihost_utils.global_array_to_host_local_array(out, cs.mesh, spec)
        arrays = {"values": np.asarray(values, np.float32),
                  "indices": np.asarray(indices, np.int32),
                  "lse": np.asarray(lse, np.float32),
                  "inputs": np.asarray(local["inputs"])}  # fmt: skip
        if not files:
            files = {
                name: np.lib.format.open_memmap(
                    os.path.join(path, f"{name}.npy"), "w+", a.dtype, (steps, *a.shape)
                )
                for name, a in arrays.items()
            }
        for name, a in arrays.items():
            files[name][step] = a
        if (step + 1) % 100 == 0:
            log.info("teacher top-%d cache: %d/%d steps", k, step + 1, steps)
    for f in files.values():
        f.flush()
    del files
    with open(os.path.join(path, META), "w") as f:
        json.dump(want, f)
    return TopKCache(path)


def topk_cache_hook(
    model: nn.Module, params: Any, k: int, temperature: float, cache_dir: str
) -> Callable:
    """`StepHooks.batch_extras`: session -> (step, batch -> the cached top-k arrays).

    The cache is built (or reused) when training starts, for the run's ``train.steps``.
    """

    def prepare(session: Any) -> Callable[[int, dict], dict]:
        cache = build_topk_cache(
            session, model, params, k, temperature, session.cfg.train.steps, cache_dir
        )
        return cache.batch_extras

    return prepare
