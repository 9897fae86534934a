"""Tests for jaxllm.data: the pydocs corpus, tokenizer, and the grain LM iterator."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxllm import data
from jaxllm.config import Config
from jaxllm.data import pipeline
from jaxllm.data.pydocs import SPLITS, config_name, stable_split
from jaxllm.errors import UserError

KEYS = ("inputs", "targets", "weights")


def _with(cfg: Config, *, model: dict | None = None, **data_kw) -> Config:
    """A copy of `cfg` with `data.*` (and optionally `model.*`) fields replaced."""
    new_model = dataclasses.replace(cfg.model, **(model or {}))
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_kw), model=new_model)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """pydocs prepared and a 4096-piece tokenizer trained once, in a temp data dir."""
    cfg = _with(Config(), data_dir=str(tmp_path_factory.mktemp("jaxllm_data")))
    return cfg, data.get_tokenizer(cfg)


def _windows(tokens: np.ndarray, span: int) -> dict[bytes, int]:
    """Maps each full window's int32 bytes to its index in the stream."""
    n = len(tokens) // span
    rows = np.asarray(tokens[: n * span], np.int32).reshape(n, span)
    return {row.tobytes(): k for k, row in enumerate(rows)}


def _rows(batch: dict) -> np.ndarray:
    """The seq_len+1 token windows a batch was cut from."""
    return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def _take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------- corpus


def test_pydocs_is_real_text_with_disjoint_splits(env):
    cfg, _ = env
    tfds_dir = os.path.join(data.data_dir(cfg.data), "tfds")
    ids, texts = {}, {}
    for split in SPLITS:
        records = tfds.data_source("pydocs", split=split, data_dir=tfds_dir)
        ids[split] = [records[i]["id"].decode() for i in range(len(records))]
        texts[split] = [records[i]["text"].decode() for i in range(len(records))]
        assert all(stable_split(i) == split for i in ids[split])
        assert texts[split] == data.load_split_texts(cfg.data, split)  # same order, same text
    all_ids = [i for s in SPLITS for i in ids[s]]
    all_text = [t for s in SPLITS for t in texts[s]]
    size = sum(len(t.encode()) for t in all_text)
    assert size > 2_000_000, size  # measured 2.47 MB on Python 3.11
    assert len(all_ids) > 3000, len(all_ids)  # measured 3584 documents
    assert len(set(all_ids)) == len(all_ids)  # ids unique, so the splits are disjoint
    assert len(ids["validation"]) > 100 and len(ids["test"]) > 100
    assert 0.85 < len(ids["train"]) / len(all_ids) < 0.95
    by_id = dict(zip(all_ids, all_text, strict=True))
    assert "assert" in by_id["topic:assert"]
    assert by_id["class:json.decoder.JSONDecoder"].startswith(
        "class JSONDecoder(object) in module json.decoder\n\nSimple JSON"
    )
    assert not [
        i for i in all_ids if ".test." in i or "idlelib" in i or i.startswith("module:test")
    ]
    for t in all_text:  # whitespace-normalised, paragraphs kept
        assert "\t" not in t and "\r" not in t and "\n\n\n" not in t
        assert t == t.strip("\n") and all(line == line.rstrip() for line in t.split("\n"))
    assert sum("\n\n" in t for t in all_text) > 1000


def test_stable_split_is_fixed():
    assert [stable_split(k) for k in ("topic:assert", "j", "l", "a")] == [
        "train",
        "validation",
        "test",
        "train",
    ]
    counts = [stable_split(str(i)) for i in range(20000)]
    assert 0.04 < counts.count("validation") / 20000 < 0.06
    assert 0.04 < counts.count("test") / 20000 < 0.06


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_and_is_cached(env):
    cfg, tok = env
    assert tok.vocab_size == 4096
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert os.path.basename(tok.path).startswith(f"pydocs-{config_name()}_bpe4096_")
    texts = data.load_split_texts(cfg.data, "validation")
    ids = tok.encode_batch(texts)
    assert ids == [tok.encode(t) for t in texts]
    assert [tok.decode(i) for i in ids] == texts
    chars_per_token = sum(map(len, texts)) / sum(map(len, ids))
    assert 3.0 < chars_per_token < 4.5, chars_per_token  # measured 3.34 on train
    odd = "héllo wörld — 你好 🙂\n\tindented  x\n\n  y"
    assert tok.decode(tok.encode(odd)) == odd  # byte fallback: no <unk>
    assert tok.unk_id not in tok.encode(odd)
    assert tok.decode([tok.bos_id, *tok.encode("def f():"), tok.eos_id, 0, 0]) == "def f():"
    assert pickle.loads(pickle.dumps(tok)).encode("x = 1") == tok.encode("x = 1")
    mtime = os.path.getmtime(tok.path)
    again = data.get_tokenizer(cfg)
    assert again.path == tok.path and os.path.getmtime(tok.path) == mtime
    assert again.fingerprint == tok.fingerprint


def test_train_tokenizer_is_deterministic_and_atomic(env, tmp_path):
    cfg, _ = env
    texts = data.load_split_texts(cfg.data, "validation")
    a = data.train_tokenizer(texts, 512, str(tmp_path / "a.model"))
    data.train_tokenizer(texts, 512, str(tmp_path / "b.model"))
    assert a.vocab_size == 512
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]  # no temp files left
    with pytest.raises(UserError, match="at least"):
        data.train_tokenizer(texts, 100, str(tmp_path / "c.model"))


def test_cached_tokenizer_is_keyed_by_text_and_settings(tmp_path):
    from pydoc_data.topics import topics

    from jaxllm.data.tokenizer import cached_tokenizer, tokenizer_cache_key

    texts = [topics[k] for k in sorted(topics)][:200]
    kw = dict(name="topics", user_symbols=["<sep>", "<turn>"])
    bpe = cached_tokenizer(texts, 512, str(tmp_path), **kw)
    assert [bpe.id_to_piece(i) for i in range(4, 7)] == ["\n", "<sep>", "<turn>"]
    assert bpe.piece_id("<sep>") == 5 and bpe.piece_id("<cls>") is None
    assert bpe.encode("a<sep>b").count(5) == 1  # a task token is always one piece
    assert cached_tokenizer(texts, 512, str(tmp_path), **kw).path == bpe.path  # cache hit
    uni = cached_tokenizer(texts, 512, str(tmp_path), model_type="unigram", **kw)
    assert uni.path != bpe.path and uni.piece_id("<turn>") == 6
    assert uni.decode(uni.encode("héllo 🙂\n  x")) == "héllo 🙂\n  x"  # byte fallback
    changed = cached_tokenizer([*texts[:-1], texts[-1] + " extra"], 512, str(tmp_path), **kw)
    assert changed.path != bpe.path  # a changed corpus never reuses a stale model
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".model")]) == 3
    key = tokenizer_cache_key(["ab", "c"], 512)
    assert key != tokenizer_cache_key(["a", "bc"], 512) != tokenizer_cache_key(["ab", "c"], 600)
    with pytest.raises(UserError, match="data.tokenizer_type"):
        cached_tokenizer(texts, 512, str(tmp_path), name="x", model_type="char")


def test_data_config_keys():
    from jaxllm.config import load_config

    cfg = load_config(
        None,
        ["data.pack=true", "data.length_policy=drop", "data.augment.word_dropout=0.1",
         "data.user_symbols=[<sep>, <cls>]", "data.tokenizer_type=unigram"],
    )  # fmt: skip
    d = cfg.data
    assert (d.pack, d.length_policy, d.augment.word_dropout) == (True, "drop", 0.1)
    assert d.user_symbols == ["<sep>", "<cls>"] and d.tokenizer_type == "unigram"
    assert (d.max_source_len, d.max_target_len, d.history_turns) == (0, 0, 3)
    for bad, match in [
        ("data.length_policy=cut", "allowed values: truncate, drop, split"),
        ("data.augment.prob=1.5", "must be in \\[0, 1\\]"),
        ("data.max_source_len=-1", "must be >= 0"),
        ("data.augment.typo=0.1", "unknown config key 'data.augment.typo'"),
        ("data.user_symbols=[<sep>, <sep>]", "duplicates"),
    ]:
        with pytest.raises(UserError, match=match):
            load_config(None, [bad])


def test_tokenizer_user_errors(env, tmp_path):
    cfg, tok = env
    with pytest.raises(UserError, match="not found"):
        data.load_tokenizer(str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        data.load_tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(UserError, match="model.vocab_size=4096 or more"):
        data.get_tokenizer(_with(cfg, tokenizer=tok.path, model={"vocab_size": 1000}))
    assert data.get_tokenizer(_with(cfg, tokenizer=tok.path)).fingerprint == tok.fingerprint


# ----------------------------------------------------------------------------- iterator


def test_train_batches_shapes_and_shift(env):
    cfg, tok = env
    it = data.make_lm_iterator(cfg, tok, "train", 8)
    tokens = data.split_tokens(cfg.data, tok, "train")
    windows = _windows(tokens, cfg.data.seq_len + 1)
    assert it.num_windows == len(tokens) // 129
    # A few windows repeat verbatim (stdlib docstrings that are copies of each other).
    assert 0.99 * it.num_windows <= len(windows) <= it.num_windows
    assert len(tokens) > 600_000  # measured 712,699 tokens with the 4096-piece tokenizer
    for batch in _take(it, 5):
        assert batch["inputs"].shape == batch["targets"].shape == (8, 128)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        assert batch["weights"].dtype == np.float32 and batch["weights"].shape == (8, 128)
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        assert batch["weights"].min() == 1.0  # train rows are full windows
        assert all(row.tobytes() in windows for row in _rows(batch))
        assert batch["inputs"].min() >= 0 and batch["targets"].max() < tok.vocab_size
    assert (np.asarray(tokens) == tok.eos_id).sum() == len(data.load_split_texts(cfg.data, "train"))


def test_train_epochs_are_permutations_reshuffled_each_epoch(env):
    cfg, tok = env
    it = data.make_lm_iterator(cfg, tok, "validation", 16, shuffle=True, repeat=True, seed=7)
    n = it.num_windows
    windows = _windows(data.split_tokens(cfg.data, tok, "validation"), 129)
    seen = [windows[r.tobytes()] for b in _take(it, -(-2 * n // 16)) for r in _rows(b)]
    assert sorted(seen[:n]) == list(range(n)) == sorted(seen[n : 2 * n])
    assert seen[:n] != seen[n : 2 * n] and seen[:n] != list(range(n))

    def first(seed):
        return next(
            data.make_lm_iterator(cfg, tok, "validation", 16, shuffle=True, seed=seed, repeat=True)
        )["inputs"]

    np.testing.assert_array_equal(first(7), first(7))  # the seed fixes the order
    assert not np.array_equal(first(7), first(8))


def test_eval_scores_every_token_once(env):
    cfg, tok = env
    tokens = np.asarray(data.split_tokens(cfg.data, tok, "validation"), np.int32)
    it = data.make_lm_iterator(cfg, tok, "validation", 16)
    batches = list(it)  # eval: one pass, then StopIteration
    assert len(batches) == it.num_batches == -(-it.num_windows // 16)
    assert it.num_windows == -(-len(tokens) // 129)
    assert sum(b["weights"].sum() for b in batches) == len(tokens) - it.num_windows
    rows = np.concatenate([_rows(b) for b in batches])
    lengths = np.concatenate([b["weights"].sum(1) for b in batches]).astype(int) + 1
    stream = np.concatenate([r[:n] for r, n in zip(rows, lengths, strict=True) if n > 1])
    np.testing.assert_array_equal(stream, tokens)  # in order, nothing lost or repeated
    last = batches[-1]
    assert last["weights"][-1].sum() == 0 and last["inputs"][-1].max() == 0  # padding row


@pytest.mark.parametrize("split", ["train", "validation"])
@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_concatenate_to_the_global_batch(env, split, hosts):
    cfg, tok = env
    one = data.make_lm_iterator(cfg, tok, split, 8)
    many = [
        data.make_lm_iterator(cfg, tok, split, 8, process_index=i, process_count=hosts)
        for i in range(hosts)
    ]
    assert all(m.local_batch == 8 // hosts for m in many)
    steps = one.num_batches if split == "validation" else 6
    for _ in range(steps):
        whole = next(one)
        parts = [next(m) for m in many]
        for key in KEYS:
            assert parts[0][key].shape[0] == 8 // hosts
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    if split == "validation":
        assert [list(m) for m in many] == [[]] * hosts  # all stop together


@pytest.mark.parametrize("split", ["train", "validation"])
def test_resume_is_exact(env, split):
    cfg, tok = env
    it = data.make_lm_iterator(cfg, tok, split, 8)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
    assert state["grain"] == {"next_index": 3}
    expected = _take(it, 4)
    fresh = data.make_lm_iterator(cfg, tok, split, 8)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 4), expected)
    # The state is process-count independent: resume the same run on 2 processes.
    hosts = [
        data.make_lm_iterator(cfg, tok, split, 8, process_index=i, process_count=2)
        for i in range(2)
    ]
    for h in hosts:
        h.set_state(state)
    for want in expected:
        got = [next(h) for h in hosts]
        np.testing.assert_array_equal(np.concatenate([g["inputs"] for g in got]), want["inputs"])
    with pytest.raises(UserError, match="seq_len"):
        data.make_lm_iterator(_with(cfg, seq_len=64), tok, split, 8).set_state(state)
    with pytest.raises(UserError, match="not a jaxllm.lm_iterator"):
        fresh.set_state({"next_index": 3})


def test_resume_across_an_epoch_boundary(env):
    cfg, tok = env
    it = data.make_lm_iterator(cfg, tok, "validation", 16, shuffle=True, repeat=True)
    k = it.num_windows // 16  # batch k straddles the end of epoch 0
    _take(it, k)
    state = it.get_state()
    expected = _take(it, 3)
    fresh = data.make_lm_iterator(cfg, tok, "validation", 16, shuffle=True, repeat=True)
    fresh.set_state(state)
    _assert_batches_equal(_take(fresh, 3), expected)


# ----------------------------------------------------------------------------- sources


def test_text_file_source(env, tmp_path):
    cfg, _ = env
    from pydoc_data.topics import topics

    paragraphs = tmp_path / "topics.txt"
    paragraphs.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    lines = tmp_path / "lines.txt"
    lines.write_text(
        "".join(f"sentence number {i} is here\n" for i in range(400)), encoding="utf-8"
    )
    lcfg = _with(cfg, source=str(lines))
    split_lines = {s: data.load_split_texts(lcfg.data, s) for s in SPLITS}
    assert sum(map(len, split_lines.values())) == 400  # one document per line
    assert 340 < len(split_lines["train"]) < 390 and len(split_lines["validation"]) > 5
    assert not set(split_lines["train"]) & set(split_lines["validation"])
    pcfg = _with(cfg, source=str(paragraphs), model={"vocab_size": 1024})
    docs = [d for s in SPLITS for d in data.load_split_texts(pcfg.data, s)]
    assert len(docs) > 2000 and all("\n\n" not in d for d in docs)  # blank-line separated
    tok = data.get_tokenizer(pcfg)
    assert tok.vocab_size == 1024
    assert os.path.basename(tok.path).startswith("txt-topics-")
    batch = next(data.make_lm_iterator(pcfg, tok, "train", 4))
    assert batch["inputs"].shape == (4, 128) and batch["weights"].sum() == 4 * 128


@pytest.mark.parametrize(
    ("source", "content", "match"),
    [
        ("foo", None, "not recognised; valid forms: embedded:pydocs"),
        ("embedded:wiki", None, "unknown embedded corpus"),
        ("tfds:no_such_dataset", None, "unknown TFDS dataset"),
        ("missing.txt", None, "not found"),
        ("empty.txt", b" \n\n \n", "is empty"),
        ("latin1.txt", b"caf\xe9 au lait\n", "not UTF-8"),
    ],
)
def test_bad_sources_raise_one_line_user_errors(env, tmp_path, source, content, match):
    cfg, tok = env
    if content is not None:
        (tmp_path / source).write_bytes(content)
    if source.endswith(".txt"):
        source = str(tmp_path / source)
    bad = _with(cfg, source=source)
    for call in (
        lambda: data.load_split_texts(bad.data, "train"),
        lambda: data.get_tokenizer(bad),
        lambda: data.make_lm_iterator(bad, tok, "train", 8),
    ):
        with pytest.raises(UserError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_batch_and_split_user_errors(env):
    cfg, tok = env
    with pytest.raises(UserError, match="unknown split 'dev'.*train, validation, test"):
        data.make_lm_iterator(cfg, tok, "dev", 8)
    with pytest.raises(UserError, match="does not divide over 3 processes"):
        data.make_lm_iterator(cfg, tok, "train", 8, process_count=3)
    with pytest.raises(UserError, match="lower train.batch_size .* or data.seq_len"):
        data.make_lm_iterator(_with(cfg, seq_len=512), tok, "validation", 512)


def test_data_dir_resolution(monkeypatch):
    monkeypatch.setenv("JAXLLM_DATA_DIR", "/tmp/from-env")
    assert data.data_dir(Config().data) == "/tmp/from-env"
    assert data.data_dir(dataclasses.replace(Config().data, data_dir="/x/y")) == "/x/y"
    monkeypatch.delenv("JAXLLM_DATA_DIR")
    assert data.data_dir(Config().data) == os.path.expanduser("~/.cache/jaxllm")


def test_concurrent_processes_train_the_tokenizer_once(tmp_path):
    (tmp_path / "corpus.txt").write_text(
        "".join(
            f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs\n" for i in range(3000)
        )
    )
    # Each process logs every training it runs and trains slowly, so without the
    # lock both would see no cached model and both would train.
    script = textwrap.dedent(
        f"""
        import time
        from jaxllm import data
        from jaxllm.config import from_dict
        cfg = from_dict({{
            "data": {{"source": {str(tmp_path / "corpus.txt")!r},
                     "data_dir": {str(tmp_path / "cache")!r}}},
            "model": {{"vocab_size": 512}},
        }})
        from jaxllm.data import tokenizer as tokenizer_module
        train = tokenizer_module.train_tokenizer
        def logged_train(*args, **kwargs):
            with open({str(tmp_path / "trained.log")!r}, "a") as f:
                f.write("trained\\n")
            time.sleep(1.0)
            return train(*args, **kwargs)
        tokenizer_module.train_tokenizer = logged_train
        tok = data.get_tokenizer(cfg)
        print(tok.fingerprint, len(data.split_tokens(cfg.data, tok, "train")))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and len(outs[0].split()) == 2
    assert (tmp_path / "trained.log").read_text() == "trained\n"
    models = [f for f in os.listdir(tmp_path / "cache" / "tokenizers") if f.endswith(".model")]
    assert len(models) == 1


def test_pipeline_rejects_a_stream_shorter_than_one_window():
    with pytest.raises(UserError, match="lower data.seq_len"):
        pipeline.lm_iterator(np.arange(10, dtype=np.int32), seq_len=16, global_batch=2)
