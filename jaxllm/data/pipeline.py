"""Grain pipelines: :func:`make_task_iterator` for every task, :func:`lm_iterator` for LM windows.

:func:`make_task_iterator` is the entry point. With ``data.pack=False`` and
``task=lm`` it builds the windowed LM iterator described below; otherwise the
example pipeline of :mod:`jaxllm.data.packing` (task formats in
:mod:`jaxllm.data.formats`, augmentation in :mod:`jaxllm.data.augment`).

The windowed LM pipeline: token stream -> windows -> shuffle -> batch -> shard.

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

import atexit
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from jaxllm.data.augment import Augmenter
from jaxllm.data.formats import TASKS, LengthLimits, LengthStats, record_texts
from jaxllm.data.packing import MIN_PACK_ROWS, EpochOrder, ExampleStream, PackedBatches
from jaxllm.errors import UserError

log = logging.getLogger("jaxllm.data")

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


def _check_state(state: Any, fmt: str, meta: dict, keys: Sequence[str]) -> None:
    """Raises a one-line UserError unless `state` is a `fmt` state of the same data setup."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise UserError(
            f"data iterator state is not a {fmt} state; resume from a checkpoint "
            "written by this jaxllm version with the same data settings, or start a fresh run"
        )
    for key in keys:
        if state.get(key) != meta[key]:
            raise UserError(
                f"data iterator state was saved with {key}={state.get(key)!r} but this run "
                f"has {key}={meta[key]!r}; resume with the original data settings"
            )


def _check_processes(global_batch: int, process_index: int, process_count: int) -> None:
    if global_batch <= 0 or global_batch % process_count:
        raise UserError(
            f"global batch {global_batch} does not divide over {process_count} processes; "
            "set train.batch_size to a multiple of the process count"
        )
    if not 0 <= process_index < process_count:
        raise UserError(f"process index {process_index} is not in [0, {process_count})")


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
        _check_state(state, STATE_FORMAT, self._meta, _STATE_KEYS)
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
    _check_processes(global_batch, process_index, process_count)
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


# ----------------------------------------------------------------------------- every task

TASK_STATE_FORMAT = "jaxllm.task_iterator/1"
# Everything that fixes which batches a state means (the process count is not one).
_TASK_STATE_KEYS = (
    "source", "split", "task", "seq_len", "global_batch", "seed", "shuffle", "repeat",
    "pack", "num_bins", "length_policy", "max_source_len", "max_target_len",
    "history_turns", "num_records", "tokenizer", "augment",
)  # fmt: skip


# grain's prefetch iterator stops its thread in __del__, which fails once the
# interpreter has torn modules down; iterators still alive are closed at exit instead.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        it.close()


class TaskIterator:
    """Iterator of task batches (see :mod:`jaxllm.data.packing`) with exact resume.

    Yields dicts of numpy arrays with ``b = global_batch // process_count`` rows:
    ``inputs``, ``targets``, ``positions``, ``segment_ids`` (int32 [b, L]),
    ``weights`` (float32 [b, L]), plus ``prefix_mask`` (bool [b, L]) for
    translate/dialogue and ``label`` (int32 [b], -1 on padding rows) for classify.
    A background thread keeps ``prefetch`` batches ready.

    Attributes:
      local_batch: Rows per batch on this process.
      num_records: Records in the split.
    """

    def __init__(self, core: PackedBatches, meta: dict[str, Any], prefetch: int):
        self._core, self._meta = core, meta
        self._it = (
            grain.experimental.ThreadPrefetchDatasetIterator(core, prefetch) if prefetch else core
        )
        self._done = False
        _LIVE.add(self)
        self.local_batch: int = meta["local_batch"]
        self.num_records: int = meta["num_records"]

    def __iter__(self) -> TaskIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done:  # the prefetch thread has ended; do not wait on it again
            raise StopIteration
        try:
            return next(self._it)
        except StopIteration:
            self._done = True
            raise

    @property
    def stats(self) -> dict[str, Any]:
        """What the pipeline did so far on this process (prefetched batches included).

        Keys: the :class:`jaxllm.data.formats.LengthStats` counts (``examples``,
        ``truncated``, ``dropped``, ``split``, ``pieces``, ``tokens_removed``) and
        ``packing_efficiency``, the non-padding share of the positions built.
        """
        c = self._core
        eff = c.tokens_real / c.tokens_total if c.tokens_total else 0.0
        return {**c.stream.stats.counts, "packing_efficiency": eff}

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position; the same on every process of a run."""
        meta = {k: self._meta[k] for k in _TASK_STATE_KEYS}
        return {"format": TASK_STATE_FORMAT, **meta, "position": dict(self._it.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state` (from :meth:`get_state`, any process count).

        Raises:
          UserError: If the state belongs to a different format, data or batch setup.
        """
        _check_state(state, TASK_STATE_FORMAT, self._meta, _TASK_STATE_KEYS)
        self._it.set_state(state["position"])
        self._done = False

    def close(self) -> None:
        """Stops the prefetch thread; later batches are made without prefetching."""
        if self._it is not self._core:
            state = self._it.get_state()
            self._it.close()
            # Dropped now, so grain's __del__ runs while its modules still exist.
            self._it = self._core
            self._core.set_state(state)


def make_task_iterator(
    cfg,
    tokenizer,
    records: Sequence[dict],
    split: str,
    task: str,
    global_batch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    shuffle: bool | None = None,
    repeat: bool | None = None,
    back_translate: Callable[[list[str]], list[str]] | None = None,
    synonyms: Mapping[str, Sequence[str]] | None = None,
    prefetch: int = 2,
) -> TaskIterator | LMIterator:
    """Batches of one split of one task for this process.

    ``task=lm`` with ``data.pack=False`` gives the windowed :class:`LMIterator`
    (documents concatenated and cut into ``seq_len + 1`` windows); everything else
    the example pipeline (:class:`TaskIterator`): classify always one example per
    row (its ``label`` is per row), the others first-fit packed when
    ``data.pack=True``. Concatenating the local batches of processes
    ``0..process_count-1`` gives the batch of a single process, and a state saved
    with any process count restores with any other.

    Args:
      cfg: The experiment config (`data.*`, `train.seed`, `model.num_classes`).
      tokenizer: A :class:`jaxllm.data.tokenizer.Tokenizer`.
      records: The split's canonical records (see :mod:`jaxllm.data.formats`),
        random access.
      split: Split name; `data.train_split` is shuffled, repeated and augmented.
      task: ``lm``, ``classify``, ``translate`` or ``dialogue``.
      global_batch: Rows per step over all processes.
      process_index: ``jax.process_index()``.
      process_count: ``jax.process_count()``.
      seed: Shuffle seed; defaults to `train.seed`.
      shuffle: Defaults to True for the train split, else False.
      repeat: Defaults to True for the train split (forever), else False (one pass,
        last batch padded with empty rows).
      back_translate: translate: reverse-model hook for `data.augment.back_translate`.
      synonyms: Synonym table for `data.augment.synonym` (default: the built-in one).
      prefetch: Batches prepared ahead by a background thread (0 = none).

    Returns:
      An iterator with ``get_state()`` / ``set_state(state)``.

    Raises:
      UserError: For an unknown task, an empty split, a malformed record, an
        indivisible batch or settings that do not fit the task.
    """
    d = cfg.data
    is_train = split == d.train_split
    seed = cfg.train.seed if seed is None else seed
    shuffle = is_train if shuffle is None else bool(shuffle)
    repeat = is_train if repeat is None else bool(repeat)
    where = f"the '{split}' split of {d.source}"
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; valid tasks: {', '.join(TASKS)}")
    _check_processes(global_batch, process_index, process_count)
    if len(records) == 0:
        raise UserError(f"{where} has no records; check data.source and data.fields")
    augmenter = None
    if is_train:
        augmenter = Augmenter(d.augment, synonyms=synonyms, back_translate=back_translate)
    if task == "lm" and not d.pack:
        if augmenter is not None and augmenter.active:
            raise UserError(
                "data.augment needs documents, but task=lm with data.pack=false cuts one "
                "token stream into windows; set data.pack=true or turn augmentation off"
            )
        texts = [record_texts("lm", r, i, 0)[0] for i, r in enumerate(records)]
        return lm_iterator(
            tokenize_documents(tokenizer, texts, tokenizer.eos_id),
            seq_len=d.seq_len,
            global_batch=global_batch,
            process_index=process_index,
            process_count=process_count,
            seed=seed,
            shuffle=shuffle,
            repeat=repeat,
            meta={"source": d.source, "split": split},
        )
    pack = d.pack and task != "classify"
    if d.pack and task == "classify":
        log.info("task=classify puts one example per row (its label is per row); "
                 "data.pack is not used")  # fmt: skip
    limits = LengthLimits.from_config(d, task)
    n = len(records)
    stream = ExampleStream(
        records,
        task,
        tokenizer,
        limits,
        order=EpochOrder(n, seed, shuffle),
        repeat=repeat,
        augmenter=augmenter,
        history_turns=d.history_turns,
        num_classes=cfg.model.num_classes,
        stats=LengthStats(where=f"{where} (task={task})"),
    )
    # A multiple of the batch, so that a batch never straddles two packs.
    num_bins = global_batch * -(-MIN_PACK_ROWS // global_batch) if pack else global_batch
    local = global_batch // process_count
    lo = process_index * local
    core = PackedBatches(
        stream,
        global_batch=global_batch,
        num_bins=num_bins,
        lo=lo,
        hi=lo + local,
        seq_len=d.seq_len,
        pack=pack,
        with_prefix=task in ("translate", "dialogue"),
        with_label=task == "classify",
    )
    meta = {
        "source": d.source,
        "split": split,
        "task": task,
        "seq_len": d.seq_len,
        "global_batch": global_batch,
        "seed": int(seed),
        "shuffle": shuffle,
        "repeat": repeat,
        "pack": pack,
        "num_bins": num_bins,
        "length_policy": limits.policy,
        "max_source_len": limits.max_source,
        "max_target_len": limits.max_target,
        "history_turns": d.history_turns,
        "num_records": n,
        "tokenizer": getattr(tokenizer, "fingerprint", ""),
        "augment": augmenter.config_id() if augmenter and augmenter.active else None,
        "local_batch": local,
    }
    return TaskIterator(core, meta, prefetch)
