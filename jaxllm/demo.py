"""`make demo`: train lm_tiny on the embedded corpus, evaluate, sample, summarise.

Runs offline on a fresh machine. Rerunning resumes (or, if finished, re-evaluates)
the same workdir, exactly as `jaxllm train` would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from jaxllm.errors import UserError

PROMPTS = ("The list type", "Return a new", "This module provides")


def run(config: str, workdir: str, overrides: list[str]) -> dict:
    """Trains, evaluates and samples; returns the summary it prints."""
    import jax
    import numpy as np

    from jaxllm import flops
    from jaxllm.config import load_config
    from jaxllm.decode import generate
    from jaxllm.precision import get_policy
    from jaxllm.train import evaluate, train

    cfg = load_config(config, overrides)
    print(
        f"== training {config} on {cfg.data.source} ({jax.device_count()} device(s): "
        f"{jax.devices()[0].device_kind}) -> {workdir}"
    )
    start = time.perf_counter()
    summary = train(cfg, workdir)
    train_seconds = time.perf_counter() - start
    state, session = summary.pop("state"), summary.pop("session")
    # Re-evaluate on the whole validation split (training evals use a few batches).
    full_eval = evaluate(session, state.params, max_batches=0)
    with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump({"step": cfg.train.steps, "split": cfg.data.eval_split, **full_eval}, f, indent=2)

    tok = session.tokenizer
    print("\n== samples (greedy, then top-k 40 / top-p 0.9 at temperature 0.8)")
    for prompt in PROMPTS:
        ids = np.asarray([[tok.eos_id, *tok.encode(prompt)]])
        for strategy in ("greedy", "sample"):
            new = generate(
                cfg.model,
                state.params,
                ids,
                max_new_tokens=40,
                strategy=strategy,
                temperature=0.8,
                top_k=40,
                top_p=0.9,
                eos_id=tok.eos_id,
                policy=get_policy(cfg.precision),
            )[0].tolist()
            new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
            text = tok.decode(ids[0, 1:].tolist() + new).replace("\n", " / ")
            print(f"  [{strategy:6}] {text}")

    counts = flops.param_counts(cfg.model)
    rows = [
        ("parameters", f"{counts['total']:,}"),
        ("steps (this run started at)", f"{cfg.train.steps} ({summary['start_step']})"),
        (
            "train loss (first logged -> last)",
            f"{summary.get('first_logged_loss') or float('nan'):.3f} -> "
            f"{summary.get('final_loss') or float('nan'):.3f}",
        ),
        (
            "eval loss / perplexity (full split)",
            f"{full_eval['loss']:.3f} / {full_eval['perplexity']:.1f}",
        ),
        ("eval next-token accuracy", f"{full_eval['accuracy']:.3f}"),
        ("eval tokens", f"{int(full_eval['tokens']):,}"),
        ("tokens/s (last log window)", f"{summary.get('tokens_per_sec', float('nan')):,.0f}"),
        ("MFU (6N + causal attention)", f"{summary.get('mfu', float('nan')):.1%}"),
        ("wall time (incl. compile)", f"{train_seconds:.0f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n== summary")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    print(f"""
== where things are
  resolved config   {workdir}/config.yaml
  metrics           {workdir}/metrics.jsonl
  TensorBoard       tensorboard --logdir {workdir}/tensorboard
  checkpoints       {workdir}/checkpoints/   (rerun to resume; `jaxllm eval --workdir {workdir}`)
  eval              {workdir}/eval.json
  generate          jaxllm generate --workdir {workdir} --prompt "The list type" strategy=sample""")
    return {k: v for k, v in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.demo", description=__doc__)
    parser.add_argument("--config", default="configs/lm_tiny.yaml")
    parser.add_argument("--workdir", default="runs/demo")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        run(args.config, args.workdir, args.overrides)
    except UserError as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
