"""SentencePiece tokenizer: a thin wrapper with fixed special ids, and on-the-fly training.

Every jaxllm tokenizer uses ``pad=0, unk=1, bos=2, eos=3`` so that batches can be
zero-padded and models can be swapped between corpora. Training is BPE (default)
or unigram with byte fallback (any Unicode text round-trips, never ``<unk>``), an
identity normaliser (text comes back exactly as it went in, indentation
included) and a single ``"\\n"`` piece, because documents are encoded whole,
newlines and all. Task tokens (``<sep>``, ``<turn>``, ...) are user-defined
symbols: always one piece each, right after ``"\\n"`` (ids 5, 6, ...).

:func:`cached_tokenizer` names a trained model by a hash of its training text
and settings, so a changed corpus or setting never reuses a stale model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from jaxllm.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece skips training sentences longer than this many bytes, so long
# paragraphs are cut into line groups below it rather than silently dropped.
_MAX_SENTENCE_BYTES = 4192
# Beyond this many sentences the trainer gains little and slows down; a strided
# (deterministic) subsample keeps training well under a minute on 2 cores.
_MAX_SENTENCES = 500_000
# 4 specials + "\n" + 256 byte pieces, plus room for at least a few merges.
_MIN_VOCAB = 320
_MODEL_TYPES = ("bpe", "unigram")
# Part of every cache key: bump it when the trainer settings below change, so that
# models trained by an older recipe are not picked up from a cache.
_RECIPE_VERSION = "jaxllm-sp/2"


class Tokenizer:
    """A SentencePiece model and its special ids.

    jaxllm's own models use ``pad=0, unk=1, bos=2, eos=3``. A converted checkpoint's
    model (e.g. Llama's ``tokenizer.model``: unk 0, bos 1, eos 2, no pad) keeps its own
    ids; one without a pad id pads with EOS (padding is masked by segment ids anyway).

    Attributes:
      path: The ``.model`` file it was loaded from.
      pad_id, unk_id, bos_id, eos_id: The model's special ids.
    """

    def __init__(self, path: str):
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.unk_id, self.bos_id, self.eos_id = (
            self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id()
        )  # fmt: skip
        if self.eos_id < 0:
            raise UserError(
                f"tokenizer '{path}' has no end-of-sequence piece; jaxllm ends documents "
                "with EOS: retrain it with jaxllm.data.tokenizer.train_tokenizer"
            )
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        if self.bos_id < 0:
            self.bos_id = self.eos_id  # GPT-2 style: one boundary token

    @property
    def vocab_size(self) -> int:
        """Number of pieces (the model's embedding needs at least this many rows)."""
        return self._sp.get_piece_size()

    @property
    def fingerprint(self) -> str:
        """A short hash of the model contents; names caches of token ids."""
        return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel (`num_threads=0`: all cores)."""
        return self._sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; pad/bos/eos ids are dropped."""
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_id(self, piece: str) -> int | None:
        """Id of a whole piece such as ``"<sep>"``, or None if the vocabulary lacks it."""
        i = self._sp.piece_to_id(piece)
        return i if i != UNK_ID or piece == self._sp.id_to_piece(UNK_ID) else None

    def __reduce__(self):  # picklable (grain workers, multiprocessing) by path
        return (Tokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


# The tokenizer file of a workdir, by kind: jaxllm's own or a converted checkpoint's
# SentencePiece model, or a Hugging Face `tokenizers` file.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def workdir_tokenizer(workdir: str) -> str:
    """The tokenizer file a workdir carries (``tokenizer.model`` or ``.json``), or ""."""
    for name in TOKENIZER_FILES:
        path = os.path.join(workdir, name)
        if workdir and os.path.isfile(path):
            return path
    return ""


def tokenizer_file_name(path: str) -> str:
    """The name a tokenizer file takes inside a workdir (by its kind)."""
    return TOKENIZER_FILES[1] if path.endswith(".json") else TOKENIZER_FILES[0]


def load_tokenizer(path: str) -> Any:
    """Loads a SentencePiece ``.model`` file or a Hugging Face ``tokenizer.json``.

    Args:
      path: Path of the model file (a ``.json`` file loads
        :class:`jaxllm.data.hf_tokenizer.HFTokenizer`).

    Returns:
      The tokenizer.

    Raises:
      UserError: If the file is missing or is not a tokenizer.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(
            f"tokenizer file '{path}' not found; set data.tokenizer to an existing "
            "SentencePiece .model or tokenizer.json file, or to '' to train one on the corpus"
        )
    if path.endswith(".json"):
        from jaxllm.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path)
    try:
        return Tokenizer(path)
    except (RuntimeError, OSError) as e:
        raise UserError(
            f"tokenizer file '{path}' is not a SentencePiece model ({str(e).splitlines()[0]}); "
            "point data.tokenizer at a .model file"
        ) from e


def _sentences(texts: Iterable[str]) -> list[str]:
    """Splits documents into paragraph-sized training sentences under the byte limit."""
    out = []
    for text in texts:
        for paragraph in text.split("\n\n"):
            if not paragraph.strip():
                continue
            if len(paragraph.encode("utf-8")) < _MAX_SENTENCE_BYTES:
                out.append(paragraph)
                continue
            group, size = [], 0
            for line in paragraph.split("\n"):
                line = line.encode("utf-8")[: _MAX_SENTENCE_BYTES - 1].decode("utf-8", "ignore")
                n = len(line.encode("utf-8")) + 1
                if group and size + n >= _MAX_SENTENCE_BYTES:
                    out.append("\n".join(group))
                    group, size = [], 0
                group.append(line)
                size += n
            if any(s.strip() for s in group):
                out.append("\n".join(group))
    if len(out) > _MAX_SENTENCES:
        out = out[:: -(-len(out) // _MAX_SENTENCES)]  # strided, so deterministic
    return out


def _check_settings(vocab_size: int, model_type: str, user_symbols: Sequence[str]) -> list[str]:
    """Validates training settings; returns the user symbols with "\\n" first."""
    if model_type not in _MODEL_TYPES:
        raise UserError(
            f"tokenizer type '{model_type}' is not supported; set data.tokenizer_type to "
            f"one of {', '.join(_MODEL_TYPES)}"
        )
    symbols = ["\n", *[s for s in user_symbols if s != "\n"]]
    if len(set(symbols)) != len(symbols) or not all(symbols):
        raise UserError(f"user symbols {list(user_symbols)} must be distinct, non-empty strings")
    if vocab_size < _MIN_VOCAB + len(symbols) - 1:
        extra = f" with {len(symbols) - 1} task symbols" if len(symbols) > 1 else ""
        raise UserError(
            f"vocab size {vocab_size} is too small for a byte-fallback tokenizer{extra}; "
            f"set model.vocab_size to at least {_MIN_VOCAB + len(symbols) - 1}"
        )
    return symbols


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    path: str,
    *,
    model_type: str = "bpe",
    user_symbols: Sequence[str] = (),
) -> Tokenizer:
    """Trains a byte-fallback SentencePiece model and saves it atomically to `path`.

    Settings are deterministic (fixed order, no input shuffling, one thread), so
    the same texts always give a byte-identical model. If the text is too small
    for `vocab_size` pieces, the vocabulary is smaller rather than failing.

    Args:
      texts: Documents; paragraphs (blank-line separated) become training sentences.
      vocab_size: Wanted number of pieces, including specials and the 256 bytes.
      path: Where to write the ``.model`` file (parent folders are created).
      model_type: ``"bpe"`` (default) or ``"unigram"``.
      user_symbols: Task tokens (e.g. ``["<sep>", "<turn>"]``), each kept as one piece
        with ids right after ``"\\n"`` (5, 6, ... in the given order).

    Returns:
      The trained tokenizer, loaded from `path`.

    Raises:
      UserError: If a setting is invalid, `vocab_size` is too small or there is no text.
    """
    symbols = _check_settings(vocab_size, model_type, user_symbols)
    sentences = _sentences(texts)
    if not sentences:
        raise UserError("no text to train a tokenizer on; check data.source holds text")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=0.9995,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=symbols,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(
            f"SentencePiece training failed ({str(e).splitlines()[0][:200]}); "
            "lower model.vocab_size or use a larger corpus"
        ) from e
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write-then-rename: a concurrent reader sees either no file or a whole one.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".model")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Tokenizer(path)


def tokenizer_cache_key(
    texts: Sequence[str],
    vocab_size: int,
    *,
    model_type: str = "bpe",
    user_symbols: Sequence[str] = (),
) -> str:
    """A short hash of everything a trained model depends on: text and settings.

    Args:
      texts: The training documents, in order (the order is part of the key).
      vocab_size: Wanted number of pieces.
      model_type: ``"bpe"`` or ``"unigram"``.
      user_symbols: Task tokens.

    Returns:
      16 hex digits.
    """
    h = hashlib.sha256()
    settings = [_RECIPE_VERSION, vocab_size, model_type, list(user_symbols)]
    h.update(repr(settings).encode())
    for text in texts:
        data = text.encode("utf-8")
        # Length-prefixed, so ["ab", "c"] and ["a", "bc"] hash differently.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # held across processes sharing the cache dir
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    cache_dir: str,
    *,
    name: str,
    model_type: str = "bpe",
    user_symbols: Sequence[str] = (),
) -> Tokenizer:
    """Loads the model trained on exactly these texts and settings, training it once.

    The file is ``<cache_dir>/<name>_<model_type><vocab_size>_<key>.model`` with
    ``key = tokenizer_cache_key(...)``. Processes starting together on one cache
    dir train it once (a lock file guards the check-then-train).

    Args:
      texts: Training documents (usually the train split).
      vocab_size: Wanted number of pieces.
      cache_dir: Folder of cached models (created if missing).
      name: Readable prefix of the file name, e.g. the corpus slug.
      model_type: ``"bpe"`` or ``"unigram"``.
      user_symbols: Task tokens.

    Returns:
      The tokenizer.

    Raises:
      UserError: As :func:`train_tokenizer`.
    """
    _check_settings(vocab_size, model_type, user_symbols)
    key = tokenizer_cache_key(texts, vocab_size, model_type=model_type, user_symbols=user_symbols)
    path = os.path.join(
        os.path.abspath(os.path.expanduser(cache_dir)),
        f"{name}_{model_type}{vocab_size}_{key}.model",
    )
    with _lock(os.path.join(os.path.dirname(path), ".locks", f"{name}.lock")):
        if os.path.isfile(path):
            return load_tokenizer(path)
        return train_tokenizer(
            texts, vocab_size, path, model_type=model_type, user_symbols=user_symbols
        )
