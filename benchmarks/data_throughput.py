"""Input-pipeline throughput against the tokens/s that jaxllm's train step consumes.

Prints one JSON object on stdout::

    python benchmarks/data_throughput.py
    python benchmarks/data_throughput.py --batches 100 --steps 10 --repeats 3

Data: the embedded ``pydocs`` corpus (train split, ``jaxllm.data.load_split_texts``)
as LM records, with the corpus tokenizer (``jaxllm.data.get_tokenizer``).

Pipelines (``jaxllm.data.pipeline.make_task_iterator``, 1 process):

* ``windowed``: ``data.pack=false``: one token stream cut into ``seq_len + 1`` windows
  (the stream is tokenized when the iterator is built: ``setup_s``);
* ``packed``: ``data.pack=true``, ``length_policy=split``: documents first-fit packed
  with segment ids and positions, tokenized on the fly;
* ``packed_augmented``: as ``packed`` plus train augmentation on every document
  (word dropout 0.1, word swap 0.05, synonyms 0.2, char swap 0.02).

Shapes: lm_tiny (16 x 128, ``configs/lm_tiny.yaml``) and a gpt2_124m-shaped row of
1024 tokens with a per-host batch of 16 (a real gpt2_124m run feeds 512 x 1024 per
host; on 2 CPU cores a 16-row batch keeps the run short, and per-batch cost scales
linearly with rows). Each figure is the rate at which the consumer receives batches
from the iterator (its prefetch thread included), after ``--warmup`` batches.
``examples_per_s`` counts rows (windows) for ``windowed`` and documents (packed
pieces) for the packed pipelines; ``tokens_per_s`` counts every position and
``real_tokens_per_s`` the non-padding ones.

Against: jaxllm's real compiled train step for lm_tiny (``step.compile_steps`` via
``benchmarks/train_throughput.JaxRunner``; fp32, AdamW) timed on (a) fixed synthetic
batches, (b) 4 fixed batches taken from the packed pipeline (segment ids make it a
different compiled program), (c) batches pulled from the windowed pipeline and (d)
from the packed pipeline, every global batch assembled with
``sharding.make_global_batch`` as ``jaxllm train`` does; timed windows alternate
between the feeds so load drift hits all of them. If (c) matches (a) and (d)
matches (b), the input does not stall training.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from typing import Any

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (REPO, HERE):
    if p not in sys.path:
        sys.path.insert(0, p)

from train_throughput import (  # noqa: E402
    BASE_CONFIG,
    COMMON_OVERRIDES,
    JaxRunner,
    cpu_model,
    load_average,
    synthetic_batches,
)

from jaxllm import data, sharding  # noqa: E402
from jaxllm.config import load_config  # noqa: E402
from jaxllm.data.pipeline import make_task_iterator  # noqa: E402

SHAPES = {
    "lm_tiny_16x128": {"batch": 16, "seq_len": 128},
    "gpt2_124m_shaped_16x1024_per_host": {"batch": 16, "seq_len": 1024},
}
PIPELINES = {
    "windowed": ["data.pack=false"],
    "packed": ["data.pack=true", "data.length_policy=split"],
    "packed_augmented": [
        "data.pack=true",
        "data.length_policy=split",
        "data.augment.prob=1.0",
        "data.augment.word_dropout=0.1",
        "data.augment.word_swap=0.05",
        "data.augment.synonym=0.2",
        "data.augment.char_swap=0.02",
    ],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def config(seq_len: int, batch: int, extra: list[str]) -> Any:
    return load_config(
        BASE_CONFIG,
        [
            *COMMON_OVERRIDES,
            f"data.seq_len={seq_len}",
            f"model.max_len={max(seq_len, 256)}",
            f"train.batch_size={batch}",
            *extra,
        ],
    )


def measure_pipeline(cfg, tok, records, batches: int, warmup: int) -> dict[str, Any]:
    """Builds the train iterator and times `batches` batches after `warmup` ones."""
    start = time.perf_counter()
    it = make_task_iterator(cfg, tok, records, "train", "lm", cfg.train.batch_size)
    setup = time.perf_counter() - start
    first = next(it)
    first_s = time.perf_counter() - start
    for _ in range(warmup - 1):
        next(it)
    rows = docs = real = total = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        rows += b["inputs"].shape[0]
        total += b["inputs"].size
        if "segment_ids" in b:
            seg = b["segment_ids"]
            real += int((seg > 0).sum())
            # Pieces per row: count starts of segments (position 0 of a real token).
            docs += int(((b["positions"] == 0) & (seg > 0)).sum())
        else:
            real += int((b["weights"] > 0).sum())  # train windows are full: every position
            docs += b["inputs"].shape[0]
    dt = time.perf_counter() - t0
    out = {
        "setup_s": round(setup, 3),
        "first_batch_s": round(first_s, 3),
        "batch_shape": list(first["inputs"].shape),
        "keys": sorted(first),
        "batches_timed": batches,
        "batches_per_s": round(batches / dt, 1),
        "examples_per_s": round(docs / dt, 1),
        "rows_per_s": round(rows / dt, 1),
        "tokens_per_s": round(total / dt),
        "real_tokens_per_s": round(real / dt),
        "non_pad_fraction": round(real / total, 4),
    }
    if hasattr(it, "stats"):
        out["length_stats"] = {k: v for k, v in it.stats.items() if k != "packing_efficiency"}
        it.close()
    return out


def time_steps(runner: JaxRunner, batches, steps: int, repeats: int) -> list[float]:
    """Seconds per window of `steps` train steps fed by `batches` (an iterator)."""
    cs = runner.cs
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            batch = sharding.make_global_batch(next(batches), cs.mesh, cs.rules)
            runner.state, metrics = cs.train(runner.state, batch)
        jax.block_until_ready((runner.state, metrics))
        times.append(time.perf_counter() - t0)
    return times


def measure_train_step(tok, records, args) -> dict[str, Any]:
    """lm_tiny train steps fed four ways; timed windows alternate between the feeds."""
    tokens_per_step = 16 * 128
    cfg = config(128, 16, [])
    synth = synthetic_batches(16, 128, cfg.model.vocab_size)
    runner = JaxRunner(cfg, synth)
    log("[step] compiling lm_tiny train step ...")
    runner.warmup(2)

    def cycle(bs):
        while True:
            yield from bs

    def pipe(name):
        return make_task_iterator(config(128, 16, PIPELINES[name]), tok, records, "train", "lm", 16)

    packed = pipe("packed")
    fixed_packed = [next(packed) for _ in range(4)]  # same program as the packed pipeline
    packed.close()
    feeds = {
        "synthetic": cycle(synth),
        "synthetic_packed": cycle(fixed_packed),
        "windowed_pipeline": pipe("windowed"),
        "packed_pipeline": pipe("packed"),
    }
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for feed in feeds.values():
        time_steps(runner, feed, 2, 1)  # compiles the packed signature; fills prefetch
    for r in range(args.repeats):
        for name, feed in feeds.items():
            times[name] += time_steps(runner, feed, args.steps, 1)
        log(f"[step] window {r + 1}/{args.repeats} done")
    out: dict[str, Any] = {
        "config": "configs/lm_tiny.yaml (fp32, AdamW, constant lr)",
        "tokens_per_step": tokens_per_step,
        "steps_per_window": args.steps,
        "feeds": "synthetic: fixed random-token batches; synthetic_packed: 4 fixed batches "
        "taken from the packed pipeline (same compiled program as packed_pipeline); "
        "*_pipeline: a new batch from the iterator every step",
    }
    for name, ts in times.items():
        rates = [tokens_per_step * args.steps / t for t in ts]
        out[name] = {
            "tokens_per_s_median": round(statistics.median(rates)),
            "tokens_per_s_windows": [round(x) for x in rates],
            "step_ms_median": round(1000 * statistics.median(ts) / args.steps, 2),
        }
    for feed in feeds.values():
        if hasattr(feed, "close"):
            feed.close()
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, default=200, help="timed pipeline batches per case")
    p.add_argument("--warmup", type=int, default=5, help="untimed pipeline batches per case")
    p.add_argument("--steps", type=int, default=10, help="train steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per feed")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.getLogger("jaxllm.data").setLevel(logging.ERROR)  # counts are in the JSON
    cfg = config(128, 16, [])
    texts = data.load_split_texts(cfg.data, "train")
    tok = data.get_tokenizer(cfg)
    records = [{"text": t} for t in texts]
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": load_average()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "corpus": {
            "source": cfg.data.source,
            "split": "train",
            "documents": len(records),
            "characters": sum(map(len, texts)),
            "tokenizer_vocab": tok.vocab_size,
        },
        "note": "1 process; with p processes every process packs the whole global batch "
        "(the state is process-count independent) but builds arrays only for its rows",
        "pipelines": {},
    }
    for shape, dims in SHAPES.items():
        result["pipelines"][shape] = {}
        for name, extra in PIPELINES.items():
            cfg = config(dims["seq_len"], dims["batch"], extra)
            log(f"[data] {shape} {name} ...")
            result["pipelines"][shape][name] = measure_pipeline(
                cfg, tok, records, args.batches, args.warmup
            )
    step = measure_train_step(tok, records, args)
    result["train_step_lm_tiny"] = step
    need = step["synthetic"]["tokens_per_s_median"]
    result["pipeline_over_step_tokens_per_s"] = {
        f"{shape}/{name}": round(r["tokens_per_s"] / need, 1)
        for shape, cases in result["pipelines"].items()
        for name, r in cases.items()
    }
    result["step_fed_by_pipeline_over_fixed_batches"] = {
        "windowed_pipeline/synthetic": round(
            step["windowed_pipeline"]["tokens_per_s_median"] / need, 3
        ),
        "packed_pipeline/synthetic_packed": round(
            step["packed_pipeline"]["tokens_per_s_median"]
            / step["synthetic_packed"]["tokens_per_s_median"],
            3,
        ),
    }
    result["machine"]["load_average_end"] = load_average()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
