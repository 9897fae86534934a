"""SentencePiece tokenizer: a thin wrapper with fixed special ids, and on-the-fly training.

Every jaxllm tokenizer uses ``pad=0, unk=1, bos=2, eos=3`` so that batches can be
zero-padded and models can be swapped between corpora. Training is BPE with
byte fallback (any Unicode text round-trips, never ``<unk>``), an identity
normaliser (text comes back exactly as it went in, indentation included) and a
single ``"\\n"`` piece, because documents are encoded whole, newlines and all.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Sequence

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


class Tokenizer:
    """A SentencePiece model with jaxllm's special ids.

    Attributes:
      path: The ``.model`` file it was loaded from.
      pad_id, unk_id, bos_id, eos_id: 0, 1, 2, 3.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, path: str):
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise UserError(
                f"tokenizer '{path}' has pad/unk/bos/eos ids {ids}, jaxllm needs (0, 1, 2, 3); "
                "retrain it with jaxllm.data.tokenizer.train_tokenizer"
            )

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

    def __reduce__(self):  # picklable (grain workers, multiprocessing) by path
        return (Tokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a SentencePiece ``.model`` file.

    Args:
      path: Path of the model file.

    Returns:
      The tokenizer.

    Raises:
      UserError: If the file is missing or is not a SentencePiece model.
    """
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(
            f"tokenizer file '{path}' not found; set data.tokenizer to an existing "
            "SentencePiece .model file, or to '' to train one on the corpus"
        )
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


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, path: str, *, model_type: str = "bpe"
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

    Returns:
      The trained tokenizer, loaded from `path`.

    Raises:
      UserError: If `vocab_size` is too small or there is no text.
    """
    if vocab_size < _MIN_VOCAB:
        raise UserError(
            f"vocab size {vocab_size} is too small for a byte-fallback tokenizer; "
            f"set model.vocab_size to at least {_MIN_VOCAB}"
        )
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
            user_defined_symbols=["\n"],
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
