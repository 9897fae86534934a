"""Tests for the example pipeline: task formats, length policy, first-fit packing, resume."""

from __future__ import annotations

import collections
import json
from pydoc_data.topics import topics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import attention_mask
from jaxllm.config import ModelConfig, load_config
from jaxllm.data import pipeline
from jaxllm.data.formats import LengthLimits, fit_length, format_records
from jaxllm.data.tokenizer import cached_tokenizer
from jaxllm.errors import UserError
from jaxllm.model import build_model

SEQ = 64
TEXTS = [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small BPE tokenizer with the task symbols, trained on Python's topic docs."""
    return cached_tokenizer(
        TEXTS,
        600,
        str(tmp_path_factory.mktemp("tok")),
        name="topics",
        user_symbols=["<sep>", "<turn>"],
    )


def _cfg(*overrides: str):
    base = [f"data.seq_len={SEQ}", f"model.max_len={SEQ}", "data.pack=true", "train.seed=3"]
    return load_config(None, base + list(overrides))


def _records(task: str, n: int = 120) -> list[dict]:
    """Records of mixed lengths cut from real text; some exceed the limits at SEQ=64."""
    out = []
    for i in range(n):
        t = TEXTS[i % len(TEXTS)].replace("\n", " ")
        a, b = 5 + (i * 37) % 70, 5 + (i * 53) % 60
        if task == "lm":
            out.append({"text": t[: 20 + (i * 97) % 180]})
        elif task == "classify":
            out.append({"text": t[:a], "label": i % 4})
        elif task == "translate":
            out.append({"source": t[:a], "target": t[a : a + b]})
        else:
            turns = [t[j * 15 : j * 15 + 10 + (i + j) % 20] for j in range(1 + i % 5)]
            out.append({"history": turns, "response": t[100 : 100 + b]})
    return out


def _it(cfg, tok, records, task, batch=8, **kw):
    return pipeline.make_task_iterator(
        cfg, tok, records, kw.pop("split", "train"), task, batch, **kw
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _segments(batch: dict) -> list[dict]:
    """Every packed piece of a batch: its token arrays, sliced out of its row."""
    out = []
    for r in range(batch["inputs"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            assert np.array_equal(where, np.arange(where[0], where[-1] + 1))  # contiguous
            piece = {k: v[r, where] for k, v in batch.items() if v.ndim == 2}
            assert np.array_equal(piece["positions"], np.arange(len(where)))  # restart at 0
            out.append(piece)
    return out


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _expected_pieces(task, tok, records, cfg) -> list:
    limits = LengthLimits.from_config(cfg.data, task)
    exs = format_records(task, records, tok, history_turns=cfg.data.history_turns)
    pieces, removed = [], 0
    for ex in exs:
        ps, _, r = fit_length(task, ex, limits)
        pieces += ps
        removed += r
    return pieces, removed, sum(map(len, exs))


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("task", ["lm", "translate", "dialogue"])
def test_attention_mask_never_links_two_documents(tok, task):
    it = _it(_cfg(), tok, _records(task), task)
    docs_per_row = []
    for batch in _take(it, 6):
        seg, pos = batch["segment_ids"], batch["positions"]
        prefix = batch.get("prefix_mask")
        mask = np.asarray(
            attention_mask(
                jnp.asarray(pos),
                jnp.asarray(pos),
                q_segment_ids=jnp.asarray(seg),
                kv_segment_ids=jnp.asarray(seg),
                kv_prefix=None if prefix is None else jnp.asarray(prefix),
            )
        )[:, 0]
        same_doc = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)
        assert not (mask & ~same_doc).any()  # never across documents or onto padding
        # Exactly: causal within the document, plus its prefix (prefix-LM).
        visible = pos[:, None, :] <= pos[:, :, None]
        if prefix is not None:
            visible |= prefix[:, None, :]
        np.testing.assert_array_equal(mask, same_doc & visible)
        docs_per_row += [len(np.unique(s[s > 0])) for s in seg]
    assert np.mean(docs_per_row) > 1.3, np.mean(docs_per_row)  # rows hold several docs


def test_packed_logits_equal_each_document_alone(tok):
    """The model sees a packed document exactly as if it were alone in its row."""
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=2, max_len=SEQ)
    model = build_model(cfg)
    batch = next(_it(_cfg(), tok, _records("translate"), "translate", batch=4))
    args = {k: jnp.asarray(batch[k]) for k in ("positions", "segment_ids", "prefix_mask")}
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"])))
    apply = jax.jit(lambda tokens, **kw: model.apply(params, tokens, **kw))
    packed = np.asarray(apply(jnp.asarray(batch["inputs"]), **args))
    assert np.isfinite(packed).all()  # padding rows included
    pieces = _segments(batch)
    alone = {k: np.zeros((len(pieces), SEQ), batch[k].dtype) for k in ("inputs", "prefix_mask")}
    for i, p in enumerate(pieces):
        alone["inputs"][i, : len(p["inputs"])] = p["inputs"]
        alone["prefix_mask"][i, : len(p["inputs"])] = p["prefix_mask"]
    single = np.asarray(
        apply(jnp.asarray(alone["inputs"]), prefix_mask=jnp.asarray(alone["prefix_mask"]))
    )
    i = 0
    for r in range(4):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            where = np.flatnonzero(seg == s)
            np.testing.assert_allclose(packed[r, where], single[i, : len(where)], atol=2e-5)
            i += 1
    assert i == len(pieces) > 4


@pytest.mark.parametrize(
    ("task", "policy"),
    [("lm", "split"), ("lm", "truncate"), ("lm", "drop"), ("translate", "truncate"),
     ("dialogue", "drop"), ("classify", "truncate")],
)  # fmt: skip
def test_token_counts_conserved_except_stated_truncations(tok, task, policy):
    cfg = _cfg(f"data.length_policy={policy}", "data.max_source_len=12")
    records = _records(task)
    want, removed, total = _expected_pieces(task, tok, records, cfg)
    it = _it(cfg, tok, records, task, split="validation")  # one pass, in order
    got = [s for b in it for s in _segments(b)]
    # Every piece appears exactly once, with its tokens intact (rows reorder them).
    key = lambda z: tuple(z)  # noqa: E731
    assert collections.Counter(key(s["targets"]) for s in got) == collections.Counter(
        key([*p.prefix, *p.target]) for p in want
    )
    for s in got:
        np.testing.assert_array_equal(s["inputs"][1:], s["targets"][:-1])  # next-token shift
        assert s["inputs"][0] == tok.bos_id
    stats = it.stats
    n_tokens = sum(len(s["targets"]) for s in got)
    assert n_tokens == total - stats["tokens_removed"] == total - removed
    events = {"split": "split", "truncate": "truncated", "drop": "dropped"}[policy]
    assert stats[events] > 0 and stats["examples"] == len(records)
    assert stats["pieces"] == len(got) == len(want)
    if policy == "split":
        assert stats["tokens_removed"] == 0


def test_split_pieces_rebuild_the_document(tok):
    cfg = _cfg("data.length_policy=split")
    records = [{"text": TEXTS[7]}]  # a long document: several rows
    ids = [*tok.encode(TEXTS[7]), tok.eos_id]
    batch = next(_it(cfg, tok, records, "lm", batch=-(-len(ids) // SEQ), split="validation"))
    got = np.concatenate([s["targets"] for s in _segments(batch)])
    np.testing.assert_array_equal(got, ids)


def test_prefix_and_weights_for_translate(tok):
    rec = {"source": "The quick brown fox", "target": "jumps over the lazy dog"}
    batch = next(_it(_cfg(), tok, [rec], "translate", batch=1, split="validation"))
    src, tgt = tok.encode(rec["source"]), tok.encode(rec["target"])
    sep = tok.piece_id("<sep>")
    z = [*src, sep, *tgt, tok.eos_id]
    n, p = len(z), len(src) + 1
    np.testing.assert_array_equal(batch["targets"][0, :n], z)
    np.testing.assert_array_equal(batch["inputs"][0, :n], [tok.bos_id, *z[:-1]])
    np.testing.assert_array_equal(batch["prefix_mask"][0], np.arange(SEQ) <= p)  # BOS + prefix
    # Loss on the target and its EOS only; the separator is given, not predicted.
    np.testing.assert_array_equal(batch["weights"][0], (np.arange(SEQ) >= p) & (np.arange(SEQ) < n))
    assert batch["weights"][0].sum() == len(tgt) + 1
    np.testing.assert_array_equal(batch["segment_ids"][0], np.arange(SEQ) < n)
    assert tok.decode(batch["targets"][0][batch["weights"][0] > 0]) == rec["target"]


def test_prefix_and_weights_for_dialogue_keep_the_last_turns(tok):
    rec = {"history": ["hi there", "hello, how are you?", "fine thanks"], "response": "good"}
    batch = next(_it(_cfg("data.history_turns=2"), tok, [rec], "dialogue", batch=1, split="test"))
    turn, sep = tok.piece_id("<turn>"), tok.piece_id("<sep>")
    prefix = [*tok.encode(rec["history"][1]), turn, *tok.encode(rec["history"][2]), sep]
    z = [*prefix, *tok.encode("good"), tok.eos_id]
    np.testing.assert_array_equal(batch["targets"][0, : len(z)], z)
    np.testing.assert_array_equal(batch["prefix_mask"][0], np.arange(SEQ) <= len(prefix))
    assert tok.decode(batch["targets"][0][batch["weights"][0] > 0]) == "good"
    # A history too long for the row loses its oldest tokens; the separator stays.
    long = {"history": [TEXTS[3][:400], "the last turn"], "response": "ok"}
    cfg = _cfg("data.max_source_len=12")
    b = next(_it(cfg, tok, [long], "dialogue", batch=1, split="test"))
    pre = b["targets"][0][b["prefix_mask"][0][1:].nonzero()[0]]
    assert len(pre) == 12 and pre[-1] == sep
    assert tok.decode(pre[-1 - len(tok.encode("the last turn")) : -1]) == "the last turn"


def test_classify_is_one_example_per_row_with_a_label(tok):
    records = _records("classify", 21)
    it = _it(_cfg(), tok, records, "classify", batch=8, split="validation")
    batches = list(it)
    assert len(batches) == 3
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels[:21], [r["label"] for r in records])
    assert (labels[21:] == -1).all()  # padding rows of the last batch
    for b in batches:
        assert b["segment_ids"].max() <= 1 and "prefix_mask" not in b
        last = b["segment_ids"].sum(1) - 1  # where a head reads: the EOS target
        rows = np.flatnonzero(b["label"] >= 0)
        assert (b["targets"][rows, last[rows]] == tok.eos_id).all()
        assert b["weights"][b["label"] < 0].sum() == 0


def test_windowed_lm_path_is_kept(tok):
    records = _records("lm")
    it = _it(_cfg("data.pack=false"), tok, records, "lm")
    assert isinstance(it, pipeline.LMIterator)
    stream = pipeline.tokenize_documents(tok, [r["text"] for r in records], tok.eos_id)
    ref = pipeline.lm_iterator(stream, seq_len=SEQ, global_batch=8, seed=3)
    _assert_same(_take(it, 3), _take(ref, 3))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("task", ["translate", "lm", "classify"])
def test_resume_exact_also_saved_by_2_restored_by_1(tok, task):
    cfg = _cfg("data.length_policy=truncate")
    records = _records(task, 60)  # small: the batches below cross epoch boundaries

    def it(index=0, count=1):
        return _it(cfg, tok, records, task, batch=8, process_index=index, process_count=count)

    hosts = [it(0, 2), it(1, 2)]
    for _ in range(5):
        parts = [next(h) for h in hosts]
    states = [json.loads(json.dumps(h.get_state())) for h in hosts]
    assert states[0] == states[1]  # process-count independent
    later = [_take(h, 12) for h in hosts]
    expected = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*later, strict=True)]
    # The concatenated host batches are the single-process batches ...
    single = it()
    _take(single, 5)
    _assert_same(_take(single, 12), expected)
    # ... and a single process restored from the 2-process state continues exactly.
    restored = it()
    restored.set_state(states[0])
    _assert_same(_take(restored, 12), expected)
    assert parts[0]["inputs"].shape == (4, SEQ)
    with pytest.raises(UserError, match="seq_len"):
        _it(_cfg("data.seq_len=32"), tok, records, task).set_state(states[0])
    with pytest.raises(UserError, match="not a jaxllm.task_iterator"):
        restored.set_state({"example": 0})


def test_eval_pass_stops_together_on_every_process(tok):
    records = _records("dialogue", 50)
    cfg = _cfg()
    one = list(_it(cfg, tok, records, "dialogue", batch=4, split="validation"))
    two = [list(_it(cfg, tok, records, "dialogue", batch=4, split="validation",
                    process_index=i, process_count=2)) for i in range(2)]  # fmt: skip
    assert len(two[0]) == len(two[1]) == len(one)
    for whole, a, b in zip(one, *two, strict=True):
        for k in whole:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), whole[k])
    assert one[-1]["segment_ids"][-1].sum() == 0  # the last batch is padded


def test_bad_records_and_settings_are_user_errors(tok):
    cfg = _cfg()
    with pytest.raises(UserError, match="record 1 has no field 'target'.*data.fields"):
        next(_it(cfg, tok, [{"source": "a", "target": "b"}, {"source": "c"}], "translate"))
    with pytest.raises(UserError, match="split only applies to task=lm"):
        _it(_cfg("data.length_policy=split"), tok, _records("translate"), "translate")
    with pytest.raises(UserError, match="unknown task 'summarise'"):
        _it(cfg, tok, _records("lm"), "summarise")
    with pytest.raises(UserError, match="label -1"):
        next(_it(cfg, tok, [{"text": "x", "label": -1}], "classify"))
    with pytest.raises(UserError, match="has no records"):
        _it(cfg, tok, [], "lm")
    with pytest.raises(UserError, match="dropped every example"):
        next(_it(_cfg("data.length_policy=drop", "data.max_source_len=2"), tok,
                 _records("translate", 10), "translate"))  # fmt: skip
