"""Example pipeline: records -> (augment) -> task format -> length policy -> first-fit pack
-> global batch -> this process's rows -> prefetch, with an exactly resumable state.

**Order.** Stream position ``k`` is record ``order(k)`` of epoch ``k // n``
(:class:`EpochOrder`: a seeded permutation per epoch, reshuffled every epoch for
train). Records are read, augmented, tokenized and
length-fitted in chunks of :data:`CHUNK` stream positions, so the pieces at a
position depend on the position alone, never on what ran before.

**Packing.** Deterministic first-fit, the algorithm of grain's
``FirstFitPackIterDataset`` without bin shuffling: pieces, in stream order, go
into the first of ``num_bins`` rows with room for them; the pack closes when a
piece fits in none, and that piece starts the next pack. Pieces are never
longer than a row, so every closed pack has exactly ``num_bins`` rows, and
``num_bins`` is a multiple of the global batch: a batch never straddles packs.
With ``pack=False`` a row takes exactly one piece (padding fills the rest).
Inside a row each piece gets its own ``segment_ids`` value (1, 2, ...; 0 is
padding) and ``positions`` restarting at 0, so attention never crosses pieces.

**Hosts.** Packing runs on the global stream, identically on every process;
process ``i`` of ``p`` then builds arrays only for rows ``[i*G/p, (i+1)*G/p)`` of
each global batch of ``G`` rows. Every process therefore tokenizes the examples of
the whole global batch, and in return the batches, and the state, do not depend
on the process count. That is cheap next to a train step on one or a few hosts
(``benchmarks/data_throughput.py``: ~1.2M tokens/s on one CPU core), but it grows
with the global batch; for many hosts, pre-tokenized records (packing then needs
only their lengths) would keep the per-host work local.

**State.** ``{"example": k, "piece": j, "batch": b}``: the pack starting at piece
``j`` of stream position ``k``, of which ``b`` batches were consumed. Restoring
re-packs that one pack. A train stream repeats forever; an eval stream is one
pass whose last batch is padded with empty rows, then ``StopIteration``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxllm.data.formats import Example, LengthLimits, LengthStats, fit_length, format_records
from jaxllm.errors import UserError

CHUNK = 256  # stream positions formatted (and tokenized) per batched call
MIN_PACK_ROWS = 128  # rows per pack at least: more rows, fewer half-empty ones


class EpochOrder:
    """Stream position -> record index: a seeded permutation of ``range(n)`` per epoch.

    Small splits use a cached numpy permutation per epoch; splits above
    :data:`PERMUTATION_LIMIT` records use grain's ``index_shuffle`` (the function
    behind ``MapDataset.shuffle``) per position, which needs no O(n) memory but
    costs ~10 us a call, and far more on tiny splits.
    """

    PERMUTATION_LIMIT = 1 << 22

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed % 2**32, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def __call__(self, k: int) -> int:
        epoch, i = divmod(k, self.n)
        if not self.shuffle:
            return i
        if self.n > self.PERMUTATION_LIMIT:
            seed = (self.seed + epoch) % 2**32  # as grain's ShuffleMapDataset
            return grain.experimental.index_shuffle(i, max_index=self.n - 1, seed=seed, rounds=4)
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # positions mostly increase: old epochs are done
                del self._perms[min(self._perms)]
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.n).astype(np.int32)
        return int(self._perms[epoch][i])


class ExampleStream:
    """Random access to the length-fitted pieces at each stream position."""

    def __init__(
        self,
        records: Sequence[dict],
        task: str,
        tokenizer,
        limits: LengthLimits,
        *,
        order: EpochOrder,
        repeat: bool,
        augmenter=None,
        history_turns: int = 0,
        num_classes: int = 0,
        stats: LengthStats | None = None,
    ):
        self.records, self.task, self.tokenizer, self.limits = records, task, tokenizer, limits
        self.order, self.repeat, self.augmenter = order, repeat, augmenter
        self.history_turns, self.num_classes = history_turns, num_classes
        self.n = len(records)
        self.stats = stats or LengthStats()
        self._cache: dict[int, list[list[Example]]] = {}

    def end(self) -> float:
        """One past the last stream position (infinite for a repeating stream)."""
        return float("inf") if self.repeat else self.n

    def _chunk(self, c: int) -> list[list[Example]]:
        lo = c * CHUNK
        hi = lo + CHUNK if self.repeat else min(lo + CHUNK, self.n)
        ks = range(lo, hi)
        idx = [self.order(k) for k in ks]
        epochs = [k // self.n for k in ks]
        recs = [self.records[i] for i in idx]
        if self.augmenter is not None and self.augmenter.active:
            recs = self.augmenter.apply(self.task, recs, idx, epochs)
        examples = format_records(
            self.task,
            recs,
            self.tokenizer,
            history_turns=self.history_turns,
            indices=idx,
            num_classes=self.num_classes,
        )
        out = []
        for ex in examples:
            pieces, event, removed = fit_length(self.task, ex, self.limits)
            self.stats.add(event, ex, len(pieces), removed, self.limits)
            out.append(pieces)
        return out

    def pieces(self, k: int) -> list[Example]:
        """Pieces at stream position `k` (``[]`` if the example was dropped)."""
        c = k // CHUNK
        if c not in self._cache:
            if len(self._cache) >= 2:  # packing moves forward: the current chunk and the next
                del self._cache[min(self._cache)]
            self._cache[c] = self._chunk(c)
        return self._cache[c][k - c * CHUNK]


def first_fit(
    stream: ExampleStream, start: tuple[int, int], num_bins: int, seq_len: int, pack: bool
) -> tuple[list[list[Example]], tuple[int, int]]:
    """Packs pieces from `start` = (position, piece) into at most `num_bins` rows.

    Returns:
      ``(rows, next_start)``; rows is empty when the stream is exhausted.
    """
    rows: list[list[Example]] = []
    free = np.zeros(num_bins, np.int64)  # room left in each open row
    k, j = start
    end = stream.end()
    while k < end:
        if not rows and k - start[0] > stream.n:
            raise UserError(
                f"{stream.stats.where}: the length policy dropped every example; raise "
                "data.seq_len / data.max_source_len / data.max_target_len or set "
                "data.length_policy=truncate"
            )
        pieces = stream.pieces(k)
        if j >= len(pieces):
            k, j = k + 1, 0
            continue
        piece = pieces[j]
        n = len(piece)
        if pack:
            fits = np.flatnonzero(free[: len(rows)] >= n)
            b = int(fits[0]) if len(fits) else len(rows)
        else:
            b = len(rows)
        if b == num_bins:
            break  # fits nowhere: the pack is closed and this piece opens the next
        if b == len(rows):
            rows.append([])
            free[b] = seq_len
        rows[b].append(piece)
        free[b] -= n
        j += 1
    return rows, (k, j)


def build_rows(
    rows: Sequence[Sequence[Example]],
    num_rows: int,
    seq_len: int,
    bos: int,
    *,
    with_prefix: bool,
    with_label: bool,
) -> dict[str, np.ndarray]:
    """Arrays of `num_rows` rows (missing rows are padding) in the batch format.

    Keys: ``inputs``, ``targets``, ``positions``, ``segment_ids`` (int32 [b, L]),
    ``weights`` (float32 [b, L]), ``prefix_mask`` (bool [b, L], if `with_prefix`),
    ``label`` (int32 [b], -1 on padding rows, if `with_label`).
    """
    shape = (num_rows, seq_len)
    out = {
        "inputs": np.zeros(shape, np.int32),
        "targets": np.zeros(shape, np.int32),
        "weights": np.zeros(shape, np.float32),
        "positions": np.zeros(shape, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
    }
    if with_prefix:
        out["prefix_mask"] = np.zeros(shape, np.bool_)
    if with_label:
        out["label"] = np.full(num_rows, -1, np.int32)
    arange = np.arange(seq_len, dtype=np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, piece in enumerate(row, start=1):
            z = np.asarray([*piece.prefix, *piece.target], np.int32)
            n, p = len(z), len(piece.prefix)
            sl = slice(at, at + n)
            out["targets"][r, sl] = z
            out["inputs"][r, at] = bos
            out["inputs"][r, at + 1 : at + n] = z[:-1]
            out["positions"][r, sl] = arange[:n]
            out["segment_ids"][r, sl] = s
            out["weights"][r, at + p : at + n] = 1.0  # targets in the target part count
            if with_prefix and p:
                out["prefix_mask"][r, at : at + p + 1] = True  # BOS + prefix tokens
            if with_label:
                out["label"][r] = piece.label
            at += n
    return out


class PackedBatches:
    """The checkpointable core iterator (no prefetch): global packs -> local rows."""

    def __init__(
        self,
        stream: ExampleStream,
        *,
        global_batch: int,
        num_bins: int,
        lo: int,
        hi: int,
        seq_len: int,
        pack: bool,
        with_prefix: bool,
        with_label: bool,
    ):
        self.stream, self.global_batch, self.num_bins = stream, global_batch, num_bins
        self.lo, self.hi, self.seq_len, self.pack = lo, hi, seq_len, pack
        self.with_prefix, self.with_label = with_prefix, with_label
        self.bos = stream.tokenizer.bos_id
        self._lock = threading.Lock()  # get_state may run on another thread than __next__
        self._start, self._batch = (0, 0), 0
        self._rows: list[list[Example]] | None = None
        self._next_start = (0, 0)
        # Non-padding tokens / all tokens of the rows this process built (packing efficiency).
        self.tokens_real = 0
        self.tokens_total = 0

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self._rows is None:
                self._rows, self._next_start = first_fit(
                    self.stream, self._start, self.num_bins, self.seq_len, self.pack
                )
            G, b = self.global_batch, self._batch
            if b * G >= len(self._rows):
                raise StopIteration  # only an exhausted (eval) stream has no rows left
            rows = self._rows[b * G : (b + 1) * G][self.lo : self.hi]
            batch = build_rows(
                rows,
                self.hi - self.lo,
                self.seq_len,
                self.bos,
                with_prefix=self.with_prefix,
                with_label=self.with_label,
            )
            self._batch += 1
            if self._batch * G >= len(self._rows) and self._next_start != self._start:
                self._start, self._batch, self._rows = self._next_start, 0, None
            self.tokens_real += int((batch["segment_ids"] > 0).sum())
            self.tokens_total += batch["segment_ids"].size
            return batch

    def get_state(self) -> dict[str, Any]:
        with self._lock:
            return {"example": self._start[0], "piece": self._start[1], "batch": self._batch}

    def set_state(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._start = (int(state["example"]), int(state["piece"]))
            self._batch = int(state["batch"])
            self._rows = None
