"""Tests for jaxllm.data.sources: TFDS datasets by name, local files, and bad input."""

from __future__ import annotations

import json
import logging
import os
import sys

import pytest
import tensorflow_datasets as tfds
from etils import epath

from jaxllm.config import DataConfig
from jaxllm.data import load_records, sources, texts_for_tokenizer
from jaxllm.data.local_files import MAX_FIELD_CHARS
from jaxllm.data.pydocs import SPLITS
from jaxllm.errors import UserError


def _cfg(source, tmp, **kw) -> DataConfig:
    return DataConfig(source=str(source), data_dir=str(tmp), **kw)


def _list(src) -> list[dict]:
    return [src[i] for i in range(len(src))]


def _error(call, *patterns: str) -> str:
    """Runs `call`, expects a one-line UserError containing every pattern; returns it."""
    with pytest.raises(UserError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


# ----------------------------------------------------------------------------- TFDS by name


@pytest.fixture
def mocked(tmp_path):
    """TFDS mocked for one test: 12 random examples per split, array_record data sources."""
    with tfds.testing.mock_data(num_examples=12):
        yield tmp_path


def test_lm1b_gives_text_records(mocked):
    src = load_records(_cfg("tfds:lm1b", mocked), "train", "lm")
    assert len(src) == 12 and src.task == "lm" and src.label_names is None
    assert all(set(r) == {"text"} and isinstance(r["text"], str) for r in _list(src))
    assert src[-1] == src[11]


def test_glue_sst2_gives_classify_records_with_label_names(mocked):
    src = load_records(_cfg("tfds:glue/sst2", mocked), "validation", "classify")
    assert src.label_names == ["negative", "positive"]
    records = _list(src)
    assert all(set(r) == {"text", "label"} and isinstance(r["text"], str) for r in records)
    assert all(type(r["label"]) is int and r["label"] in (0, 1) for r in records)
    mnli = load_records(
        _cfg("tfds:glue/mnli", mocked, fields={"text": ["premise", "hypothesis"]}),
        "train",
        "classify",
    )
    assert mnli.label_names == ["entailment", "neutral", "contradiction"]
    assert all(r["text"].count("\n") >= 1 for r in _list(mnli))  # two features joined


def test_wmt14_and_cnn_dailymail_give_translate_records(mocked):
    de_en = load_records(_cfg("tfds:wmt14_translate/de-en", mocked), "train", "translate")
    swapped = load_records(
        _cfg("tfds:wmt14_translate/de-en", mocked, fields={"source": "en", "target": "de"}),
        "train",
        "translate",
    )
    for a, b in zip(_list(de_en), _list(swapped), strict=True):
        assert set(a) == {"source", "target"} and a["source"] == b["target"]
        assert a["target"] == b["source"] and isinstance(a["source"], str)
    cnn = load_records(_cfg("tfds:cnn_dailymail", mocked), "test", "translate")
    assert len(cnn) == 12 and all(set(r) == {"source", "target"} for r in _list(cnn))
    texts = list(texts_for_tokenizer(_cfg("tfds:wmt14_translate/de-en", mocked), "train"))
    assert texts[:2] == [de_en[0]["source"], de_en[0]["target"]]  # task inferred: translate


def test_tfds_user_errors(mocked):
    _error(
        lambda: load_records(_cfg("tfds:lm1c", mocked), "train", "lm"),
        "unknown TFDS dataset 'lm1c'",
        "did you mean lm1b",
    )
    _error(
        lambda: load_records(_cfg("tfds:glue/sst3", mocked), "train", "classify"),
        "unknown config 'sst3'",
        "sst2",
    )
    _error(
        lambda: load_records(_cfg("tfds:lm1b", mocked, fields={"text": "body"}), "train", "lm"),
        "no feature 'body' (data.fields.text); features: text",
    )
    _error(
        lambda: load_records(_cfg("tfds:lm1b", mocked, fields={"body": "text"}), "train", "lm"),
        "unknown data.fields key 'body'",
    )
    _error(
        lambda: load_records(_cfg("tfds:lm1b", mocked), "train", "dialogue"),
        "no default for field(s) history, response",
        "data.fields",
    )
    _error(lambda: load_records(_cfg("tfds:lm1b", mocked), "train", "summarise"), "unknown task")


class TinyNested(tfds.core.GeneratorBasedBuilder):
    """A local TFDS builder: nested features, a text label and a history sequence."""

    VERSION = tfds.core.Version("1.0.0")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "translation": tfds.features.FeaturesDict({"en": text, "fr": text}),
                    "turns": tfds.features.Sequence(text),
                    "mood": text,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        if os.environ.get("TINY_NEEDS_TF"):
            import tensorflow  # noqa: F401  (what many catalogue builders do)
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            yield (
                i,
                {
                    "translation": {"en": f"{i} apples", "fr": f"{i} pommes"},
                    "turns": [f"turn {j}" for j in range(i % 3 + 1)],
                    "mood": ["happy", "sad"][i % 2],
                },
            )


def test_tfds_nested_paths_sequences_and_text_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    fields = {"source": "translation/en", "target": "translation/fr"}
    src = load_records(_cfg("tfds:tiny_nested", tmp_path, fields=fields), "train", "translate")
    assert sorted(r["source"] for r in _list(src)) == [f"{i} apples" for i in range(5)]
    assert all(r["target"] == r["source"].replace("apples", "pommes") for r in _list(src))
    dia = load_records(
        _cfg("tfds:tiny_nested", tmp_path, fields={"history": "turns", "response": "mood"}),
        "train",
        "dialogue",
    )
    assert all(isinstance(r["history"], list) and r["history"][0] == "turn 0" for r in _list(dia))
    cls = _cfg(
        "tfds:tiny_nested",
        tmp_path,
        fields={"text": "translation/en", "label": "mood", "label_names": ["sad", "happy"]},
    )
    labelled = load_records(cls, "train", "classify")
    assert labelled.label_names == ["sad", "happy"]
    assert {r["text"][0]: r["label"] for r in _list(labelled)} == {
        "0": 1,
        "1": 0,
        "2": 1,
        "3": 0,
        "4": 1,
    }
    _error(
        lambda: load_records(cls, "validation", "classify"), "unknown split 'validation'", "train"
    )
    # A dataset prepared as tfrecord can only be read through TensorFlow.
    info_path = tmp_path / "tfds" / "tiny_nested" / "1.0.0" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info_path.write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    _error(lambda: load_records(cls, "train", "classify"), "pip install 'jaxllm[tf]'", "tfds build")


def test_tfds_preparation_that_needs_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv("TINY_NEEDS_TF", "1")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # absent even where it is installed
    _error(
        lambda: load_records(
            _cfg("tfds:tiny_nested", tmp_path, fields={"text": "mood"}), "train", "lm"
        ),
        "needs TensorFlow",
        "pip install 'jaxllm[tf]'",
    )


def test_embedded_source_errors(tmp_path):
    _error(
        lambda: load_records(_cfg("embedded:numbers/en-it", tmp_path), "train", "translate"),
        "unknown config 'en-it' of embedded:numbers",
        "embedded:numbers/en-fr",
    )
    _error(
        lambda: load_records(_cfg("embedded:wiki", tmp_path), "train", "lm"),
        "unknown embedded corpus 'embedded:wiki'",
        "embedded:chatter",
    )
    _error(lambda: load_records(_cfg("data.csv", tmp_path), "train", "lm"), "not recognised")
    spec = sources.parse_source(_cfg("embedded:chatter", tmp_path), "dialogue")
    assert (spec.config, spec.slug) == ("dialogue", "chatter-dialogue")
    assert sources.parse_source(_cfg("embedded:chatter", tmp_path), "classify").config == "topic"
    _error(
        lambda: load_records(_cfg("embedded:numbers", tmp_path), "train", "classify"),
        "is a translate corpus but task=classify",
        "embedded:chatter/topic",
    )
    _error(
        lambda: load_records(_cfg("embedded:pydocs", tmp_path), "train", "dialogue"),
        "set task=lm",
    )


# ----------------------------------------------------------------------------- local files


def _write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def _by_split(cfg: DataConfig, task: str) -> dict[str, list[dict]]:
    return {s: _list(load_records(cfg, s, task)) for s in SPLITS}


def test_tsv_translate_positional_and_header(tmp_path):
    rows = [(f"I have {i} cats.", f"J'ai {i} chats.") for i in range(300)]
    rows.append(rows[7])  # a repeated pair lands in the same split as its twin
    plain = _write(tmp_path / "pairs.tsv", "".join(f"{s}\t{t}\n" for s, t in rows))
    splits = _by_split(_cfg(plain, tmp_path), "translate")
    assert sum(map(len, splits.values())) == 301
    assert all(set(r) == {"source", "target"} for recs in splits.values() for r in recs)
    assert 240 < len(splits["train"]) < 300 and splits["validation"] and splits["test"]
    src = {s: {r["source"] for r in recs} for s, recs in splits.items()}
    assert not src["train"] & src["validation"] and not src["train"] & src["test"]
    header = _write(
        tmp_path / "header.tsv", "target\tsource\n" + "".join(f"{t}\t{s}\n" for s, t in rows)
    )
    assert _by_split(_cfg(header, tmp_path), "translate") == splits  # columns found by name
    texts = list(texts_for_tokenizer(_cfg(header, tmp_path), "validation"))
    assert texts == [x for r in splits["validation"] for x in (r["source"], r["target"])]


def test_tsv_classify_with_field_mapping_and_label_names(tmp_path):
    lines = ["id\tsentiment\tsentence"] + [
        f"{i}\t{'pos' if i % 3 else 'neg'}\tReview {i} text." for i in range(90)
    ]
    path = _write(tmp_path / "reviews.tsv", "\n".join(lines) + "\n")
    cfg = _cfg(path, tmp_path, fields={"text": "sentence", "label": "sentiment"})
    recs = [r for rs in _by_split(cfg, "classify").values() for r in rs]
    src = load_records(cfg, "train", "classify")
    assert src.label_names == ["neg", "pos"] and len(recs) == 90
    assert all(r["label"] == (1 if int(r["text"].split()[1]) % 3 else 0) for r in recs)
    bare = _write(tmp_path / "bare.tsv", "\n".join(lines[1:]))  # numbered columns: no header
    names = ["pos", "neg", "meh"]
    given = _cfg(bare, tmp_path, fields={"text": 2, "label": 1, "label_names": names})
    src = load_records(given, "train", "classify")
    assert src.label_names == ["pos", "neg", "meh"]
    assert all(r["label"] in (0, 1) for r in _list(src))
    positional = _write(
        tmp_path / "numeric.tsv", "".join(f"text {i}\t{i % 3}\n" for i in range(60))
    )
    src = load_records(_cfg(positional, tmp_path), "train", "classify")
    assert src.label_names == ["0", "1", "2"]
    assert all(r["label"] == int(r["text"].split()[1]) % 3 for r in _list(src))


def test_tsv_dialogue_and_jsonl_mapping(tmp_path):
    tsv = _write(tmp_path / "chat.tsv", "hi\thello\thow are you?\n" * 3 + "bye\tsee you\n")
    recs = [r for rs in _by_split(_cfg(tsv, tmp_path), "dialogue").values() for r in rs]
    assert {"history": ["hi", "hello"], "response": "how are you?"} in recs
    assert {"history": ["bye"], "response": "see you"} in recs
    lines = [
        {"meta": {"lang": "en", "text": f"Doc {i}"}, "title": f"T{i}", "tag": ["a", "b"][i % 2]}
        for i in range(40)
    ]
    path = _write(tmp_path / "docs.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    cfg = _cfg(path, tmp_path, fields={"text": ["title", "meta/text"], "label": "tag"})
    recs = [r for rs in _by_split(cfg, "classify").values() for r in rs]
    assert sorted(r["text"] for r in recs) == sorted(f"T{i}\nDoc {i}" for i in range(40))
    assert all(r["label"] == int(r["text"].split()[-1]) % 2 for r in recs)
    dialog = _write(
        tmp_path / "dialog.jsonl",
        "".join(json.dumps({"history": ["a", "b"], "response": f"c{i}"}) + "\n" for i in range(9)),
    )
    recs = _list(load_records(_cfg(dialog, tmp_path), "train", "dialogue"))
    assert recs and all(r["history"] == ["a", "b"] for r in recs)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "content", "task", "fields", "patterns"),
    [
        ("empty.tsv", b"\n \n", "translate", {}, ["empty.tsv' is empty"]),
        ("empty.jsonl", b"", "lm", {}, ["empty.jsonl' is empty"]),
        (
            "latin1.tsv",
            b"a\tb\nc\td\ncaf\xe9\tx\n",
            "translate",
            {},
            ["latin1.tsv:3 is not UTF-8", "iconv"],
        ),
        ("short.tsv", b"a\tb\nc\n", "translate", {}, ["short.tsv:2: expected 2", "found 1"]),
        ("wide.tsv", b"a\tb\tc\n", "classify", {}, ["wide.tsv:1: expected 2", "found 3"]),
        ("bad.jsonl", b'{"text": "a"}\n{"text": \n', "lm", {}, ["bad.jsonl:2: not valid JSON"]),
        ("list.jsonl", b'{"text": "a"}\n[1]\n', "lm", {}, ["list.jsonl:2: expected a JSON object"]),
        ("keys.jsonl", b'{"body": "a"}\n', "lm", {}, ["keys.jsonl:1: no field 'text'", "body"]),
        (
            "labels.tsv",
            b"good\tpos\nbad\tneg\nhmm\tneutral\n",
            "classify",
            {"text": 0, "label": 1, "label_names": ["neg", "pos"]},
            ["labels.tsv:3: label 'neutral' is not in the label set [neg, pos]", "label_names"],
        ),
        (
            "header.tsv",
            b"a\tb\n",
            "classify",
            {"text": "sentence", "label": "label"},
            ["first row is not a header", "data.fields.text=0"],
        ),
        ("notes.txt", b"one\ntwo\n", "classify", {}, [".txt files hold documents for task=lm"]),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, name, content, task, fields, patterns):
    path = _write(tmp_path / name, content)
    _error(lambda: load_records(_cfg(path, tmp_path, fields=fields), "train", task), *patterns)


def test_missing_file_and_unknown_split(tmp_path):
    _error(
        lambda: load_records(_cfg(tmp_path / "gone.jsonl", tmp_path), "train", "lm"), "not found"
    )
    path = _write(tmp_path / "ok.tsv", "a\tb\n")
    _error(lambda: load_records(_cfg(path, tmp_path), "dev", "translate"), "unknown split 'dev'")


def test_huge_lines_are_truncated_and_skips_are_counted(tmp_path, caplog):
    huge = "x" * (10 * 1024 * 1024)
    path = _write(tmp_path / "big.tsv", f"short\tcourt\n\n{huge}\tlong\nempty\t \nok\tbien\n")
    with caplog.at_level(logging.WARNING):
        parts = [load_records(_cfg(path, tmp_path), s, "translate") for s in SPLITS]
    recs = [r for p in parts for r in _list(p)]
    assert len(recs) == 3 and max(len(r["source"]) for r in recs) == MAX_FIELD_CHARS
    assert parts[0].skipped == {
        "blank_line": 1,
        "empty_text": 1,
        "truncated_chars": len(huge) - MAX_FIELD_CHARS,
        "truncated_records": 1,
    }
    assert "big.tsv" in caplog.text and "first truncation at line 3" in caplog.text
    txt = _write(tmp_path / "big.txt", f"a line\n{huge}\n")
    src = load_records(_cfg(txt, tmp_path), "train", "lm")
    assert src.skipped["truncated_records"] == 1
