"""Canonical records: the fields each task's records carry, and random access to a split.

Every data source yields dicts with the canonical fields of a task::

    lm         {"text": str}
    classify   {"text": str, "label": int}        (+ ``RecordSource.label_names``)
    translate  {"source": str, "target": str}
    dialogue   {"history": list[str], "response": str}

``data.fields`` maps these canonical names to a dataset's own field names; its one
other key, ``label_names``, gives the label set of a classify source.
"""

from __future__ import annotations

import abc
import collections.abc

from jaxllm.errors import UserError

TASK_FIELDS = {
    "lm": ("text",),
    "classify": ("text", "label"),
    "translate": ("source", "target"),
    "dialogue": ("history", "response"),
}
CANONICAL = ("text", "label", "source", "target", "history", "response")
LABEL_NAMES = "label_names"  # the one data.fields key that is not a field mapping


def check_task(task: str) -> None:
    """Raises a UserError unless `task` is one of :data:`TASK_FIELDS`."""
    if task not in TASK_FIELDS:
        raise UserError(f"unknown task '{task}'; valid tasks: {', '.join(TASK_FIELDS)}")


def field_spec(fields: dict, task: str) -> dict:
    """The canonical -> dataset field mapping for `task`, checking `data.fields`' keys.

    Args:
      fields: ``data.fields``.
      task: A key of :data:`TASK_FIELDS`.

    Returns:
      A mapping for exactly the task's fields (defaults: the canonical names).

    Raises:
      UserError: For a key that is neither a canonical field nor ``label_names``.
    """
    for key in fields:
        if key not in CANONICAL and key != LABEL_NAMES:
            raise UserError(
                f"unknown data.fields key '{key}'; valid keys: {', '.join(CANONICAL)}, "
                f"{LABEL_NAMES}"
            )
    return {f: fields.get(f, f) for f in TASK_FIELDS[task]}


class RecordSource(collections.abc.Sequence):
    """Random access to one split's canonical records (what grain and pipelines index).

    Attributes:
      spec: ``data.source`` as written.
      split: The split.
      task: The task whose canonical fields every record has.
      label_names: Class names for classify (``label`` indexes them), else None.
      skipped: What was dropped or truncated while reading the source, by reason
        (counted over the whole source, not just this split; also logged).
    """

    def __init__(self, spec, split, task, label_names=None, skipped=None):
        self.spec, self.split, self.task = spec, split, task
        self.label_names = list(label_names) if label_names is not None else None
        self.skipped = dict(skipped or {})

    @abc.abstractmethod
    def _get(self, index: int) -> dict:
        """The canonical record at a non-negative `index` (each source implements it)."""

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} out of range for {n} records")
        return self._get(index % n)

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}({self.spec!r}, split={self.split!r}, task={self.task!r}, n={len(self)})"


class ListRecords(RecordSource):
    """Records held in memory (local files)."""

    def __init__(self, records: list[dict], **kw):
        super().__init__(**kw)
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def _get(self, index: int) -> dict:
        return dict(self._records[index])  # a copy: callers may modify what they get
