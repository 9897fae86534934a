"""Grain pipeline for language modelling: token stream -> windows -> shuffle -> batch -> shard.

A split is tokenized once into one flat stream (EOS after every document, in the
data source's record order) and cut into consecutive windows of ``seq_len + 1``
tokens; window ``k`` is ``tokens[k*(seq_len+1) : (k+1)*(seq_len+1)]``. Windows
are therefore fixed by the corpus and tokenizer alone, and the seed only picks
the order in which they are visited. Random access to windows (rather than a
streaming concat-then-split) buys three things:

- a global shuffle (grain ``MapDataset.shuffle``, reseeded every epoch);
- O(1) exact resume: the iterator state is a batch index;
- process-count independence: global batch ``b`` is windows
  ``order[b*G : (b+1)*G]`` and process ``i`` of ``n`` reads only rows
  ``[i*G/n, (i+1)*G/n)`` of it. Concatenating the local batches of processes
  ``0..n-1`` gives exactly the global batch of a single process, and a state
  saved with ``n`` processes restores with any other ``n``.

Train iterators drop the final partial window and repeat forever. Eval
iterators keep it (zero-padded, weight 0), visit windows in order, pad the last
global batch with zero-weight rows and stop, so every target token of the split
is scored exactly once whatever the batch size or process count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxllm.errors import UserError

STATE_FORMAT = "jaxllm.lm_iterator/1"
# Metadata that must match for a saved state to mean the same batches.
_STATE_KEYS = ("source", "split", "seq_len", "global_batch", "seed", "shuffle", "repeat")


def tokenize_documents(tokenizer, texts: Sequence[str], eos_id: int) -> np.ndarray:
    """Encodes documents into one flat stream with `eos_id` after every document.

    Args:
      tokenizer: A :class:`jaxllm.data.tokenizer.Tokenizer`.
      texts: Documents, in a fixed order.
      eos_id: Separator appended after each document.

    Returns:
      A 1-D array, uint16 when the vocabulary fits (half the memory), else int32.
    """
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    pieces = []
    for start in range(0, len(texts), 4096):  # chunks bound the peak memory of id lists
        for ids in tokenizer.encode_batch(texts[start : start + 4096]):
            pieces.append(np.asarray([*ids, eos_id], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros([0], dtype)


class _LocalBatch:
    """Turns a global batch of window indices into this process's rows (a grain map)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, num_windows: int, lo: int, hi: int):
        self.tokens, self.seq_len, self.num_windows = tokens, seq_len, num_windows
        self.lo, self.hi = lo, hi

    def __call__(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
        span = self.seq_len + 1
        rows = np.zeros((self.hi - self.lo, span), np.int32)  # 0 is the pad id
        lengths = np.zeros(self.hi - self.lo, np.int64)
        for r, w in enumerate(np.asarray(window_ids)[self.lo : self.hi]):
            if w >= self.num_windows:
                continue  # padding row of the last eval batch
            chunk = self.tokens[int(w) * span : (int(w) + 1) * span]
            rows[r, : len(chunk)] = chunk
            lengths[r] = len(chunk)
        # Position t predicts token t+1; it counts only if that token is real.
        weights = (np.arange(self.seq_len)[None, :] < (lengths[:, None] - 1)).astype(np.float32)
        return {"inputs": rows[:, :-1], "targets": rows[:, 1:], "weights": weights}


class LMIterator:
    """Iterator of LM batches whose position can be saved and restored exactly.

    Yields dicts ``{'inputs': int32 [b, L], 'targets': int32 [b, L],
    'weights': float32 [b, L]}`` with ``b = global_batch // process_count``.

    Attributes:
      num_windows: Windows of ``seq_len + 1`` tokens in the split.
      num_batches: Global batches per pass (one epoch for train; all for eval).
      local_batch: Rows per batch on this process.
    """

    def __init__(self, dataset: grain.MapDataset, meta: dict[str, Any], read_options):
        self._dataset, self._meta, self._read_options = dataset, meta, read_options
        self._it = iter(dataset.to_iter_dataset(read_options))
        self.num_windows: int = meta["num_windows"]
        self.num_batches: int = meta["num_batches"]
        self.local_batch: int = meta["local_batch"]

    def __iter__(self) -> LMIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; the same on every process of a run."""
        meta = {k: self._meta[k] for k in _STATE_KEYS}
        return {"format": STATE_FORMAT, **meta, "grain": self._it.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state` (from :meth:`get_state`, any process count).

        Raises:
          UserError: If the state belongs to a different format, data or batch setup.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(
                f"data iterator state is not a {STATE_FORMAT} state; resume from a checkpoint "
                "written by this jaxllm version or start a fresh run"
            )
        for key in _STATE_KEYS:
            if state.get(key) != self._meta[key]:
                raise UserError(
                    f"data iterator state was saved with {key}={state.get(key)!r} but this run "
                    f"has {key}={self._meta[key]!r}; resume with the original data settings"
                )
        self._it.set_state(state["grain"])


def lm_iterator(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    shuffle: bool = True,
    repeat: bool = True,
    meta: dict[str, Any] | None = None,
    read_options: grain.ReadOptions | None = None,
) -> LMIterator:
    """Builds the sharded, checkpointable LM iterator over one token stream.

    Args:
      tokens: The split as one flat token stream (EOS-separated documents).
      seq_len: Model sequence length; windows hold ``seq_len + 1`` tokens.
      global_batch: Rows per step summed over all processes.
      process_index: This process (``jax.process_index()``).
      process_count: Number of processes (``jax.process_count()``).
      seed: Shuffle seed (any int; folded into 32 bits).
      shuffle: Visit windows in a seeded random order, reshuffled every epoch.
      repeat: Repeat forever (train); if False, one pass, last batch padded.
      meta: Names of the data (``source``, ``split``) recorded in the state.
      read_options: Grain prefetch settings (default: 1 thread, 16 batches ahead).

    Returns:
      An :class:`LMIterator`.

    Raises:
      UserError: If the batch does not divide over processes or the split is too small.
    """
    meta = dict(meta or {})
    where = f"the '{meta.get('split', '?')}' split of {meta.get('source', 'the data')}"
    if global_batch <= 0 or global_batch % process_count:
        raise UserError(
            f"global batch {global_batch} does not divide over {process_count} processes; "
            "set train.batch_size to a multiple of the process count"
        )
    if not 0 <= process_index < process_count:
        raise UserError(f"process index {process_index} is not in [0, {process_count})")
    span = seq_len + 1
    # Train drops the final partial window (every train row is full); eval keeps it.
    num_windows = len(tokens) // span if repeat else -(-len(tokens) // span)
    if num_windows == 0 or (not repeat and num_windows < global_batch):
        fix = "data.seq_len" if repeat else "train.batch_size (the eval batch) or data.seq_len"
        raise UserError(
            f"{where} has {len(tokens)} tokens = {num_windows} windows of data.seq_len+1="
            f"{span}, fewer than one batch of {global_batch if not repeat else 1}; lower {fix} "
            "or use a larger corpus"
        )
    local = global_batch // process_count
    if repeat:
        order = grain.MapDataset.range(num_windows)
        if shuffle:
            order = order.shuffle(seed % 2**32)  # grain reseeds each epoch with seed + epoch
        order = order.repeat()
        num_batches = -(-num_windows // global_batch)
    else:
        num_batches = -(-num_windows // global_batch)
        order = grain.MapDataset.range(num_batches * global_batch)  # >= num_windows: padding
        if shuffle:
            order = order.shuffle(seed % 2**32)
    lo = process_index * local
    batches = order.batch(global_batch, drop_remainder=True).map(
        _LocalBatch(tokens, seq_len, num_windows, lo, lo + local)
    )
    meta.update(
        seq_len=seq_len,
        global_batch=global_batch,
        seed=int(seed),
        shuffle=bool(shuffle),
        repeat=bool(repeat),
        num_windows=num_windows,
        num_batches=num_batches,
        local_batch=local,
    )
    meta.setdefault("source", "")
    meta.setdefault("split", "")
    read_options = read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
    return LMIterator(batches, meta, read_options)
