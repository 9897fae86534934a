"""fp32 against int8 inference of one trained model: forward latency and decode tokens/s.

Prints one JSON object on stdout::

    python benchmarks/int8_inference.py --workdir runs/tiny1500
    python benchmarks/int8_inference.py --workdir runs/tiny1500 --rounds 7 --repeats 5

The float model of ``--workdir`` is quantised in memory (``jaxllm.compress.qmodel``,
the same functions as a ``ptq`` stage of ``jaxllm compress``) into:

* ``int8_weight_only``: int8 kernels with per-output-channel scales, float
  activations (``model.quant_act=none``);
* ``int8_w8a8``: int8 kernels and int8 activations quantised per token at run time,
  ``int8 x int8 -> int32`` dots (``model.quant_act=dynamic_per_token``).

Embeddings, norms and the head stay float in every variant. Each variant is timed on
one device: a jitted forward of ``--batch x --length`` tokens (ms per batch) and
greedy KV-cache decoding (``--decode-batch`` rows, ``--prompt-len`` prompt tokens,
``--new-tokens`` generated; tokens/s). Compilation is excluded. Timing rounds
interleave the variants so load drift hits all of them; each figure is the median
over rounds of the per-round median of ``--repeats`` calls. Ratios are against fp32
measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys

# One device, as a served model: fake devices would split the same cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxllm.compress.qmodel import quantize_model_params  # noqa: E402
from jaxllm.compress.report import decode_tokens_per_sec, forward_latency_ms  # noqa: E402
from jaxllm.model import build_model  # noqa: E402
from jaxllm.workdir import restore_params, workdir_config  # noqa: E402

VARIANTS = {"fp32": None, "int8_weight_only": "none", "int8_w8a8": "dynamic_per_token"}


def _variants(workdir: str) -> dict[str, tuple]:
    """{name: (model config, host params)} for fp32 and the int8 variants."""
    cfg = workdir_config(workdir, ["mesh.data=1"])
    _, params, _ = restore_params(workdir, cfg, jax.devices()[:1])
    host = jax.device_get(params)
    out = {}
    for name, act in VARIANTS.items():
        if act is None:
            out[name] = (cfg.model, host)
            continue
        mcfg = dataclasses.replace(cfg.model, quant="int", quant_weight_bits=8, quant_act=act)
        out[name] = (mcfg, quantize_model_params(host, mcfg))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True, help="a trained float workdir")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    variants = _variants(args.workdir)
    samples: dict[str, dict[str, list]] = {n: {"forward_ms": [], "decode_tok_s": []}
                                           for n in variants}  # fmt: skip
    for _ in range(args.rounds):
        for name, (mcfg, params) in variants.items():
            model = build_model(mcfg)
            samples[name]["forward_ms"].append(
                forward_latency_ms(model, params, args.batch, args.length, args.repeats)
            )
            samples[name]["decode_tok_s"].append(
                decode_tokens_per_sec(
                    mcfg, params, args.decode_batch, args.prompt_len, args.new_tokens,
                    args.repeats,
                )
            )  # fmt: skip
    result = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    base = result["fp32"]
    for name, r in result.items():
        r["forward_speedup_vs_fp32"] = base["forward_ms"] / r["forward_ms"]
        r["decode_speedup_vs_fp32"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["forward_ms_per_round"] = samples[name]["forward_ms"]
    report = {
        "workdir": args.workdir,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.default_backend()}, jax {jax.__version__}",
        "forward": f"batch {args.batch} x {args.length}",
        "decode": f"greedy, batch {args.decode_batch}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens",
        "rounds": args.rounds,
        "repeats": args.repeats,
        "results": result,
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return report


if __name__ == "__main__":
    main()
