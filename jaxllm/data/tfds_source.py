"""Any TFDS dataset as canonical records, read through ``tfds.data_source`` (no TensorFlow).

``data.fields`` maps canonical fields to feature paths: ``translation/en`` reaches
into a nested FeaturesDict, and a list of paths for one text field joins their
values with newlines (``{text: [premise, hypothesis]}`` for glue/mnli). Without
a mapping the defaults are, in order: the table :data:`TFDS_FIELDS`; the
dataset's ``supervised_keys`` (input, target) as text/label or source/target;
features named like the canonical fields.

Only array_record can be read without TensorFlow. A dataset already prepared as
tfrecord, or whose preparation imports TensorFlow, raises a UserError saying to
install the ``tf`` extra. Labels are ClassLabel ints as stored (GLUE test splits
carry -1, "unknown"); a text label is mapped through ``data.fields.label_names``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxllm.data.records import LABEL_NAMES, TASK_FIELDS, RecordSource, field_spec
from jaxllm.errors import UserError

# Defaults for well-known datasets whose supervised_keys are missing or not the fields one
# trains on. Translation pairs follow TFDS' supervised_keys: wmt14_translate/de-en is
# de -> en; swap them with data.fields={source: en, target: de}.
TFDS_FIELDS = {
    "lm1b": {"text": "text"},
    "glue/cola": {"text": "sentence", "label": "label"},
    "glue/sst2": {"text": "sentence", "label": "label"},
    "imdb_reviews": {"text": "text", "label": "label"},
    "ag_news_subset": {"text": "description", "label": "label"},
    "cnn_dailymail": {"source": "article", "target": "highlights", "text": "article"},
}
# TFDS registers its catalogue builders by importing these packages (lazily, so a bare
# `import tensorflow_datasets` does not know glue or wmt14_translate).
_TEXT_PACKAGES = ("text", "translate", "summarization", "question_answering")
TF_EXTRA = "install the tf extra: pip install 'jaxllm[tf]'"


def _text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _walk(record: dict, path: str) -> Any:
    for part in path.split("/"):
        record = record[part]
    return record


class TfdsRecords(RecordSource):
    """A TFDS data source with values picked by feature path and decoded to Python types."""

    def __init__(self, source, mapping: dict, label_index: dict | None = None, **kw):
        super().__init__(**kw)
        self._source, self._mapping, self._label_index = source, mapping, label_index

    def __len__(self) -> int:
        return len(self._source)

    def _get(self, index: int) -> dict:
        raw = self._source[index]
        out = {}
        for canon, where in self._mapping.items():
            values = [_walk(raw, w) for w in (where if isinstance(where, list) else [where])]
            if canon == "history":
                turns = [v for value in values for v in np.atleast_1d(np.asarray(value, object))]
                out[canon] = [_text(t) for t in turns]
            elif canon != "label":
                out[canon] = "\n".join(_text(v) for v in values)
            elif self._label_index is None:
                out[canon] = int(np.asarray(values[0]))
            else:  # a text label, numbered by data.fields.label_names
                label = _text(values[0])
                if label not in self._label_index:
                    raise UserError(
                        f"{self.spec} ({self.split}) record {index}: label '{label}' is not in "
                        f"data.fields.{LABEL_NAMES} {list(self._label_index)}; add it there"
                    )
                out[canon] = self._label_index[label]
        return out


def feature_paths(features, prefix: str = "") -> dict[str, Any]:
    """Flattens a FeaturesDict into ``{"a/b": feature}`` (nested dicts included)."""
    out = {}
    for key in features.keys():  # noqa: SIM118 (FeaturesDict is not a Mapping)
        feature = features[key]
        path = f"{prefix}{key}"
        out[path] = feature
        if hasattr(feature, "keys") and not isinstance(feature, tfds.features.Sequence):
            out.update(feature_paths(feature, f"{path}/"))
    return out


def _defaults(name: str, info, task: str, paths: dict) -> dict:
    table = TFDS_FIELDS.get(name) or TFDS_FIELDS.get(name.split("/")[0]) or {}
    wanted = TASK_FIELDS[task]
    if all(f in table for f in wanted):
        return {f: table[f] for f in wanted}
    keys = info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        pair = {"classify": ("text", "label"), "translate": ("source", "target")}.get(task)
        if pair:
            return dict(zip(pair, keys, strict=True))
        if task == "lm" and isinstance(paths.get(keys[0]), tfds.features.Text):
            return {"text": "text" if "text" in paths else keys[0]}
    return {f: f for f in wanted if f in paths}


def guess_task(name: str, builder) -> str:
    """A dataset's task from the defaults table, else its (input, target) feature types."""
    names = set(TFDS_FIELDS.get(name) or TFDS_FIELDS.get(name.split("/")[0], {}))
    for task in ("translate", "classify", "lm"):
        if set(TASK_FIELDS[task]) <= names:
            return task
    info = builder.info
    paths = feature_paths(info.features)
    keys = info.supervised_keys if isinstance(info.supervised_keys, tuple) else ()
    kinds = [type(paths.get(k)) for k in keys if isinstance(k, str)]
    if kinds == [tfds.features.Text, tfds.features.Text]:
        return "translate"
    if kinds == [tfds.features.Text, tfds.features.ClassLabel]:
        return "classify"
    return "lm"


def _tf_only(name: str, tfds_dir: str) -> str:
    return (
        f"TFDS dataset '{name}' in {tfds_dir} is stored as tfrecord, which only TensorFlow "
        f"reads; {TF_EXTRA} and re-prepare it with "
        f"`tfds build {name} --file_format=array_record --data_dir {tfds_dir}`"
    )


def tfds_builder(name: str, config: str, tfds_dir: str):
    """The builder of a catalogue (or registered) dataset, set to write array_record.

    Raises:
      UserError: For an unknown dataset or config, or one stored as tfrecord.
    """
    for package in _TEXT_PACKAGES:
        with contextlib.suppress(Exception):  # a package that needs TF just stays unregistered
            importlib.import_module(f"tensorflow_datasets.{package}")
    full = f"{name}/{config}" if config else name
    try:
        return tfds.builder(full, data_dir=tfds_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        close = difflib.get_close_matches(name, tfds.core.registered.list_imported_builders())
        hint = f"did you mean {', '.join(close)}?" if close else "see tfds.list_builders()"
        raise UserError(
            f"unknown TFDS dataset '{name}' in data.source tfds:{full}; {hint}"
        ) from None
    except ValueError as e:
        if "File format is already set" in str(e):  # prepared as tfrecord in tfds_dir
            raise UserError(_tf_only(full, tfds_dir)) from None
        if "BuilderConfig" not in str(e):
            raise
        configs = [c.name for c in tfds.builder_cls(name).BUILDER_CONFIGS]
        shown = ", ".join(configs[:30]) + (", ..." if len(configs) > 30 else "")
        raise UserError(
            f"unknown config '{config}' of TFDS dataset '{name}'; valid: {shown}"
        ) from None


def prepare(builder) -> None:
    """Prepares `builder` unless it is; the caller holds a lock (processes may race).

    Raises:
      UserError: If preparing needs TensorFlow, which is not installed.
    """
    if builder.is_prepared():
        return
    tfds.display_progress_bar(False)
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    except ImportError as e:
        if "tensorflow" not in str(e).lower():
            raise
        raise UserError(
            f"preparing TFDS dataset '{builder.name}' needs TensorFlow; {TF_EXTRA}, or "
            "prepare it elsewhere as array_record and set TFDS_DATA_DIR"
        ) from None


def open_split(
    builder, split: str, task: str, fields: dict, *, name: str, spec: str, canonical: bool
) -> TfdsRecords:
    """One split of a prepared builder as canonical records.

    Args:
      builder: A prepared builder.
      split: A split name (TFDS slicing allowed).
      task: A key of :data:`TASK_FIELDS`.
      fields: ``data.fields``.
      name: ``NAME[/CONFIG]``, to look up :data:`TFDS_FIELDS`.
      spec: ``data.source`` as written, for messages.
      canonical: The features already have canonical names (embedded corpora).

    Returns:
      The records; ``skipped`` comes from the dataset metadata if it has any.

    Raises:
      UserError: For missing or unknown fields, or a dataset only TensorFlow reads.
    """
    where = f"data.source {spec}"
    info = builder.info
    paths = feature_paths(info.features)
    field_spec(fields, task)  # rejects unknown data.fields keys
    if canonical:
        defaults = {f: f for f in TASK_FIELDS[task] if f in paths}
    else:
        defaults = _defaults(name, info, task, paths)
    user = {f: v for f, v in fields.items() if f in TASK_FIELDS[task]}
    mapping = {f: m for f in TASK_FIELDS[task] if (m := user.get(f, defaults.get(f)))}
    missing = [f for f in TASK_FIELDS[task] if f not in mapping]
    listed = ", ".join(paths)
    if missing:
        raise UserError(
            f"{where} has no default for field(s) {', '.join(missing)} of task={task}; set "
            f"data.fields (e.g. data.fields.{missing[0]}=FEATURE), features: {listed}"
        )
    for canon, path in mapping.items():
        for p in path if isinstance(path, list) else [path]:
            if p not in paths:
                raise UserError(
                    f"{where} has no feature '{p}' (data.fields.{canon}); features: {listed}"
                )
    label_names, label_index = None, None
    if task == "classify":
        feature = paths[mapping["label"]]
        if isinstance(feature, tfds.features.ClassLabel):
            label_names = list(feature.names)
        elif fields.get(LABEL_NAMES):
            label_names = [str(n) for n in fields[LABEL_NAMES]]
            if isinstance(feature, tfds.features.Text):
                label_index = {n: i for i, n in enumerate(label_names)}
    try:
        source = builder.as_data_source(split)
    except (NotImplementedError, ValueError) as e:
        if "format" not in str(e).lower():
            raise
        raise UserError(_tf_only(builder.name, os.path.dirname(builder.data_dir))) from None
    skipped = dict(info.metadata.get("skipped", {})) if info.metadata else {}
    return TfdsRecords(
        source, mapping, label_index, spec=spec, split=split, task=task,
        label_names=label_names, skipped=skipped,
    )  # fmt: skip
