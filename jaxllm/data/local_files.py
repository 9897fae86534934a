"""Local data files (``.txt``, ``.tsv``, ``.jsonl``) parsed into canonical records.

Formats:

- ``.txt`` (task ``lm``): one document per line, or documents separated by blank
  lines if the file has any blank line between text.
- ``.tsv``: tab-separated rows. With no header and no ``data.fields``, columns
  are positional: ``text`` (lm), ``text<TAB>label`` (classify),
  ``source<TAB>target`` (translate), ``turn<TAB>...<TAB>response`` (dialogue: all
  columns but the last are the history), and a row with more columns than that
  is an error (a stray tab would silently shift the data). The first row is a
  header if it names the needed columns: the canonical names
  (``source<TAB>target``) or the names ``data.fields`` maps them to
  (``{text: sentence, label: sentiment}``). ``data.fields`` may instead give
  column numbers (``{text: 1, label: 0}``) for a file without a header.
- ``.jsonl``: one JSON object per line; ``data.fields`` maps canonical fields to
  keys (default: the canonical names), ``a/b`` reaches into nested objects and a
  list of keys for a text field joins their values with newlines.

Labels become ints: the index in ``data.fields.label_names`` if given (a label
outside it is an error), else in the sorted set of labels found in the file
(numerically sorted if all are integers), so every split uses the same numbering.

Bad input raises a one-line :class:`UserError` naming ``file:line`` and the fix:
missing file, empty file, non-UTF-8 bytes, invalid JSON, a missing column or key,
a label outside the label set. Text longer than :data:`MAX_FIELD_CHARS` (e.g. a
10 MB line) is truncated to that length, not refused: one freak line should not
stop a run. What is truncated or skipped (blank lines inside TSV/JSONL, records
whose text is empty) is counted in ``skipped`` and logged with ``logging.warning``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from jaxllm.data.records import LABEL_NAMES, TASK_FIELDS, field_spec
from jaxllm.errors import UserError

# SentencePiece skips sentences over 4 kB and models see a few thousand tokens, so
# 1M characters keeps every real document whole while bounding a runaway line.
MAX_FIELD_CHARS = 1_000_000
_TEXTS = ("text", "source", "target", "response")  # one string each; empty means no record
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass
class ParsedFile:
    """A whole local file as canonical records, with the key that assigns each a split."""

    task: str
    records: list[dict]
    keys: list[str]
    label_names: list[str] | None = None
    skipped: dict[str, int] = field(default_factory=dict)


def read_text_file(path: str) -> tuple[str, str]:
    """Returns (text, content hash) of a data file, with one-line errors.

    Args:
      path: An absolute file path.

    Returns:
      The UTF-8 text (a BOM removed) and the first 12 hex digits of its SHA-256.

    Raises:
      UserError: If the file is missing, not UTF-8 (naming the line) or blank.
    """
    if not os.path.isfile(path):
        raise UserError(
            f"data.source file '{path}' not found; pass an existing .txt, .tsv or .jsonl path"
        )
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise UserError(
            f"data.source file {path}:{line} is not UTF-8 (byte {raw[e.start]:#04x} at column "
            f"{column}); convert the file, e.g. iconv -f latin1 -t utf-8"
        ) from None
    if not text.strip():
        raise UserError(f"data.source file '{path}' is empty; give it at least one document")
    return text, hashlib.sha256(raw).hexdigest()[:12]


def txt_documents(text: str) -> list[tuple[int, str]]:
    """Splits ``.txt`` content into (first line number, document) pairs.

    Whitespace is normalised as in :func:`jaxllm.data.pydocs.normalise_whitespace`
    (tabs expanded, control characters and trailing spaces removed). If a blank
    line separates text anywhere, blank-line separated paragraphs are documents;
    otherwise every non-blank line is one.

    Args:
      text: The file's text.

    Returns:
      Documents in file order.
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [_CONTROL_CHARS.sub("", line.expandtabs(8)).rstrip() for line in lines]
    filled = [i for i, line in enumerate(lines) if line]
    if not filled:
        return []
    inner = lines[filled[0] : filled[-1] + 1]
    if all(inner):  # no blank line between text: one document per line
        return [(i + 1, lines[i]) for i in filled]
    docs, start = [], None
    for i, line in enumerate([*lines, ""]):
        if line and start is None:
            start = i
        elif not line and start is not None:
            docs.append((start + 1, "\n".join(lines[start:i])))
            start = None
    return docs


def infer_task(kind: str, text: str, fields: dict) -> str:
    """Guesses a file's task from `data.fields`, a TSV header or the first JSON object.

    Args:
      kind: ``txt``, ``tsv`` or ``jsonl``.
      text: The file's text.
      fields: ``data.fields``.

    Returns:
      A key of :data:`TASK_FIELDS`.

    Raises:
      UserError: If the file does not say (a header-less two-column TSV).
    """
    if kind == "txt":
        return "lm"
    names = set(fields) - {LABEL_NAMES}
    if not names:
        first = next((line for line in text.split("\n") if line.strip()), "")
        if kind == "tsv":
            names = {c.strip() for c in first.split("\t")}
        else:
            try:
                names = set(json.loads(first))
            except (ValueError, TypeError):
                names = set()
    for task in ("dialogue", "translate", "classify", "lm"):
        if set(TASK_FIELDS[task]) <= names:
            return task
    raise UserError(
        f"cannot tell the task of data.source ({kind}); set task (lm, classify, translate, "
        "dialogue), or add a header row such as source<TAB>target or text<TAB>label"
    )


def _label_ids(path: str, rows: list[tuple[int, Any]], given: Any) -> tuple[list[int], list[str]]:
    """Turns raw labels into indices into the label set (given, or found in the file)."""
    values = [str(v).strip() for _, v in rows]
    if given is not None:
        if not isinstance(given, list | tuple) or not given:
            raise UserError(f"data.fields.{LABEL_NAMES} must be a non-empty list of labels")
        names = [str(n) for n in given]
    elif all(re.fullmatch(r"-?\d+", v) for v in values):
        names = [str(n) for n in sorted({int(v) for v in values})]
    else:
        names = sorted(set(values))
    index = {n: i for i, n in enumerate(names)}
    for (line, _), v in zip(rows, values, strict=True):
        if v not in index:
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise UserError(
                f"{path}:{line}: label '{v}' is not in the label set [{shown}]; fix the row "
                f"or add it to data.fields.{LABEL_NAMES}"
            )
    return [index[v] for v in values], names


def _tsv_columns(path: str, cells: list[str], task: str, fields: dict) -> tuple[dict, bool]:
    """Column index per canonical field, and whether `cells` (the first row) is a header."""
    user = {k: v for k, v in fields.items() if k in TASK_FIELDS[task]}
    header = [c.strip() for c in cells]
    if task == "dialogue" and not user:
        return {}, False  # positional: history columns, then the response
    if user and all(isinstance(v, int) for v in user.values()):
        return {f: user.get(f) for f in TASK_FIELDS[task]}, False
    wanted = field_spec(fields, task)
    if all(isinstance(v, str) and v in header for v in wanted.values()):
        return {f: header.index(v) for f, v in wanted.items()}, True
    if user:
        raise UserError(
            f"{path}:1: data.fields names columns {wanted} but the first row is not a header "
            "naming them; add a header row or map fields to column numbers (data.fields.text=0)"
        )
    return {f: i for i, f in enumerate(TASK_FIELDS[task])}, False


def _walk(obj: dict, path: str) -> Any:
    for part in path.split("/"):
        if not isinstance(obj, dict) or part not in obj:
            raise KeyError(path)
        obj = obj[part]
    return obj


def _jsonl_rows(path: str, text: str, task: str, fields: dict, skipped) -> list[tuple[int, dict]]:
    spec = field_spec(fields, task)
    lines = text.split("\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the final newline
    rows = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            skipped["blank_line"] += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); "
                "fix the line (one JSON object per line)"
            ) from None
        if not isinstance(obj, dict):
            raise UserError(
                f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}; "
                "write one object per line"
            )
        row = {}
        for canon, where in spec.items():
            try:
                parts = [_walk(obj, w) for w in (where if isinstance(where, list) else [where])]
            except KeyError as e:
                raise UserError(
                    f"{path}:{line_no}: no field '{e.args[0]}' for {canon} (keys: "
                    f"{', '.join(obj)}); set data.fields.{canon} to one of them"
                ) from None
            if not isinstance(where, list):
                row[canon] = parts[0]
            elif canon == "history":  # one key per turn
                row[canon] = [p for p in parts if p is not None]
            else:  # several keys for one text: joined, e.g. title and body
                row[canon] = "\n".join(str(p) for p in parts if p is not None)
        rows.append((line_no, row))
    return rows


def _tsv_rows(path: str, text: str, task: str, fields: dict, skipped) -> list[tuple[int, dict]]:
    lines = text.split("\n")
    if lines and not lines[-1].strip():
        lines.pop()  # the final newline
    rows, columns, first = [], None, True
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            skipped["blank_line"] += 1
            continue
        cells = line.split("\t")
        if first:
            columns, is_header = _tsv_columns(path, cells, task, fields)
            first = False
            if is_header:
                continue
        if task == "dialogue" and not columns:
            if len(cells) < 2:
                raise UserError(
                    f"{path}:{line_no}: expected at least 2 tab-separated columns (history "
                    f"turns, then the response), found {len(cells)}; fix the row"
                )
            cells = [c.strip() for c in cells]
            rows.append((line_no, {"history": cells[:-1], "response": cells[-1]}))
            continue
        need = max(columns.values()) + 1
        positional = not fields and len(cells) > need and task != "lm"
        if len(cells) < need or positional:
            names = "<TAB>".join(TASK_FIELDS[task])
            raise UserError(
                f"{path}:{line_no}: expected {need} tab-separated columns ({names}), found "
                f"{len(cells)}; fix the row (a tab missing or inside a text?)"
            )
        rows.append((line_no, {f: cells[i].strip() for f, i in columns.items()}))
    return rows


def parse_file(path: str, kind: str, task: str, fields: dict) -> ParsedFile:
    """Reads a whole local file into canonical records (see the module docstring).

    Args:
      path: Absolute path of a ``.txt``, ``.tsv`` or ``.jsonl`` file.
      kind: ``txt``, ``tsv`` or ``jsonl``.
      task: ``lm``, ``classify``, ``translate`` or ``dialogue``.
      fields: ``data.fields``.

    Returns:
      The records, their split keys, label names (classify) and skip counts.

    Raises:
      UserError: For any bad input listed in the module docstring.
    """
    text, _ = read_text_file(path)
    skipped = collections.Counter()
    if kind == "txt":
        if task != "lm":
            raise UserError(
                f"data.source {path}: .txt files hold documents for task=lm; for task={task} "
                "use a .tsv or .jsonl file"
            )
        rows = [(line, {"text": doc}) for line, doc in txt_documents(text)]
    else:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        reader = _tsv_rows if kind == "tsv" else _jsonl_rows
        rows = reader(path, text, task, fields, skipped)
    records, keys, label_rows, truncated_at = [], [], [], []
    for line, row in rows:
        record = {}
        for name, value in row.items():
            if name == "history":
                turns = value if isinstance(value, list) else [value]
                turns = [str(t) for t in turns if t is not None and str(t).strip()]
                record[name] = [_clip(t, skipped, truncated_at, line) for t in turns]
            elif name != "label":
                value = "" if value is None else str(value)
                record[name] = _clip(value, skipped, truncated_at, line)
        if any(
            not record[f].strip() for f in ("text", "source", "target", "response") if f in record
        ):
            skipped["empty_text"] += 1
            continue
        if "label" in row:
            if row["label"] is None or not str(row["label"]).strip():
                skipped["empty_label"] += 1
                continue
            label_rows.append((line, row["label"]))
        records.append(record)
        # The split key: the input side, so e.g. one source sentence never spans two splits.
        first = record.get("text") or record.get("source") or (record.get("history") or [""])[0]
        keys.append(hashlib.sha256((first or record["response"]).encode()).hexdigest())
    if not records:
        raise UserError(f"data.source file '{path}' is empty: no usable records; check its format")
    names = None
    if task == "classify":
        ids, names = _label_ids(path, label_rows, fields.get(LABEL_NAMES))
        for record, label in zip(records, ids, strict=True):
            record["label"] = label
    skipped = {k: v for k, v in sorted(skipped.items()) if v}
    if skipped:
        where = f" (first truncation at line {truncated_at[0]})" if truncated_at else ""
        logging.warning("data.source %s: skipped or truncated %s%s", path, skipped, where)
    return ParsedFile(task, records, keys, names, skipped)


def _clip(value: str, skipped, truncated_at: list, line: int) -> str:
    if len(value) <= MAX_FIELD_CHARS:
        return value
    skipped["truncated_records"] += 1
    skipped["truncated_chars"] += len(value) - MAX_FIELD_CHARS
    truncated_at.append(line)
    return value[:MAX_FIELD_CHARS]
