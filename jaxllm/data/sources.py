"""Record sources: ``data.source`` -> random-access canonical records, one split at a time.

Every source yields dicts with the canonical fields of a task::

    lm         {"text": str}
    classify   {"text": str, "label": int}        (+ ``RecordSource.label_names``)
    translate  {"source": str, "target": str}
    dialogue   {"history": list[str], "response": str}

``data.source`` forms:

- ``embedded:pydocs`` (lm), ``embedded:numbers[/en-de|en-fr|en-es]`` (translate,
  default ``en-de``), ``embedded:chatter[/topic|dialogue|language]`` (classify,
  dialogue, classify; default ``dialogue`` for task=dialogue, else ``topic``):
  TFDS builders prepared offline under ``<data_dir>/tfds``.
- ``tfds:NAME[/CONFIG]``: any installed TFDS dataset, read with
  ``tfds.data_source`` (array_record; no TensorFlow) from ``$TFDS_DATA_DIR`` or
  ``<data_dir>/tfds``, prepared there first if needed; ``data.fields`` maps
  canonical fields to feature paths (see :mod:`jaxllm.data.tfds_source`).
- a ``.txt``, ``.tsv`` or ``.jsonl`` path: see :mod:`jaxllm.data.local_files`;
  split 90/5/5 by a stable hash of each record's input text.

Any source also serves task=lm if it has a ``text`` field (its labels ignored).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from jaxllm.config import DataConfig
from jaxllm.data import local_files, tfds_source
from jaxllm.data.chatter import Chatter
from jaxllm.data.numbers import Numbers
from jaxllm.data.pydocs import SPLITS, Pydocs, config_name, stable_split
from jaxllm.data.records import ListRecords, RecordSource, check_task
from jaxllm.errors import UserError

VALID_SOURCES = (
    "embedded:pydocs, embedded:numbers[/en-de|en-fr|en-es], "
    "embedded:chatter[/topic|dialogue|language], tfds:NAME[/CONFIG], or a path to a UTF-8 "
    ".txt, .tsv or .jsonl file"
)
# name -> (builder, {config: task}); the first config is the default.
EMBEDDED = {
    "pydocs": (Pydocs, {config_name(): "lm"}),
    "numbers": (Numbers, {"en-de": "translate", "en-fr": "translate", "en-es": "translate"}),
    "chatter": (Chatter, {"topic": "classify", "dialogue": "dialogue", "language": "classify"}),
}
_EXAMPLE = {
    "lm": "embedded:pydocs",
    "classify": "embedded:chatter/topic",
    "translate": "embedded:numbers",
    "dialogue": "embedded:chatter/dialogue",
}


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
def file_lock(path: str):
    """Exclusive advisory lock, held across processes until the block exits."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed ``data.source``."""

    kind: str  # "embedded" | "tfds" | "txt" | "tsv" | "jsonl"
    spec: str  # data.source as written
    slug: str  # names caches: tokenizers/<slug>_sp<vocab>.model, tokens/<slug>/
    name: str = ""  # embedded corpus or TFDS dataset
    config: str = ""  # builder config ("" = the dataset's default)
    path: str = ""  # local files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60]


def parse_source(cfg: DataConfig, task: str | None = None) -> SourceSpec:
    """Parses and checks `cfg.source` (a local file is read to hash its content).

    Args:
      cfg: The data config.
      task: Picks the default config of ``embedded:chatter`` (dialogue or topic).

    Returns:
      The parsed source.

    Raises:
      UserError: For an unknown form, embedded corpus or config, or a bad file.
    """
    spec = cfg.source.strip()
    fields_tag = ""
    if cfg.fields:  # different mappings of one file or dataset must not share caches
        blob = json.dumps(cfg.fields, sort_keys=True, default=str).encode()
        fields_tag = "-f" + hashlib.sha256(blob).hexdigest()[:8]
    if spec.startswith("embedded:"):
        name, _, config = spec[len("embedded:") :].partition("/")
        if name not in EMBEDDED:
            raise UserError(f"unknown embedded corpus '{spec}'; valid data.source: {VALID_SOURCES}")
        configs = EMBEDDED[name][1]
        if not config:
            config = "dialogue" if name == "chatter" and task == "dialogue" else next(iter(configs))
        if config not in configs:
            raise UserError(
                f"unknown config '{config}' of embedded:{name}; valid: "
                + ", ".join(f"embedded:{name}/{c}" for c in configs)
            )
        return SourceSpec("embedded", spec, f"{name}-{config}", name, config)
    if spec.startswith("tfds:"):
        name, _, config = spec[len("tfds:") :].partition("/")
        if not name:
            raise UserError(f"data.source '{spec}' names no dataset; write tfds:NAME[/CONFIG]")
        return SourceSpec("tfds", spec, _slug(f"tfds-{name}-{config}") + fields_tag, name, config)
    kind = spec.lower().rsplit(".", 1)[-1] if "." in os.path.basename(spec) else ""
    if kind in ("txt", "tsv", "jsonl"):
        path = os.path.abspath(os.path.expanduser(spec))
        _, digest = local_files.read_text_file(path)
        stem = _slug(os.path.basename(path)[: -len(kind) - 1])[:40]
        if kind == "txt":
            fields_tag = ""  # .txt has no fields; keeps the cache names of earlier versions
        return SourceSpec(kind, spec, f"{kind}-{stem}-{digest}{fields_tag}", path=path)
    raise UserError(f"data.source '{spec}' is not recognised; valid forms: {VALID_SOURCES}")


def _check_split(split: str, available, where: str, hint: str = "") -> None:
    base = split.split("[", 1)[0]  # TFDS slicing syntax, e.g. train[:5%]
    if available and base not in available:
        raise UserError(
            f"unknown split '{split}' for {where}; available: {', '.join(available)}{hint}"
        )


def _tfds_dir(cfg: DataConfig) -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(data_dir(cfg), "tfds")


def _tfds_records(cfg: DataConfig, source: SourceSpec, split: str, task: str) -> RecordSource:
    root = data_dir(cfg)
    where = f"data.source {source.spec}"
    if source.kind == "embedded":
        cls, configs = EMBEDDED[source.name]
        native = configs[source.config]
        if task not in (native, "lm"):  # checked before a slow prepare
            raise UserError(
                f"{where} is a {native} corpus but task={task}; set task={native} or use a "
                f"{task} source such as {_EXAMPLE[task]}"
            )
        tfds_dir = os.path.join(root, "tfds")

        def make_builder():
            return cls(config=source.config, data_dir=tfds_dir, file_format="array_record")
    else:

        def make_builder():
            return tfds_source.tfds_builder(source.name, source.config, _tfds_dir(cfg))

        make_builder()  # an unknown dataset or config fails here, before the lock
    with file_lock(os.path.join(root, "locks", f"{source.slug}.lock")):
        # Built under the lock: a builder made while another process was still preparing
        # the dataset read its info without splits, and TFDS never reloads it (CI saw
        # "splits is empty" when two test workers prepared the same corpus at once).
        builder = make_builder()
        tfds_source.prepare(builder)
    available = SPLITS if source.kind == "embedded" else list(builder.info.splits)
    _check_split(split, available, where, "; set data.train_split / data.eval_split")
    name = f"{source.name}/{source.config}" if source.config else source.name
    return tfds_source.open_split(
        builder,
        split,
        task,
        cfg.fields,
        name=name,
        spec=source.spec,
        canonical=source.kind == "embedded",
    )


@lru_cache(maxsize=4)
def _parsed(path: str, kind: str, task: str, fields_json: str, stamp: tuple):
    del stamp  # only part of the cache key: a rewritten file is read again
    return local_files.parse_file(path, kind, task, json.loads(fields_json))


def _local_records(cfg: DataConfig, source: SourceSpec, split: str, task: str) -> RecordSource:
    _check_split(split, SPLITS, f"data.source {source.spec}")
    st = os.stat(source.path)
    fields_json = json.dumps(cfg.fields, sort_keys=True, default=str)
    parsed = _parsed(source.path, source.kind, task, fields_json, (st.st_mtime_ns, st.st_size))
    # The key is the record's input text, so duplicates share a split (no train/eval leak).
    records = [
        r for r, k in zip(parsed.records, parsed.keys, strict=True) if stable_split(k) == split
    ]
    return ListRecords(
        records,
        spec=source.spec,
        split=split,
        task=task,
        label_names=parsed.label_names,
        skipped=parsed.skipped,
    )


def load_records(cfg: DataConfig, split: str, task: str) -> RecordSource:
    """The canonical records of one split of `cfg.source` for `task`.

    Args:
      cfg: The data config (``source``, ``fields``, ``data_dir``).
      split: ``train``, ``validation`` or ``test`` (TFDS sources: any split the
        dataset has, slicing such as ``train[:1%]`` included).
      task: ``lm``, ``classify``, ``translate`` or ``dialogue``.

    Returns:
      A :class:`RecordSource`: ``len``, indexing, ``.task``, ``.label_names``,
      ``.skipped``. Embedded corpora are prepared on first use (under a file lock).

    Raises:
      UserError: For an unknown task, source, dataset, config or split, a source
        without the task's fields, or bad input in a local file.
    """
    check_task(task)
    source = parse_source(cfg, task)
    if source.kind in ("embedded", "tfds"):
        return _tfds_records(cfg, source, split, task)
    return _local_records(cfg, source, split, task)


def native_task(cfg: DataConfig) -> str:
    """The task a source is made for: embedded corpora know, others are inferred.

    A TFDS dataset or file is judged by the canonical names in ``data.fields``,
    then by the defaults table / a TSV header / the first JSON object.

    Args:
      cfg: The data config.

    Returns:
      ``lm``, ``classify``, ``translate`` or ``dialogue``.

    Raises:
      UserError: If it cannot be told (set ``task`` explicitly).
    """
    source = parse_source(cfg)
    if source.kind == "embedded":
        return EMBEDDED[source.name][1][source.config]
    if source.kind == "tfds":
        if set(cfg.fields) - {"label_names"}:
            return local_files.infer_task("fields", "", cfg.fields)
        name = f"{source.name}/{source.config}" if source.config else source.name
        builder = tfds_source.tfds_builder(source.name, source.config, _tfds_dir(cfg))
        return tfds_source.guess_task(name, builder)
    text, _ = local_files.read_text_file(source.path)
    return local_files.infer_task(source.kind, text, cfg.fields)


def texts_for_tokenizer(cfg: DataConfig, split: str, task: str | None = None) -> Iterator[str]:
    """Yields every text of one split: all canonical text fields, for tokenizer training.

    Args:
      cfg: The data config.
      split: Usually ``data.train_split``.
      task: The task to read the source as; default :func:`native_task`.

    Yields:
      Strings: ``text``; ``source`` then ``target``; history turns (each distinct
      turn once, since a turn recurs in the histories of later turns) then
      ``response``. Labels are not text and are left out.
    """
    task = task or native_task(cfg)
    records = load_records(cfg, split, task)
    seen_turns = set()
    for i in range(len(records)):
        record = records[i]
        for name in ("text", "source", "target"):
            if name in record:
                yield record[name]
        for turn in record.get("history", ()):
            if turn not in seen_turns:
                seen_turns.add(turn)
                yield turn
        if "response" in record:
            seen_turns.add(record["response"])  # it comes back as history of the next turn
            yield record["response"]
