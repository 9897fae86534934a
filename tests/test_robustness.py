"""Determinism, no unpickling anywhere, and fuzzing of config overrides and data files."""

import ast
import json
import os
import pathlib
import pickle

import jax
import pytest
import yaml
from faultlog import record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm import data
from jaxllm.config import Config, load_config
from jaxllm.errors import UserError
from jaxllm.train import train

# One scheduling unit, in file order: test_zz_report_fuzz_cases counts the fuzz cases the
# tests before it ran in this process (tests/schedule.py keeps a unit's order).
pytestmark = pytest.mark.xdist_group("robustness")

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "model.max_len=64",
    "data.seq_len=16",
    "train.batch_size=4",
    "train.steps=6",
    "train.log_every=1",
    "train.eval_every=3",
    "train.eval_batches=1",
    "train.checkpoint_every=3",
    "train.progress_bar=false",
    "model.dropout=0.1",  # dropout keys are part of what must be reproducible
    "mesh.data=1",
]
TIMING = {"tokens_per_sec", "mfu"}


def _metrics_without_timing(workdir):
    lines = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            rec = {k: v for k, v in json.loads(line).items() if k not in TIMING}
            lines.append(json.dumps(rec))
    return "\n".join(lines).encode()


@pytest.mark.slow
def test_same_seed_gives_byte_identical_metrics(tmp_path):
    cfg = load_config("configs/lm_tiny.yaml", SMALL)
    for name in ("a", "b"):
        train(cfg, str(tmp_path / name), devices=jax.devices()[:1])
    a, b = _metrics_without_timing(tmp_path / "a"), _metrics_without_timing(tmp_path / "b")
    assert a == b and len(a.splitlines()) == 6 + 1  # 6 step records + the final eval
    other = load_config("configs/lm_tiny.yaml", [*SMALL, "train.seed=1"])
    train(other, str(tmp_path / "c"), devices=jax.devices()[:1])
    assert _metrics_without_timing(tmp_path / "c") != a  # the seed really matters


# ----------------------------------------------------------------------------- no pickle

FORBIDDEN_MODULES = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def test_no_unpickling_in_the_source():
    offences = []
    for path in (REPO / "jaxllm").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in FORBIDDEN_MODULES for n in names):
                    offences.append(f"{path}:{node.lineno} imports a pickle-like module")
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "allow_pickle" and not (
                        isinstance(kw.value, ast.Constant) and kw.value.value is False
                    ):
                        offences.append(f"{path}:{node.lineno} allow_pickle not False")
                # np.load refuses pickles by default; torch.load unpickles by design.
                if ast.unparse(node.func) == "torch.load":
                    offences.append(f"{path}:{node.lineno} torch.load unpickles")
    assert not offences, offences


@pytest.mark.slow
def test_train_resume_eval_generate_never_unpickle(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    cfg = load_config("configs/lm_tiny.yaml", [*SMALL, "train.steps=3"])
    train(cfg, str(tmp_path), devices=jax.devices()[:1])
    longer = load_config("configs/lm_tiny.yaml", [*SMALL, "train.steps=6"])
    summary = train(longer, str(tmp_path), devices=jax.devices()[:1])  # resumes from step 3
    assert summary["start_step"] == 3
    from jaxllm.cli import main

    assert main(["eval", "--workdir", str(tmp_path)]) == 0
    assert (
        main(["generate", "--workdir", str(tmp_path), "--prompt", "The", "max_new_tokens=3"]) == 0
    )


# ----------------------------------------------------------------------------- fuzzing


def _valid_keys(cls=Config, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
            sub = f.default_factory if isinstance(f.default_factory, type) else f.type
            if dataclasses.is_dataclass(sub):
                yield from _valid_keys(sub, f"{prefix}{f.name}.")
                continue
        yield prefix + f.name


KEYS = sorted(_valid_keys())
VALUES = st.one_of(
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=20),
    st.lists(st.integers(-5, 5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
FUZZ_COUNT = {"n": 0}


def _one_line_or_ok(fn):
    try:
        fn()
    except UserError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


@settings(
    derandomize=True, max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    st.lists(
        st.tuples(st.one_of(st.sampled_from(KEYS), st.text(max_size=15)), VALUES),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_config_overrides(pairs):
    FUZZ_COUNT["n"] += 1
    overrides = []
    for key, value in pairs:
        text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
        overrides.append(f"{key}={text.strip().removesuffix('...').strip()}")
    _one_line_or_ok(lambda: load_config("configs/lm_tiny.yaml", overrides))


FILE_BODIES = st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=2000).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.just(b""),
    st.just(b"\n\n\n"),
    st.integers(1, 2**20).map(lambda n: b"x" * n),  # one huge line, up to 1 MiB
    st.lists(st.text(max_size=30), max_size=20).map(
        lambda ls: "\n".join(ls).encode("utf-8", "replace")
    ),
)


@settings(derandomize=True, max_examples=150, deadline=5000,
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(body=FILE_BODIES)
def test_fuzz_text_data_files(tmp_path, body):
    FUZZ_COUNT["n"] += 1
    path = tmp_path / "corpus.txt"
    path.write_bytes(body)
    cfg = load_config(None, [f"data.source={path}", f"data.data_dir={tmp_path / 'cache'}"])
    _one_line_or_ok(lambda: data.load_split_texts(cfg.data, "train"))


TABLE_BODIES = st.one_of(
    FILE_BODIES,
    st.lists(
        st.lists(
            st.text(alphabet=st.characters(blacklist_characters="\t\n\r"), max_size=12),
            min_size=0,
            max_size=4,
        ).map("\t".join),
        max_size=12,
    ).map(
        lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass")
    ),  # wrong and missing columns
    st.lists(
        st.one_of(
            st.dictionaries(
                st.sampled_from(["text", "label", "source", "target", "x"]),
                st.one_of(st.text(max_size=10), st.integers(), st.none()),
                max_size=3,
            ).map(json.dumps),
            st.text(max_size=20),
        ),
        max_size=10,
    ).map(lambda rows: "\n".join(rows).encode("utf-8", "surrogatepass")),
)


@settings(derandomize=True, max_examples=150, deadline=5000,
          suppress_health_check=[HealthCheck.too_slow,
                                 HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    body=TABLE_BODIES,
    kind=st.sampled_from(
        [("tsv", "classify"), ("tsv", "translate"), ("jsonl", "classify"), ("jsonl", "lm")]
    ),
)
def test_fuzz_tsv_and_jsonl_files(tmp_path, body, kind):
    FUZZ_COUNT["n"] += 1
    ext, task = kind
    path = tmp_path / f"data.{ext}"
    path.write_bytes(body)
    fields = (
        "{text: text, label: label}" if task == "classify" else "{source: source, target: target}"
    )
    overrides = [f"data.source={path}", f"data.data_dir={tmp_path / 'cache'}"]
    if ext == "jsonl":
        overrides.append("data.fields=" + ("{text: text}" if task == "lm" else fields))
    cfg = load_config(None, overrides)

    def load():
        records = data.load_records(cfg.data, "train", task)
        for i in range(min(len(records), 50)):
            records[i]

    _one_line_or_ok(load)


def test_zz_report_fuzz_cases():
    # Runs after the fuzz tests in this module (pytest keeps file order): records the count.
    assert FUZZ_COUNT["n"] >= 650
    record(fuzz=FUZZ_COUNT["n"])
    print(f"fuzz cases run: {FUZZ_COUNT['n']}")
