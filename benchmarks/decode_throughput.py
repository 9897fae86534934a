"""KV-cache decode tokens/s of jaxllm against Hugging Face ``generate`` on PyTorch CPU.

For each config a Hugging Face ``GPT2LMHeadModel`` with random weights is built with
the dimensions of ``benchmarks/train_throughput.py``'s configs; its weights are
loaded into jaxllm with the HF converter (``jaxllm.convert.hf.load_hf_params``), so
both sides decode the *same* fp32 model. Greedy decoding of ``--new-tokens`` tokens
after a ``--prompt-len`` prompt is timed at each ``--batches`` size and one JSON
object is printed on stdout::

    python benchmarks/decode_throughput.py                      # tiny and gpt15m, batch 1 and 16
    python benchmarks/decode_throughput.py --configs gpt15m --batches 1,4,16 --repeats 7
    python benchmarks/decode_throughput.py --quick              # seconds: a smoke run

Method (as train_throughput.py, see /work/shared/REFERENCES.md, "CPU benchmarking"):

* ``JAX_PLATFORMS=cpu`` and no fake devices: one XLA CPU device whose thread pool
  uses every core; torch is pinned to the same number of threads.
* jaxllm: ``jaxllm.decode.generate`` (one jitted ``lax.while_loop`` over the KV
  cache, prefill included), ``eos_id=-1`` so exactly ``--new-tokens`` are made; the
  same call as ``jaxllm.compress.report.decode_tokens_per_sec``, but timed here in
  windows that alternate with HF's. HF: ``model.generate(..., do_sample=False,
  use_cache=True)`` under ``torch.inference_mode()``, with no EOS token in the
  config (so nothing stops early or is masked) and ``min_new_tokens`` equal to
  ``max_new_tokens``; the output length is checked.
* Each window is ``--calls`` generate calls. tokens/s = calls x batch x new tokens /
  window seconds; the time includes the prompt's prefill and the host round trip
  of prompt and result. jaxllm's first call (trace + XLA compile + one run) is
  reported separately, and one more untimed call per side warms caches.
  jaxllm and HF windows alternate (jaxllm, HF, jaxllm, HF, ...) over ``--repeats``
  rounds, so load drift hits both; medians, every window and the jaxllm/HF ratio
  of the medians are reported per config and batch size.
* Correctness: the greedy tokens of the untimed warm-up calls are compared,
  token by token, between jaxllm and HF (``greedy_tokens_match``, batch 1; and per
  batch size). Random weights give nearly flat logits, so a near-tie may
  legitimately flip on fp32 rounding; the first differing step is reported.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "benchmarks")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from train_throughput import (  # noqa: E402  (the same model configs as training)
    BASE_CONFIG,
    COMMON_OVERRIDES,
    CONFIGS,
    cpu_model,
    load_average,
)

from jaxllm import flops, sharding  # noqa: E402
from jaxllm.config import load_config  # noqa: E402
from jaxllm.convert import hf as hf_convert  # noqa: E402
from jaxllm.decode import generate  # noqa: E402

QUICK = {"configs": ["tiny"], "batches": [1, 2], "new_tokens": 8, "repeats": 1, "calls": 1}


# ----------------------------------------------------------------------------- Hugging Face


class HfDecoder:
    """``GPT2LMHeadModel`` with the config's dims, random weights, fp32, pinned threads."""

    def __init__(self, m: Any, threads: int, seed: int):
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        hf_cfg = transformers.GPT2Config(
            vocab_size=m.vocab_size,
            n_positions=m.max_len,  # same position table as jaxllm (max_len x d)
            n_embd=m.d_model,
            n_layer=m.n_layers,
            n_head=m.n_heads,
            n_inner=m.ff_dim,
            activation_function="gelu_new",  # tanh GELU, as jaxllm's gelu(approximate=True)
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            layer_norm_epsilon=m.norm_eps,
            tie_word_embeddings=True,
            use_cache=True,
            bos_token_id=0,
            # No EOS at all: generation never stops early, and min_new_tokens cannot
            # mask an EOS logit that jaxllm (eos_id=-1) would keep.
            eos_token_id=None,
            pad_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(hf_cfg).float().eval()
        with torch.no_grad():  # random biases and norm scales, so a wrong mapping shows
            for name, p in self.model.named_parameters():
                if name.endswith("bias") or ".ln_" in name:
                    p.add_(0.1 * torch.randn_like(p))
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        self.params = int(sum(p.numel() for p in self.model.parameters()))  # tied once

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy-decodes exactly `new_tokens` per row; returns them as [B, new_tokens]."""
        torch = self.torch
        ids = torch.from_numpy(prompt).long()
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        if out.shape != (prompt.shape[0], prompt.shape[1] + new_tokens):
            raise RuntimeError(f"HF generated shape {tuple(out.shape)}, wanted {new_tokens} new")
        return out[:, prompt.shape[1] :].numpy()

    def save(self, folder: str) -> None:
        """Writes config.json and model.safetensors for the jaxllm converter."""
        self.model.save_pretrained(folder, safe_serialization=True)


# ----------------------------------------------------------------------------- jaxllm


class JaxDecoder:
    """jaxllm ``generate`` on the HF model's weights, converted by jaxllm.convert.hf."""

    def __init__(self, cfg: Any, hf_model: HfDecoder):
        self.cfg = cfg
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
        with tempfile.TemporaryDirectory() as folder:
            hf_model.save(folder)
            abstract = hf_convert.abstract_params(cfg, mesh)
            params = hf_convert.load_hf_params(folder, cfg, abstract)
            self.params = jax.block_until_ready(params)  # read before the folder goes
        self.n_params = int(sum(x.size for x in jax.tree.leaves(self.params)))

    def generate(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy-decodes exactly `new_tokens` per row (eos_id=-1 never matches)."""
        return generate(self.cfg.model, self.params, prompt, max_new_tokens=new_tokens, eos_id=-1)


# ----------------------------------------------------------------------------- driver


def timed_window(fn, prompt: np.ndarray, new_tokens: int, calls: int) -> float:
    """Seconds for `calls` generate calls; each returns host numpy, so each is synchronous."""
    start = time.perf_counter()
    for _ in range(calls):
        fn(prompt, new_tokens)
    return time.perf_counter() - start


def summarize(times: list[float], tokens_per_window: int) -> dict[str, Any]:
    """Median and per-window tokens/s of windows that each produced `tokens_per_window`."""
    rates = [tokens_per_window / t for t in times]
    return {
        "tokens_per_s_median": round(statistics.median(rates), 1),
        "tokens_per_s_windows": [round(r, 1) for r in rates],
    }


def compare(ours: np.ndarray, theirs: np.ndarray) -> dict[str, Any]:
    """Token-by-token agreement of two [B, N] greedy outputs."""
    same = ours == theirs
    differs = np.nonzero(~same.all(axis=0))[0]
    return {
        "match": bool(same.all()),
        "fraction_equal": round(float(same.mean()), 4),
        "first_differing_step": int(differs[0]) if differs.size else None,
    }


def bench_config(name: str, args: argparse.Namespace, threads: int) -> dict:
    """Builds both models for config `name`, checks their greedy tokens, times them.

    Args:
      name: a key of ``CONFIGS``.
      args: the parsed command line.
      threads: torch intra-op threads (the core count, as XLA's pool).

    Returns:
      The config's JSON section: dims, parameter counts, greedy check, and per batch
      size the compile time, tokens/s windows and medians of both sides.
    """
    cfg = load_config(BASE_CONFIG, COMMON_OVERRIDES + CONFIGS[name] + ["mesh.data=1"])
    m = cfg.model
    log(f"[{name}] building HF GPT2LMHeadModel and converting its weights to jaxllm ...")
    hf = HfDecoder(m, threads, args.seed)
    jx = JaxDecoder(cfg, hf)
    rng = np.random.default_rng(args.seed)
    prompts = {
        b: rng.integers(0, m.vocab_size, (b, args.prompt_len)).astype(np.int32)
        for b in args.batches
    }

    per_batch: dict[str, Any] = {}
    checks: dict[str, Any] = {}
    for b, prompt in prompts.items():
        log(f"[{name}] batch {b}: compiling jaxllm generate, warming up both ...")
        start = time.perf_counter()
        ours = jx.generate(prompt, args.new_tokens)
        compile_s = time.perf_counter() - start
        jx.generate(prompt, args.new_tokens)
        start = time.perf_counter()
        theirs = hf.generate(prompt, args.new_tokens)
        hf_first_s = time.perf_counter() - start
        hf.generate(prompt, args.new_tokens)
        checks[str(b)] = compare(ours, theirs)
        per_batch[str(b)] = {
            "jax_first_call_s": compile_s,
            "hf_first_call_s": hf_first_s,
            "jax": [],
            "hf": [],
        }

    # Rounds outermost, so every (batch, side) window is spread over the whole run.
    for r in range(args.repeats):
        for b, prompt in prompts.items():
            t = per_batch[str(b)]
            t["jax"].append(timed_window(jx.generate, prompt, args.new_tokens, args.calls))
            t["hf"].append(timed_window(hf.generate, prompt, args.new_tokens, args.calls))
            log(
                f"[{name}] round {r + 1}/{args.repeats} batch {b}: jaxllm {t['jax'][-1]:.3f}s, "
                f"HF {t['hf'][-1]:.3f}s ({args.calls} call(s) each)"
            )

    results: dict[str, Any] = {}
    for b in args.batches:
        t = per_batch[str(b)]
        tokens = args.calls * b * args.new_tokens
        jres = {"compile_and_first_call_s": round(t["jax_first_call_s"], 2)}
        jres.update(summarize(t["jax"], tokens))
        hres = {"first_call_s": round(t["hf_first_call_s"], 3)}
        hres.update(summarize(t["hf"], tokens))
        results[str(b)] = {
            "tokens_per_window": tokens,
            "jaxllm": jres,
            "hf": hres,
            "ratio_jaxllm_over_hf": round(
                jres["tokens_per_s_median"] / hres["tokens_per_s_median"], 3
            ),
            "ratio_per_window": [round(h / j, 3) for j, h in zip(t["jax"], t["hf"], strict=True)],
            "greedy_check": checks[str(b)],
        }

    counts = flops.param_counts(m)
    check_batch = str(1 if 1 in args.batches else min(args.batches))
    return {
        "overrides": CONFIGS[name],
        "model": {
            "vocab_size": m.vocab_size,
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "ff_dim": m.ff_dim,
            "max_len": m.max_len,
            "norm_eps": m.norm_eps,
            "tied_embeddings": m.tied,
        },
        "params": {
            "jaxllm_state_total": jx.n_params,
            "jaxllm_formula_total": counts["total"],
            "hf_total": hf.params,
            "equal": jx.n_params == hf.params,
        },
        "weights": "identical: HF random init (biases and LayerNorms perturbed) converted "
        "into jaxllm by jaxllm.convert.hf.load_hf_params",
        "hf_attn_implementation": hf.attn_implementation,
        "greedy_tokens_match": checks[check_batch]["match"],
        "greedy_tokens_match_batch": int(check_batch),
        "batches": results,
    }


def log(msg: str) -> None:
    """Progress goes to stderr; stdout holds only the JSON result."""
    print(msg, file=sys.stderr, flush=True)


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line (``--quick`` overrides the sizes)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="tiny,gpt15m", help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--batches", default="1,16", help="comma list of batch sizes")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64, help="generated tokens per row")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per side and batch")
    p.add_argument("--calls", type=int, default=1, help="generate calls per timed window")
    p.add_argument("--seed", type=int, default=0, help="weights and prompt seed")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny, batches 1,2, 8 tokens, 1 repeat"
    )
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.batches = _int_list(args.batches)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if min([args.repeats, args.calls, args.prompt_len, args.new_tokens, *args.batches]) < 1:
        p.error("--repeats, --calls, --prompt-len, --new-tokens and batches must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Runs every config, prints the JSON object on stdout and returns it."""
    args = parse_args(argv)
    threads = os.cpu_count() or 1  # XLA's CPU client uses one intra-op thread per core
    import flax
    import torch
    import transformers

    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_start": load_average(),
        },
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": flax.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
        "threads": {"xla": threads, "torch": threads},
        "precision": "fp32 on both sides",
        "decode": {
            "strategy": "greedy",
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "batches": args.batches,
            "calls_per_window": args.calls,
            "repeats": args.repeats,
            "tokens_per_s": "calls x batch x new_tokens / window seconds; the time includes "
            "the prompt prefill and the host round trip; compile and one warm-up call "
            "per side excluded",
            "hf_call": "GPT2LMHeadModel.generate(do_sample=False, use_cache=True, "
            "min_new_tokens=max_new_tokens, no eos) under torch.inference_mode()",
            "jaxllm_call": "jaxllm.decode.generate(strategy='greedy', eos_id=-1)",
        },
        "configs": {},
    }
    for name in args.configs:
        result["configs"][name] = bench_config(name, args, threads)
    result["machine"]["load_average_end"] = load_average()
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
