"""Task formats: canonical records -> token examples, and the length policy.

A record is a dict with the canonical fields of its task (what every data source
yields)::

    lm         {"text": str}
    classify   {"text": str, "label": int}
    translate  {"source": str, "target": str}
    dialogue   {"history": list[str], "response": str}

and becomes an :class:`Example`: ``prefix`` tokens that are given (empty for lm
and classify) and ``target`` tokens to predict::

    lm         prefix = []                            target = text + EOS
    classify   prefix = []                            target = text + EOS   (+ label)
    translate  prefix = source + SEP                  target = target + EOS
    dialogue   prefix = t1 TURN t2 ... TURN tN SEP    target = response + EOS

SEP is the ``<sep>`` piece and TURN the ``<turn>`` piece when the tokenizer has
them (``data.user_symbols``), else EOS and ``"\\n"``. In a batch row an example
of ``n = len(prefix) + len(target)`` tokens ``z`` occupies ``n`` positions:
inputs ``[BOS] + z[:-1]``, targets ``z``; the loss counts targets in the target
part, and the first ``len(prefix) + 1`` input positions (BOS and the prefix) are
the bidirectional prefix of prefix-LM.

The length policy (``data.length_policy``) fits an example into its limits:
``truncate`` cuts it, ``drop`` skips it, ``split`` (lm only) cuts a long document
into consecutive pieces. Separators are never cut; a dialogue history loses its
oldest tokens first. Every truncation, drop and split is counted in
:class:`LengthStats` and logged (the first of each kind in detail, then at
1, 10, 100, ... occurrences).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from jaxllm.errors import UserError

log = logging.getLogger("jaxllm.data")

TASKS = ("lm", "classify", "translate", "dialogue")
FIELDS = {
    "lm": ("text",),
    "classify": ("text", "label"),
    "translate": ("source", "target"),
    "dialogue": ("history", "response"),
}
PREFIX_TASKS = ("translate", "dialogue")


@dataclass(frozen=True)
class Specials:
    """Ids of the tokens the formats insert."""

    bos: int
    eos: int
    sep: int
    turn: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Specials:
        """Uses ``<sep>`` / ``<turn>`` where the vocabulary has them (else EOS / newline)."""
        eos = tokenizer.eos_id
        sep = tokenizer.piece_id("<sep>")
        turn = tokenizer.piece_id("<turn>")
        if turn is None:
            turn = tokenizer.piece_id("\n")
        return cls(
            bos=tokenizer.bos_id,
            eos=eos,
            sep=eos if sep is None else sep,
            turn=eos if turn is None else turn,
        )


@dataclass
class Example:
    """One formatted example (or one piece of a split document).

    Attributes:
      prefix: Given tokens (source and separator); empty for lm and classify.
      target: Tokens to predict.
      label: Class id (classify), else -1.
      index: Record index in its split (for logs).
    """

    prefix: list[int]
    target: list[int]
    label: int = -1
    index: int = -1

    def __len__(self) -> int:
        return len(self.prefix) + len(self.target)


def _text(record: dict, key: str, task: str, index: int) -> str:
    if key not in record:
        raise UserError(
            f"record {index} has no field '{key}' needed by task={task} (fields: "
            f"{', '.join(map(str, record))}); map it with data.fields, e.g. {key}: <name>"
        )
    value = record[key]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise UserError(
            f"record {index} field '{key}' is {type(value).__name__}, task={task} needs text"
        )
    return value


def record_texts(task: str, record: dict, index: int, history_turns: int) -> list[str]:
    """The texts of `record` to tokenize, in the order :func:`build_example` expects.

    Raises:
      UserError: If a field is missing or has the wrong type.
    """
    if task == "lm" or task == "classify":
        return [_text(record, "text", task, index)]
    if task == "translate":
        return [_text(record, "source", task, index), _text(record, "target", task, index)]
    history = record.get("history")
    if not isinstance(history, list | tuple):
        raise UserError(
            f"record {index} field 'history' must be a list of turns for task=dialogue, "
            f"got {type(history).__name__}"
        )
    turns = [_text({"turn": t}, "turn", task, index) for t in history]
    if history_turns > 0:
        turns = turns[-history_turns:]
    return [*turns, _text(record, "response", task, index)]


def _label(record: dict, index: int, num_classes: int) -> int:
    label = record.get("label")
    if isinstance(label, np.integer):
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        raise UserError(f"record {index} has label {label!r}; classify needs an int >= 0")
    if num_classes and label >= num_classes:
        raise UserError(
            f"record {index} has label {label} but model.num_classes={num_classes}; "
            f"set model.num_classes to at least {label + 1}"
        )
    return label


def build_example(
    task: str,
    record: dict,
    encoded: Sequence[Sequence[int]],
    specials: Specials,
    index: int = -1,
    num_classes: int = 0,
) -> Example:
    """Assembles an :class:`Example` from the token ids of :func:`record_texts`."""
    eos = [specials.eos]
    if task == "lm":
        return Example([], [*encoded[0], *eos], index=index)
    if task == "classify":
        return Example([], [*encoded[0], *eos], _label(record, index, num_classes), index)
    if task == "translate":
        return Example([*encoded[0], specials.sep], [*encoded[1], *eos], index=index)
    prefix: list[int] = []
    for i, turn in enumerate(encoded[:-1]):
        if i:
            prefix.append(specials.turn)
        prefix.extend(turn)
    return Example([*prefix, specials.sep], [*encoded[-1], *eos], index=index)


def format_records(
    task: str,
    records: Sequence[dict],
    tokenizer,
    *,
    history_turns: int = 0,
    indices: Sequence[int] | None = None,
    num_classes: int = 0,
    specials: Specials | None = None,
) -> list[Example]:
    """Formats records of one task, tokenizing all their texts in one batched call.

    Args:
      task: ``lm``, ``classify``, ``translate`` or ``dialogue``.
      records: Canonical records.
      tokenizer: A :class:`jaxllm.data.tokenizer.Tokenizer`.
      history_turns: dialogue: keep the last N history turns (0 = all).
      indices: Record indices in the split, for error messages and logs.
      num_classes: classify: labels must be below this (0 = unchecked).
      specials: Separator ids (default: from the tokenizer).

    Returns:
      One :class:`Example` per record.

    Raises:
      UserError: For an unknown task or a malformed record.
    """
    if task not in TASKS:
        raise UserError(f"unknown task '{task}'; valid tasks: {', '.join(TASKS)}")
    specials = specials or Specials.from_tokenizer(tokenizer)
    indices = list(range(len(records))) if indices is None else list(indices)
    texts = [record_texts(task, r, i, history_turns) for r, i in zip(records, indices, strict=True)]
    flat = [t for ts in texts for t in ts]
    ids = tokenizer.encode_batch(flat) if flat else []
    out, at = [], 0
    for record, index, ts in zip(records, indices, texts, strict=True):
        encoded = ids[at : at + len(ts)]
        at += len(ts)
        out.append(build_example(task, record, encoded, specials, index, num_classes))
    return out


# ----------------------------------------------------------------------------- length policy


@dataclass(frozen=True)
class LengthLimits:
    """Token limits of one task (see :meth:`from_config`).

    Attributes:
      seq_len: Positions per row; an example never exceeds it.
      max_source: Limit of the prefix incl. its separator (prefix tasks).
      max_target: Limit of the target incl. EOS (lm: the whole document; classify:
        the text incl. EOS, from ``data.max_source_len``).
      policy: ``truncate``, ``drop`` or ``split``.
    """

    seq_len: int
    max_source: int
    max_target: int
    policy: str

    @classmethod
    def from_config(cls, data_cfg: Any, task: str) -> LengthLimits:
        """Limits from `data.*`; a 0 max length means "whatever fits in seq_len".

        Raises:
          UserError: For ``split`` on a task other than lm, or a row too short.
        """
        L, policy = data_cfg.seq_len, data_cfg.length_policy
        if policy == "split" and task != "lm":
            raise UserError(
                f"data.length_policy=split only applies to task=lm (a {task} example cannot "
                "be cut into independent pieces); use truncate or drop"
            )
        if task in PREFIX_TASKS and L < 2:
            raise UserError(f"task={task} needs data.seq_len >= 2, got {L}")

        def cap(value: int, default: int) -> int:
            return min(value or default, default)

        if task in PREFIX_TASKS:
            return cls(
                L, cap(data_cfg.max_source_len, L - 1), cap(data_cfg.max_target_len, L - 1), policy
            )
        if task == "classify":
            return cls(L, 0, cap(data_cfg.max_source_len, L), policy)
        return cls(L, 0, cap(data_cfg.max_target_len, L), policy)


def _cut_prefix(prefix: list[int], keep: int, from_left: bool) -> list[int]:
    """Shortens `prefix` (body + separator) to `keep` tokens, keeping the separator."""
    body = prefix[:-1]
    n = keep - 1
    body = (body[len(body) - n :] if n else []) if from_left else body[:n]
    return [*body, prefix[-1]]


def fit_length(task: str, ex: Example, limits: LengthLimits) -> tuple[list[Example], str, int]:
    """Applies the length policy to one example.

    Args:
      task: The task (decides which part is cut and from which side).
      ex: The formatted example.
      limits: From :meth:`LengthLimits.from_config`.

    Returns:
      ``(pieces, event, tokens_removed)``: pieces is ``[ex]`` when it fits, ``[]``
      when dropped, several for a split; event is ``""``, ``"truncated"``,
      ``"dropped"`` or ``"split"``.
    """
    L = limits.seq_len
    if task not in PREFIX_TASKS:
        n, cap = len(ex.target), limits.max_target
        if n <= cap:
            return [ex], "", 0
        if limits.policy == "drop":
            return [], "dropped", n
        if limits.policy == "split":
            pieces = [
                Example([], ex.target[i : i + cap], ex.label, ex.index) for i in range(0, n, cap)
            ]
            return pieces, "split", 0
        # classify keeps its final EOS (the end of the input); lm just stops early.
        tgt = [*ex.target[: cap - 1], ex.target[-1]] if task == "classify" else ex.target[:cap]
        return [Example([], tgt, ex.label, ex.index)], "truncated", n - cap
    P, T = len(ex.prefix), len(ex.target)
    src_keep, tgt_keep = min(P, limits.max_source), min(T, limits.max_target)
    if src_keep + tgt_keep > L:
        # The source gives way first, but keeps at least half of the row if it needs it.
        src_keep = max(L - tgt_keep, min(src_keep, L // 2))
        tgt_keep = L - src_keep
    if (src_keep, tgt_keep) == (P, T):
        return [ex], "", 0
    if limits.policy == "drop":
        return [], "dropped", P + T
    prefix = _cut_prefix(ex.prefix, src_keep, from_left=task == "dialogue")
    out = Example(prefix, ex.target[:tgt_keep], ex.label, ex.index)
    return [out], "truncated", P + T - len(out)


@dataclass
class LengthStats:
    """Counts of what the length policy did; logs as it counts (never silent).

    Attributes:
      where: Names the data in log lines, e.g. ``"train split (translate)"``.
      counts: ``examples`` seen, ``truncated`` / ``dropped`` / ``split`` examples,
        ``pieces`` produced and ``tokens_removed`` by truncation or dropping.
    """

    where: str = "data"
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("examples", "truncated", "dropped", "split", "pieces", "tokens_removed"), 0
        )
    )

    def add(self, event: str, ex: Example, pieces: int, removed: int, limits: LengthLimits):
        """Counts one example; logs the first event of a kind and every power of ten."""
        c = self.counts
        c["examples"] += 1
        c["pieces"] += pieces
        c["tokens_removed"] += removed
        if not event:
            return
        c[event] += 1
        n = c[event]
        if n == 1:
            fix = {
                "truncated": "raise data.seq_len / data.max_source_len / data.max_target_len, "
                "or set data.length_policy=drop",
                "dropped": "raise data.seq_len / data.max_source_len / data.max_target_len, "
                "or set data.length_policy=truncate",
                "split": "raise data.seq_len to keep documents whole",
            }[event]
            log.warning(
                "%s: record %d (%d prefix + %d target tokens) exceeds the limits "
                "(seq_len=%d, max_source=%d, max_target=%d) and was %s; later ones are "
                "counted in the iterator's stats; to avoid this, %s",
                self.where, ex.index, len(ex.prefix), len(ex.target), limits.seq_len,
                limits.max_source, limits.max_target, event, fix,
            )  # fmt: skip
        elif n == 10 ** int(np.log10(n)):
            log.warning(
                "%s: %d examples %s so far (of %d seen; %d tokens removed)",
                self.where, n, event, c["examples"], c["tokens_removed"],
            )  # fmt: skip
