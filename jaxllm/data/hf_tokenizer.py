"""A Hugging Face ``tokenizer.json`` behind jaxllm's tokenizer interface.

A converted checkpoint keeps its own tokenizer, so text in and text out match
Hugging Face: ids come from the `tokenizers` library (the same Rust code
``PreTrainedTokenizerFast`` runs). The special tokens are read from the
``tokenizer_config.json`` beside the file (``bos_token``, ``eos_token``,
``pad_token``, ``unk_token``), as ``transformers`` does; a model without a pad
token pads with EOS (padding is masked by segment ids, so its id never matters)
and one without BOS (GPT-2, Qwen2) starts prompts with EOS.

``encode`` never adds special tokens: jaxllm places BOS/EOS itself, like every
other tokenizer it uses.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from jaxllm.errors import UserError

CONFIG_NAME = "tokenizer_config.json"


def _token_text(value) -> str | None:
    # tokenizer_config.json spells a special token as a string or an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from ``tokenizer.json``.

    Attributes:
      path: The ``tokenizer.json`` file.
      pad_id, unk_id, bos_id, eos_id: Special ids from ``tokenizer_config.json``.
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError as e:
            raise UserError(
                "a tokenizer.json needs the `tokenizers` package: pip install 'jaxllm[hf]'"
            ) from e
        self.path = path
        try:
            self._tok = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust error type is not importable
            raise UserError(
                f"'{path}' is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})"
            ) from e
        specials = self._special_tokens(os.path.join(os.path.dirname(path), CONFIG_NAME))
        ids = {k: self._tok.token_to_id(v) if v else None for k, v in specials.items()}
        if ids["eos"] is None:
            raise UserError(
                f"no end-of-sequence token for '{path}': put `eos_token` in the "
                f"{CONFIG_NAME} beside it (jaxllm ends documents with EOS)"
            )
        self.eos_id = ids["eos"]
        self.bos_id = self.eos_id if ids["bos"] is None else ids["bos"]
        self.pad_id = self.eos_id if ids["pad"] is None else ids["pad"]
        self.unk_id = self.eos_id if ids["unk"] is None else ids["unk"]

    def _special_tokens(self, config_path: str) -> dict[str, str | None]:
        config = {}
        if os.path.isfile(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        out = {k: _token_text(config.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")}
        if out["eos"] is None:
            # No config: a GPT-2 style vocabulary names its one boundary token.
            for name in ("<|endoftext|>", "</s>", "<eos>"):
                if self._tok.token_to_id(name) is not None:
                    out["eos"] = name
                    break
        return out

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """A short hash of the tokenizer file; names caches of token ids."""
        with open(self.path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids of several texts (the library parallelises across its own threads)."""
        del num_threads
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        flat = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._tok.decode(flat, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    def piece_id(self, piece: str) -> int | None:
        """Id of a whole token such as ``"<sep>"``, or None if the vocabulary lacks it."""
        return self._tok.token_to_id(piece)

    def __reduce__(self):  # picklable (grain workers, multiprocessing) by path
        return (HFTokenizer, (self.path,))

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"
