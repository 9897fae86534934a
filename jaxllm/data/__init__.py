"""Data for jaxllm: corpora and record sources, SentencePiece tokenizers, grain pipelines.

Public API::

    data_dir(cfg.data)                         -> str
    load_records(cfg.data, split, task)        -> RecordSource (canonical records)
    texts_for_tokenizer(cfg.data, split)       -> iterator of str
    get_tokenizer(cfg)                         -> Tokenizer
    load_split_texts(cfg.data, split)          -> list[str]
    make_lm_iterator(cfg, tokenizer, split, global_batch, *, process_index=0,
                     process_count=1, seed=None, shuffle=None, repeat=None) -> LMIterator

``data.source`` is an embedded corpus (``embedded:pydocs``, ``embedded:numbers``,
``embedded:chatter``), a TFDS dataset (``tfds:NAME[/CONFIG]``) or a local
``.txt`` / ``.tsv`` / ``.jsonl`` file; :mod:`jaxllm.data.sources` turns each into
random-access records with canonical fields.

Everything derived is cached under :func:`data_dir`: ``tfds/`` (prepared
datasets), ``tokenizers/`` and ``tokens/`` (token streams as ``.npy``, memory
mapped). Several processes may start on one data dir at once (multi-process
JAX on one machine, or hosts sharing NFS): preparation and training run under a
``flock`` on a lock file, and results are written to a temp name and renamed.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from jaxllm.config import Config, DataConfig
from jaxllm.data.pipeline import (
    LMIterator,
    TaskIterator,
    lm_iterator,
    make_task_iterator,
    tokenize_documents,
)
from jaxllm.data.sources import (
    RecordSource,
    data_dir,
    load_records,
    parse_source,
    texts_for_tokenizer,
)
from jaxllm.data.sources import file_lock as _file_lock
from jaxllm.data.tokenizer import Tokenizer, cached_tokenizer, load_tokenizer, train_tokenizer
from jaxllm.errors import UserError

__all__ = [
    "LMIterator",
    "RecordSource",
    "TaskIterator",
    "Tokenizer",
    "data_dir",
    "get_tokenizer",
    "load_records",
    "load_split_texts",
    "load_tokenizer",
    "make_lm_iterator",
    "make_task_iterator",
    "texts_for_tokenizer",
    "train_tokenizer",
]


def load_split_texts(cfg: DataConfig, split: str) -> list[str]:
    """All documents (``text`` fields) of one split of `cfg.source`, in their fixed order.

    Args:
      cfg: The data config (source and data_dir).
      split: ``train``, ``validation`` or ``test``.

    Returns:
      The documents' texts.

    Raises:
      UserError: For an unknown source or split, a source without text, or a bad file.
    """
    records = load_records(cfg, split, "lm")
    return [records[i]["text"] for i in range(len(records))]


def get_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer for `cfg`: `data.tokenizer` if set, else one trained on the corpus.

    A trained tokenizer is cached at
    ``<data_dir>/tokenizers/<source>_<type><vocab>_<content hash>.model``
    and reused by later runs (and by other processes starting at the same time).
    It is trained on every text field of the training split (:func:`texts_for_tokenizer`).

    Args:
      cfg: The experiment config (`data.*`, `model.vocab_size`, `task`).

    Returns:
      The tokenizer.

    Raises:
      UserError: If the file is missing or its vocabulary exceeds `model.vocab_size`.
    """
    vocab = cfg.model.vocab_size
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    else:
        task = getattr(cfg, "task", None)
        source = parse_source(cfg.data, task)
        # Cached by a hash of the training text and the settings: editing a local file
        # or changing data.tokenizer_type / user_symbols trains a new tokenizer.
        tok = cached_tokenizer(
            list(texts_for_tokenizer(cfg.data, cfg.data.train_split, task)),
            vocab,
            os.path.join(data_dir(cfg.data), "tokenizers"),
            name=source.slug,
            model_type=cfg.data.tokenizer_type,
            user_symbols=cfg.data.user_symbols,
        )
    if tok.vocab_size > vocab:
        raise UserError(
            f"tokenizer '{tok.path}' has {tok.vocab_size} pieces but model.vocab_size={vocab}; "
            f"set model.vocab_size={tok.vocab_size} or more"
        )
    return tok


def split_tokens(cfg: DataConfig, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """The split as one EOS-separated token stream, cached as .npy and memory mapped."""
    source = parse_source(cfg, "lm")
    root = data_dir(cfg)
    path = os.path.join(root, "tokens", source.slug, f"{split}-{tokenizer.fingerprint}.npy")
    with _file_lock(os.path.join(root, "locks", f"tokens-{source.slug}.lock")):
        if not os.path.isfile(path):
            tokens = tokenize_documents(tokenizer, load_split_texts(cfg, split), tokenizer.eos_id)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
            with os.fdopen(fd, "wb") as f:
                np.save(f, tokens)
            os.replace(tmp, path)  # atomic: readers never see half a file
    return np.load(path, mmap_mode="r")


def make_lm_iterator(
    cfg: Config,
    tokenizer: Tokenizer,
    split: str,
    global_batch: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    seed: int | None = None,
    shuffle: bool | None = None,
    repeat: bool | None = None,
) -> LMIterator:
    """LM batches of `split` for this process; see :mod:`jaxllm.data.pipeline`.

    Concatenating the local batches of processes ``0..process_count-1`` gives the
    batch a single process would get with the same `global_batch`.

    Args:
      cfg: The experiment config (`data.source`, `data.seq_len`, `train.seed`).
      tokenizer: From :func:`get_tokenizer`.
      split: ``train``, ``validation`` or ``test``.
      global_batch: Rows per step over all processes.
      process_index: ``jax.process_index()``.
      process_count: ``jax.process_count()``.
      seed: Shuffle seed; defaults to `train.seed`.
      shuffle: Defaults to True for `data.train_split`, else False.
      repeat: Defaults to True for `data.train_split` (forever), else False (one pass).

    Returns:
      An iterator of ``{'inputs', 'targets', 'weights'}`` numpy batches with
      ``get_state()`` / ``set_state(state)``.

    Raises:
      UserError: For a bad source/split, an indivisible batch or a too-small split.
    """
    is_train = split == cfg.data.train_split
    tokens = split_tokens(cfg.data, tokenizer, split)
    return lm_iterator(
        tokens,
        seq_len=cfg.data.seq_len,
        global_batch=global_batch,
        process_index=process_index,
        process_count=process_count,
        seed=cfg.train.seed if seed is None else seed,
        shuffle=is_train if shuffle is None else shuffle,
        repeat=is_train if repeat is None else repeat,
        meta={"source": cfg.data.source, "split": split},
    )
