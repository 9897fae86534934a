"""Data for jaxllm: corpora, SentencePiece tokenizers and the grain LM pipeline.

Public API::

    data_dir(cfg.data)                         -> str
    get_tokenizer(cfg)                         -> Tokenizer
    load_split_texts(cfg.data, split)          -> list[str]
    make_lm_iterator(cfg, tokenizer, split, global_batch, *, process_index=0,
                     process_count=1, seed=None, shuffle=None, repeat=None) -> LMIterator

``data.source`` is ``embedded:pydocs`` (Python's documentation, built offline by
the TFDS builder in :mod:`jaxllm.data.pydocs`) or a path to a UTF-8 ``.txt``
file (one document per line, or blank-line separated documents if the file has
blank lines; split 90/5/5 into train/validation/test by a hash of the text).

Everything derived is cached under :func:`data_dir`: ``tfds/`` (prepared
datasets), ``tokenizers/`` and ``tokens/`` (token streams as ``.npy``, memory
mapped). Several processes may start on one data dir at once (multi-process
JAX on one machine, or hosts sharing NFS): preparation and training run under a
``flock`` on a lock file, and results are written to a temp name and renamed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass

import numpy as np
import tensorflow_datasets as tfds

from jaxllm.config import Config, DataConfig
from jaxllm.data.pipeline import LMIterator, lm_iterator, tokenize_documents
from jaxllm.data.pydocs import SPLITS, Pydocs, config_name, normalise_whitespace, stable_split
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from jaxllm.errors import UserError

__all__ = [
    "LMIterator",
    "Tokenizer",
    "data_dir",
    "get_tokenizer",
    "load_split_texts",
    "load_tokenizer",
    "make_lm_iterator",
    "train_tokenizer",
]

_VALID_SOURCES = (
    "embedded:pydocs, or a path to a UTF-8 .txt file (one document per line, "
    "or documents separated by blank lines)"
)


def data_dir(cfg: DataConfig) -> str:
    """Root of all cached data: `cfg.data_dir`, else $JAXLLM_DATA_DIR, else ~/.cache/jaxllm.

    Args:
      cfg: The data config.

    Returns:
      An absolute path (not created here).
    """
    root = cfg.data_dir or os.environ.get("JAXLLM_DATA_DIR") or "~/.cache/jaxllm"
    return os.path.abspath(os.path.expanduser(root))


@contextlib.contextmanager
def _file_lock(path: str):
    """Exclusive advisory lock, held across processes until the block exits."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class _Source:
    kind: str  # "pydocs" | "txt"
    spec: str  # data.source as written
    slug: str  # names caches: tokenizers/<slug>_sp<vocab>.model, tokens/<slug>/
    path: str = ""


def _read_txt(path: str) -> tuple[str, str]:
    """Returns (text, content hash) of a text source, with one-line errors."""
    if not os.path.isfile(path):
        raise UserError(f"data.source file '{path}' not found; pass an existing .txt file path")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"data.source file '{path}' is not UTF-8 (byte {raw[e.start]:#04x} at offset "
            f"{e.start}); convert it, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise UserError(f"data.source file '{path}' is empty; give it at least one document")
    return text, hashlib.sha256(raw).hexdigest()[:12]


def _parse_source(cfg: DataConfig) -> _Source:
    spec = cfg.source.strip()
    if spec.startswith("embedded:"):
        if spec != "embedded:pydocs":
            raise UserError(
                f"unknown embedded corpus '{spec}'; valid data.source: {_VALID_SOURCES}"
            )
        return _Source("pydocs", spec, f"pydocs-{config_name()}")
    if spec.startswith("tfds:"):
        raise UserError(
            f"data.source '{spec}': tfds: sources are not supported yet; use {_VALID_SOURCES}"
        )
    if spec.lower().endswith(".txt"):
        path = os.path.abspath(os.path.expanduser(spec))
        _, digest = _read_txt(path)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(path)[:-4])[:40]
        return _Source("txt", spec, f"txt-{stem}-{digest}", path)
    raise UserError(f"data.source '{spec}' is not recognised; valid forms: {_VALID_SOURCES}")


def _txt_documents(text: str) -> list[str]:
    text = normalise_whitespace(text)
    # Blank lines anywhere mean paragraphs are documents; otherwise each line is one.
    if re.search(r"\n[ \t]*\n", text):
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        parts = text.split("\n")
    return [p.strip("\n") for p in parts if p.strip()]


def _pydocs_builder(root: str):
    tfds_dir = os.path.join(root, "tfds")
    with _file_lock(os.path.join(root, "locks", "pydocs.lock")):
        builder = Pydocs(data_dir=tfds_dir, file_format="array_record")
        if not builder.is_prepared():
            tfds.display_progress_bar(False)
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(try_download_gcs=False)
            )
    return builder


def _check_split(source: _Source, split: str) -> None:
    if split not in SPLITS:
        raise UserError(
            f"unknown split '{split}' for data.source {source.spec}; available: {', '.join(SPLITS)}"
        )


def load_split_texts(cfg: DataConfig, split: str) -> list[str]:
    """All documents of one split of `cfg.source`, in their fixed order.

    Args:
      cfg: The data config (source and data_dir).
      split: ``train``, ``validation`` or ``test``.

    Returns:
      The documents' texts.

    Raises:
      UserError: For an unknown source or split, or a missing/empty/non-UTF-8 file.
    """
    source = _parse_source(cfg)
    _check_split(source, split)
    if source.kind == "pydocs":
        records = _pydocs_builder(data_dir(cfg)).as_data_source(split)
        return [records[i]["text"].decode("utf-8") for i in range(len(records))]
    text, _ = _read_txt(source.path)
    docs = _txt_documents(text)
    # The key is the text, so duplicate documents share a split (no train/eval leak).
    return [d for d in docs if stable_split(hashlib.sha256(d.encode()).hexdigest()) == split]


def get_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer for `cfg`: `data.tokenizer` if set, else one trained on the corpus.

    A trained tokenizer is cached at ``<data_dir>/tokenizers/<source>_sp<vocab>.model``
    and reused by later runs (and by other processes starting at the same time).

    Args:
      cfg: The experiment config (`data.*` and `model.vocab_size`).

    Returns:
      The tokenizer.

    Raises:
      UserError: If the file is missing or its vocabulary exceeds `model.vocab_size`.
    """
    vocab = cfg.model.vocab_size
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    else:
        source = _parse_source(cfg.data)
        root = data_dir(cfg.data)
        path = os.path.join(root, "tokenizers", f"{source.slug}_sp{vocab}.model")
        with _file_lock(os.path.join(root, "locks", f"tokenizer-{source.slug}.lock")):
            if os.path.isfile(path):
                tok = load_tokenizer(path)
            else:
                tok = train_tokenizer(load_split_texts(cfg.data, cfg.data.train_split), vocab, path)
    if tok.vocab_size > vocab:
        raise UserError(
            f"tokenizer '{tok.path}' has {tok.vocab_size} pieces but model.vocab_size={vocab}; "
            f"set model.vocab_size={tok.vocab_size} or more"
        )
    return tok


def _split_tokens(cfg: DataConfig, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """The split as one EOS-separated token stream, cached as .npy and memory mapped."""
    source = _parse_source(cfg)
    _check_split(source, split)
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
    tokens = _split_tokens(cfg.data, tokenizer, split)
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
