"""fp32 against int8 inference of one trained model: forward latency and decode tokens/s.

Prints one JSON object on stdout::

    python benchmarks/int8_inference.py --workdir runs/tiny1500
    python benchmarks/int8_inference.py --workdir runs/tiny1500 --rounds 7 --repeats 5
    python benchmarks/int8_inference.py --gemm-only   # the int8 vs fp32 GEMM ceiling only

Every run first probes fp32 against ``int8 x int8 -> int32`` matmul speed on this CPU
(2048^3 and the forward GEMMs of the timed batch) and records the CPU's int8-relevant
ISA flags (AVX-512, VNNI, AMX): W8A8 cannot beat fp32 by more than that ratio.

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
import time

# One device, as a served model: fake devices would split the same cores.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

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


def cpu_isa() -> dict[str, bool]:
    """The /proc/cpuinfo flags that decide int8 GEMM speed (VNNI = fused int8 dot-add)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        flags = []
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")
    return {name: name in flags for name in wanted}


def _best_seconds(fn, *args, runs: int = 6) -> float:
    jax.block_until_ready(fn(*args))  # compile
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peaks(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """fp32 against int8 x int8 -> int32 matmul speed (G op/s, best of 6) per (m, k, n).

    This is the ceiling for W8A8: its projections are exactly these int8 dots (plus a
    per-token quantisation of the activations and a rescale of the int32 result).
    """
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in shapes:
        a = rng.integers(-127, 128, (m, k))
        b = rng.integers(-127, 128, (k, n))
        f32 = jax.jit(lambda x, y: x @ y)
        i8 = jax.jit(lambda x, y: jax.lax.dot(x, y, preferred_element_type=jnp.int32))
        t32 = _best_seconds(f32, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        t8 = _best_seconds(i8, jnp.asarray(a, jnp.int8), jnp.asarray(b, jnp.int8))
        ops = 2.0 * m * k * n
        rows.append(
            {
                "m_k_n": [m, k, n],
                "fp32_gflops": round(ops / t32 / 1e9, 1),
                "int8_gops": round(ops / t8 / 1e9, 1),
                "int8_over_fp32": round(t32 / t8, 2),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", help="a trained float workdir (not needed with --gemm-only)")
    ap.add_argument(
        "--gemm-only",
        action="store_true",
        help="only the fp32 vs int8 GEMM probe (the hardware ceiling), no model",
    )
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if not args.gemm_only and not args.workdir:
        ap.error("--workdir is required unless --gemm-only")
    tokens = args.batch * args.length
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{jax.default_backend()}, jax {jax.__version__}",
        "cpu_isa": cpu_isa(),
        # 2048^3, then the forward GEMMs of the timed batch at lm_tiny's width (d 192, 4d).
        "gemm": gemm_peaks([(2048, 2048, 2048), (tokens, 192, 768), (tokens, 768, 192)]),
    }
    if args.gemm_only:
        json.dump(report, sys.stdout, indent=2)
        print()
        return report

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
    report |= {
        "workdir": args.workdir,
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
