"""Text augmentation: pure, seeded noise functions applied to train examples.

Every function takes the text, a rate and a ``numpy.random.Generator`` and returns
new text; none touches global state. :class:`Augmenter` applies them to records
with probability ``prob``, drawing its generator from ``(seed, index, epoch)``
alone, so the augmentation of record ``index`` in epoch ``epoch`` is the same
whatever ran before it: a resumed run (any process count) sees exactly the
augmented examples an uninterrupted one would.

Whitespace is structure (indentation in Python docs, line breaks in dialogue), so
word operations keep the separators between the words that remain, and character
operations never touch whitespace.

The synonym table :data:`SYNONYMS` is hand-written in this file: small groups of
common, interchangeable English words chosen by the jaxllm authors (no corpus or
data file was copied). Pass ``synonyms=`` to use another table, e.g. one built
from WordNet with ``nltk`` where its data is installed.

Back-translation is a hook: ``back_translate(targets) -> sources`` is any callable
(typically greedy decoding with a trained target->source model); the translate
task replaces a ``back_translate`` share of train sources with its output. It
must be deterministic for resume to stay exact.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

BackTranslate = Callable[[list[str]], list[str]]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_WORD_RE = re.compile(r"^(\W*)(\w+)(\W*)$")
_SPLIT_RE = re.compile(r"(\s+)")

# Hand-written by the jaxllm authors (see the module docstring): each group is a set
# of words that can replace each other in most contexts.
_SYNONYM_GROUPS = (
    ("big", "large", "huge"),
    ("small", "little", "tiny"),
    ("fast", "quick", "rapid"),
    ("slow", "sluggish", "unhurried"),
    ("begin", "start", "commence"),
    ("end", "finish", "conclude"),
    ("make", "create", "produce"),
    ("use", "employ", "utilize"),
    ("show", "display", "present"),
    ("get", "obtain", "fetch"),
    ("give", "provide", "supply"),
    ("help", "assist", "aid"),
    ("need", "require"),
    ("try", "attempt"),
    ("change", "modify", "alter"),
    ("check", "verify", "examine"),
    ("find", "locate", "discover"),
    ("keep", "retain", "preserve"),
    ("choose", "select", "pick"),
    ("allow", "permit", "let"),
    ("answer", "reply", "respond"),
    ("ask", "inquire", "query"),
    ("buy", "purchase"),
    ("say", "state", "tell"),
    ("think", "believe", "suppose"),
    ("happy", "glad", "cheerful"),
    ("sad", "unhappy", "gloomy"),
    ("good", "fine", "nice"),
    ("bad", "poor", "awful"),
    ("easy", "simple", "straightforward"),
    ("hard", "difficult", "tough"),
    ("smart", "clever", "bright", "intelligent"),
    ("correct", "right", "accurate"),
    ("wrong", "incorrect", "mistaken"),
    ("often", "frequently", "regularly"),
    ("maybe", "perhaps", "possibly"),
    ("also", "too", "additionally"),
    ("usually", "normally", "typically"),
    ("quickly", "rapidly", "swiftly"),
    ("very", "really", "extremely"),
    ("whole", "entire", "complete"),
    ("main", "primary", "chief"),
    ("new", "fresh", "novel"),
    ("old", "aged", "elderly"),
    ("same", "identical", "equal"),
    ("different", "distinct", "dissimilar"),
    ("important", "significant", "crucial"),
    ("common", "usual", "ordinary"),
    ("strange", "odd", "unusual"),
    ("funny", "amusing", "humorous"),
    ("car", "automobile", "vehicle"),
    ("house", "home", "dwelling"),
    ("job", "work", "occupation"),
    ("friend", "companion", "pal"),
    ("idea", "notion", "concept"),
    ("problem", "issue", "difficulty"),
    ("result", "outcome", "consequence"),
    ("error", "mistake", "fault"),
    ("part", "piece", "portion"),
    ("way", "method", "manner"),
    ("kind", "sort", "type"),
    ("talk", "speak", "chat"),
    ("look", "glance", "peek"),
    ("walk", "stroll", "wander"),
    ("like", "enjoy", "appreciate"),
    ("hate", "detest", "loathe"),
    ("movie", "film"),
    ("story", "tale", "narrative"),
    ("world", "globe", "earth"),
)


def _build_table(groups: Sequence[Sequence[str]]) -> dict[str, tuple[str, ...]]:
    table: dict[str, set[str]] = {}
    for group in groups:
        for word in group:
            table.setdefault(word, set()).update(w for w in group if w != word)
    return {w: tuple(sorted(alts)) for w, alts in table.items()}  # sorted: deterministic


SYNONYMS: dict[str, tuple[str, ...]] = _build_table(_SYNONYM_GROUPS)


# ----------------------------------------------------------------------------- characters


def char_delete(text: str, rate: float, rng: np.random.Generator) -> str:
    """Deletes each non-whitespace character with probability `rate`."""
    if rate <= 0 or not text:
        return text
    hit = rng.random(len(text)) < rate
    return "".join(c for c, h in zip(text, hit, strict=True) if not h or c.isspace())


def char_insert(text: str, rate: float, rng: np.random.Generator) -> str:
    """After each non-whitespace character, inserts a random letter with probability `rate`."""
    if rate <= 0 or not text:
        return text
    hit = rng.random(len(text)) < rate
    letters = rng.integers(0, len(_LETTERS), len(text))
    out = []
    for c, h, k in zip(text, hit, letters, strict=True):
        out.append(c)
        if h and not c.isspace():
            out.append(_LETTERS[k])
    return "".join(out)


def char_swap(text: str, rate: float, rng: np.random.Generator) -> str:
    """Swaps a non-whitespace character with the next one with probability `rate` (typos)."""
    if rate <= 0 or len(text) < 2:
        return text
    hit = rng.random(len(text)) < rate
    chars = list(text)
    i = 0
    while i < len(chars) - 1:
        if hit[i] and not chars[i].isspace() and not chars[i + 1].isspace():
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
            i += 2  # a swapped pair is not swapped again
        else:
            i += 1
    return "".join(chars)


# ----------------------------------------------------------------------------- words


def _words(text: str) -> tuple[list[str], list[str]]:
    """Splits into words and the separators between them: w0 s0 w1 s1 ... wn."""
    parts = _SPLIT_RE.split(text)
    return parts[0::2], parts[1::2]


def _join(words: list[str], seps: list[str]) -> str:
    out = [words[0]]
    for sep, word in zip(seps, words[1:], strict=True):
        out += [sep, word]
    return "".join(out)


def _stronger(a: str, b: str) -> str:
    """Of two separators, the one that carries more structure (line breaks, then width)."""
    return a if (a.count("\n"), len(a)) >= (b.count("\n"), len(b)) else b


def word_dropout(text: str, rate: float, rng: np.random.Generator) -> str:
    """Removes each word with probability `rate`.

    The separators around a removed word merge into the stronger one (a line
    break and its indentation win over a space), leading and trailing whitespace
    stay, and at least one word survives.
    """
    if rate <= 0 or not text:
        return text
    words, seps = _words(text)
    # (separator before, word) for every word; words[0] == "" means leading whitespace.
    items = [(seps[i - 1] if i else "", w) for i, w in enumerate(words) if w]
    if not items:
        return text
    lead = items[0][0]
    trailing = seps[-1] if len(words) > 1 and not words[-1] else ""
    drop = rng.random(len(items)) < rate
    if drop.all():
        drop[rng.integers(len(items))] = False
    out = [lead]
    pending = None  # separator left over from dropped words since the last kept one
    for k, ((sep, word), d) in enumerate(zip(items, drop, strict=True)):
        sep = "" if k == 0 else sep
        sep = sep if pending is None else _stronger(pending, sep)
        if d:
            pending = sep
            continue
        if len(out) > 1:  # the separator before the first kept word is the lead
            out.append(sep)
        out.append(word)
        pending = None
    if pending is not None and len(out) > 1:
        trailing = _stronger(pending, trailing) if trailing else ""
    return "".join(out) + trailing


def word_swap(text: str, rate: float, rng: np.random.Generator) -> str:
    """Swaps each word with the next one with probability `rate` (separators stay put)."""
    if rate <= 0 or not text:
        return text
    words, seps = _words(text)
    idx = [i for i, w in enumerate(words) if w]
    hit = rng.random(len(idx)) < rate
    k = 0
    while k < len(idx) - 1:
        if hit[k]:
            a, b = idx[k], idx[k + 1]
            words[a], words[b] = words[b], words[a]
            k += 2
        else:
            k += 1
    return _join(words, seps)


def _match_case(word: str, template: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def synonym_replace(
    text: str,
    rate: float,
    rng: np.random.Generator,
    synonyms: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Replaces each word found in the table with a random synonym with probability `rate`.

    Args:
      text: Input text.
      rate: Chance that a word with synonyms is replaced.
      rng: Random generator.
      synonyms: Lower-case word -> alternatives (default :data:`SYNONYMS`).

    Returns:
      The text with replacements; punctuation and capitalisation are kept.
    """
    if rate <= 0 or not text:
        return text
    table = SYNONYMS if synonyms is None else synonyms
    words, seps = _words(text)
    draws = rng.random(len(words))
    picks = rng.integers(0, 2**31, len(words))
    for i, w in enumerate(words):
        m = _WORD_RE.match(w)
        if not m or draws[i] >= rate:
            continue
        alts = table.get(m.group(2).lower())
        if alts:
            new = _match_case(alts[picks[i] % len(alts)], m.group(2))
            words[i] = m.group(1) + new + m.group(3)
    return _join(words, seps)


# ----------------------------------------------------------------------------- records

# Which fields of a canonical record are noised: inputs only, never the thing to
# predict (the label, the translation target, the dialogue response).
_NOISED_FIELDS = {"lm": ("text",), "classify": ("text",), "translate": ("source",)}


class Augmenter:
    """Applies the configured noise to records of one task, seeded per (index, epoch).

    Attributes:
      prob: Chance that an example is noised at all.
      rates: Operation name -> rate, applied in the order synonym, word_swap,
        word_dropout, char_delete, char_insert, char_swap.
      back_translate_rate: translate only: share of examples whose source is
        replaced by ``back_translate([target])``.
    """

    ORDER = ("synonym", "word_swap", "word_dropout", "char_delete", "char_insert", "char_swap")

    def __init__(
        self,
        cfg: Any,
        *,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        back_translate: BackTranslate | None = None,
    ):
        """Builds the augmenter.

        Args:
          cfg: An :class:`jaxllm.config.AugmentConfig`.
          synonyms: Synonym table (default :data:`SYNONYMS`).
          back_translate: Reverse-model hook for translate (None = no back-translation).
        """
        self.prob = float(cfg.prob)
        self.rates = {name: float(getattr(cfg, name)) for name in self.ORDER}
        self.seed = int(cfg.seed) % 2**32
        self.back_translate_rate = float(cfg.back_translate) if back_translate else 0.0
        self._synonyms = synonyms
        self._back_translate = back_translate
        self._fns = {
            "synonym": lambda t, r, g: synonym_replace(t, r, g, self._synonyms),
            "word_swap": word_swap,
            "word_dropout": word_dropout,
            "char_delete": char_delete,
            "char_insert": char_insert,
            "char_swap": char_swap,
        }

    @property
    def active(self) -> bool:
        """Whether any record can change."""
        noisy = self.prob > 0 and any(r > 0 for r in self.rates.values())
        return noisy or self.back_translate_rate > 0

    def config_id(self) -> dict[str, Any]:
        """The settings that fix the augmented data (recorded in iterator states)."""
        return {
            "prob": self.prob,
            **self.rates,
            "seed": self.seed,
            "back_translate": self.back_translate_rate,
            "synonyms": "default" if self._synonyms is None else "custom",
        }

    def noise(self, text: str, rng: np.random.Generator) -> str:
        """Applies every operation with a non-zero rate to `text`."""
        for name in self.ORDER:
            if self.rates[name] > 0:
                text = self._fns[name](text, self.rates[name], rng)
        return text

    def __call__(self, task: str, record: dict, index: int, epoch: int) -> tuple[dict, bool]:
        """Noises one record; returns (record, wants_back_translation).

        The record is copied, never changed in place. The generator is seeded from
        ``(seed, index, epoch)`` only and its draws happen in a fixed order.
        """
        rng = np.random.default_rng([self.seed, int(index), int(epoch)])
        do_noise, do_bt = rng.random(2) < (self.prob, self.back_translate_rate)
        if not do_noise:
            return record, bool(do_bt and task == "translate")
        out = dict(record)
        if task == "dialogue":
            out["history"] = [self.noise(t, rng) for t in record["history"]]
        else:
            for key in _NOISED_FIELDS.get(task, ()):
                out[key] = self.noise(record[key], rng)
        return out, bool(do_bt and task == "translate")

    def apply(
        self, task: str, records: Sequence[dict], indices: Sequence[int], epochs: Sequence[int]
    ) -> list[dict]:
        """Augments a chunk of records; back-translation runs as one batched hook call."""
        out, bt = [], []
        for k, (rec, i, e) in enumerate(zip(records, indices, epochs, strict=True)):
            new, wants_bt = self(task, rec, i, e)
            out.append(new)
            if wants_bt:
                bt.append(k)
        if bt and self._back_translate is not None:
            sources = self._back_translate([out[k]["target"] for k in bt])
            if len(sources) != len(bt):
                raise ValueError(
                    f"back_translate returned {len(sources)} texts for {len(bt)} targets"
                )
            for k, src in zip(bt, sources, strict=True):
                out[k] = {**out[k], "source": src}
        return out
