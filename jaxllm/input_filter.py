"""Input filtering at generate/eval time: length, character and blocklist rules.

:class:`InputFilter` checks raw text against the rules of an
:class:`jaxllm.config.InputFilterConfig` (every rule off by default) and returns the
first rule that rejects it, named by its config key, in this order:

- ``max_chars``: more characters than allowed;
- ``max_tokens``: more tokenizer pieces than allowed;
- ``reject_control_chars``: a Unicode "other" character (categories Cc control, Cf
  format such as zero-width and bidi overrides, Cs, Co, Cn) other than tab, newline
  and carriage return;
- ``ascii_only``: a character outside ASCII;
- ``allowed_scripts``: a letter whose script (the first word of its Unicode name:
  LATIN, CYRILLIC, GREEK, CJK, HIRAGANA, ...) is not listed; digits, punctuation,
  symbols, spaces and combining marks always pass;
- ``blocklist_words``: a listed word or phrase as a whole word, in any case;
- ``blocklist_patterns``: a regex found anywhere (``re.search``, any case).

Nothing is dropped silently: `jaxllm generate` refuses a rejected prompt with one line
naming the rule, and eval leaves rejected examples out of the metrics but reports how
many each rule rejected and which ones (:func:`filter_records`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

from jaxllm.errors import UserError

ALLOWED_CONTROL = frozenset("\t\n\r")


@dataclasses.dataclass(frozen=True)
class Rejection:
    """Why a text was rejected: the rule (its config key) and what it found."""

    rule: str
    detail: str

    def message(self) -> str:
        return f"rejected by input_filter.{self.rule}: {self.detail}"


def _char(c: str) -> str:
    return f"{c!r} (U+{ord(c):04X})"


def script_of(c: str) -> str | None:
    """The script of a letter (first word of its Unicode name), None for anything else."""
    if not unicodedata.category(c).startswith("L"):
        return None
    name = unicodedata.name(c, "")
    return name.split(" ", 1)[0] if name else "UNKNOWN"


class InputFilter:
    """The configured rules; :meth:`check` returns the first that rejects a text.

    Attributes:
      active: Whether any rule is configured (an inactive filter accepts everything).
    """

    def __init__(self, cfg: Any, tokenizer: Any = None):
        """Compiles the rules.

        Args:
          cfg: An :class:`jaxllm.config.InputFilterConfig`.
          tokenizer: Needed for ``max_tokens`` (anything with ``encode(text)``).

        Raises:
          ValueError: If ``max_tokens`` is set without a tokenizer.
        """
        self.cfg = cfg
        if cfg.max_tokens and tokenizer is None:
            raise ValueError("input_filter.max_tokens needs a tokenizer")
        self.tokenizer = tokenizer
        self.scripts = frozenset(s.strip().upper() for s in cfg.allowed_scripts)
        self.words = [
            (w, re.compile(rf"(?<!\w){re.escape(w.strip())}(?!\w)", re.IGNORECASE))
            for w in cfg.blocklist_words
        ]
        self.patterns = [(p, re.compile(p, re.IGNORECASE)) for p in cfg.blocklist_patterns]
        self.active = bool(
            cfg.max_chars
            or cfg.max_tokens
            or cfg.reject_control_chars
            or cfg.ascii_only
            or self.scripts
            or self.words
            or self.patterns
        )

    def check(self, text: str) -> Rejection | None:
        """The first rule that rejects `text`, or None if it passes every rule."""
        c = self.cfg
        if c.max_chars and len(text) > c.max_chars:
            return Rejection("max_chars", f"{len(text)} characters > {c.max_chars}")
        if c.max_tokens:
            n = len(self.tokenizer.encode(text))
            if n > c.max_tokens:
                return Rejection("max_tokens", f"{n} tokens > {c.max_tokens}")
        if c.reject_control_chars:
            for i, ch in enumerate(text):
                if unicodedata.category(ch).startswith("C") and ch not in ALLOWED_CONTROL:
                    return Rejection("reject_control_chars", f"{_char(ch)} at {i}")
        if c.ascii_only:
            for i, ch in enumerate(text):
                if ord(ch) > 127:
                    return Rejection("ascii_only", f"{_char(ch)} at {i}")
        if self.scripts:
            for i, ch in enumerate(text):
                script = script_of(ch)
                if script is not None and script not in self.scripts:
                    return Rejection("allowed_scripts", f"{_char(ch)} at {i} is {script}")
        for word, rx in self.words:
            if rx.search(text):
                return Rejection("blocklist_words", f"contains {word!r}")
        for pattern, rx in self.patterns:
            if rx.search(text):
                return Rejection("blocklist_patterns", f"matches {pattern!r}")
        return None

    def check_prompt(self, text: str) -> None:
        """Raises a one-line UserError naming the rule if `text` is rejected."""
        rejection = self.check(text)
        if rejection is not None:
            raise UserError(f"prompt {rejection.message()}")


def record_text(task: str, record: dict) -> str:
    """The user-supplied input of a canonical record (what the model reads)."""
    if task == "dialogue":
        return "\n".join(record["history"])
    return record["source"] if task == "translate" else record["text"]


def filter_records(
    filt: InputFilter, task: str, records: Sequence[dict]
) -> tuple[list[dict], list[dict[str, Any]]]:
    """Splits `records` into the accepted ones and a list of rejections.

    Returns:
      ``(kept, rejected)``: kept records in their order, and one
      ``{"index", "rule", "detail"}`` per rejected record (index in `records`).
    """
    kept, rejected = [], []
    for i, rec in enumerate(records):
        r = filt.check(record_text(task, rec))
        if r is None:
            kept.append(rec)
        else:
            rejected.append({"index": i, "rule": r.rule, "detail": r.detail})
    return kept, rejected


def rejection_counts(rejected: Sequence[dict]) -> dict[str, int]:
    """Rejected records per rule, in rule order of first appearance."""
    return dict(collections.Counter(r["rule"] for r in rejected))
