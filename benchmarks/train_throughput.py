"""Training throughput and MFU of jaxllm's real train step, side by side with Hugging Face.

For each config this builds jaxllm's model, optimizer and jitted step exactly as
``jaxllm train`` does (``step.compile_steps``) and times ``cs.train`` on synthetic
token batches; then it trains a Hugging Face ``GPT2LMHeadModel`` with the same
dimensions on PyTorch (CPU, fp32) on the *same* batches with ``torch.optim.AdamW``
and the same hyper-parameters, and prints one JSON object on stdout::

    python benchmarks/train_throughput.py                       # both configs, with HF
    python benchmarks/train_throughput.py --configs gpt15m --steps 10 --repeats 5
    python benchmarks/train_throughput.py --skip-hf

Method (see /work/shared/REFERENCES.md, "CPU benchmarking"):

* ``JAX_PLATFORMS=cpu`` and no fake devices: one XLA CPU device whose thread pool
  uses every core; torch is pinned to the same number of threads.
* Compile and warm-up steps are excluded; each timed window is ``--steps`` steps
  ended by ``block_until_ready``. jaxllm and HF windows alternate (jaxllm, HF,
  jaxllm, HF, ...) so a change of machine load hits both; medians and every window
  are reported, plus the jaxllm/HF ratio of the medians.
* Data: synthetic tokens (throughput does not depend on their values) drawn from a
  Zipf-like distribution from a small pool of fixed batches, so both models can
  lower their loss; first/last losses are reported as a check that both train.
* Optimizer on both sides: AdamW, constant learning rate (no warmup), same betas,
  eps and weight decay, decay only on the dense kernels (jaxllm's mask: not on
  embeddings, norms, biases), global-norm gradient clipping at the same threshold.
* FLOPs/token: ``jaxllm.flops.train_flops_per_token`` (6N + causal attention
  6*L*H*Q*T, N excludes position embeddings, tied embedding counted once); the
  same figure is used for HF. Peak: ``jaxllm.flops.peak_flops_per_second`` (an
  XLA 2048x2048 fp32 matmul probe); MFU = tokens/s * flops/token / peak. A torch.mm
  probe of the same size is reported for reference only.
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
import time
from typing import Any

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from jaxllm import flops, optim, sharding, step  # noqa: E402
from jaxllm.config import load_config  # noqa: E402
from jaxllm.model import build_model  # noqa: E402
from jaxllm.precision import get_policy  # noqa: E402

BASE_CONFIG = os.path.join(REPO, "configs", "lm_tiny.yaml")

# Settings shared by every benchmark config: plain AdamW at a constant rate, so the
# torch side needs no schedule, and fp32 (the fair CPU comparison).
COMMON_OVERRIDES = [
    "precision=fp32",
    "optim.name=adamw",
    "optim.schedule=constant",
    "optim.warmup_steps=0",
    "model.dropout=0.0",
]

CONFIGS: dict[str, list[str]] = {
    # configs/lm_tiny.yaml as shipped (d 192, 4 layers, 6 heads, vocab 4096, seq 128, batch 16).
    "tiny": [],
    # ~14M-parameter GPT-2 flavour (REFERENCES.md "13.8M-param GPT").
    "gpt15m": [
        "model.vocab_size=8192",
        "model.d_model=384",
        "model.n_layers=6",
        "model.n_heads=6",
        "model.max_len=256",
        "data.seq_len=256",
        "train.batch_size=16",
    ],
}

N_DATA_BATCHES = 4  # distinct synthetic batches, cycled through
ZIPF_EXPONENT = 1.1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def synthetic_batches(batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, Any]]:
    """``N_DATA_BATCHES`` numpy batches of Zipf-distributed tokens (inputs, next-token targets)."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, vocab + 1) ** ZIPF_EXPONENT
    probs /= probs.sum()
    perm = rng.permutation(vocab)  # frequent tokens spread over the vocabulary
    out = []
    for _ in range(N_DATA_BATCHES):
        tokens = perm[rng.choice(vocab, size=(batch, seq + 1), p=probs)].astype(np.int32)
        out.append(
            {
                "inputs": np.ascontiguousarray(tokens[:, :-1]),
                "targets": np.ascontiguousarray(tokens[:, 1:]),
                "weights": np.ones((batch, seq), np.float32),
            }
        )
    return out


# ----------------------------------------------------------------------------- jaxllm


class JaxRunner:
    """jaxllm's real compiled train step (``step.compile_steps``) on one config."""

    def __init__(self, cfg: Any, batches: list[dict[str, Any]]):
        self.cfg = cfg
        model = build_model(cfg.model, get_policy(cfg.precision))
        schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
        tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
        mesh = sharding.make_mesh(cfg.mesh)
        self.cs = step.compile_steps(model, tx, cfg, schedule, mesh)
        self.state = self.cs.init()
        self.batches = [sharding.make_global_batch(b, self.cs.mesh, self.cs.rules) for b in batches]
        self.i = 0
        self.losses: list[float] = []
        self.params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))

    def warmup(self, n: int) -> float:
        """Runs ``n`` untimed steps (the first compiles); returns the compile+first-step time."""
        start = time.perf_counter()
        self.state, metrics = self.cs.train(self.state, self._next_batch())
        jax.block_until_ready((self.state, metrics))
        first = time.perf_counter() - start
        for _ in range(n - 1):
            self.state, metrics = self.cs.train(self.state, self._next_batch())
        jax.block_until_ready((self.state, metrics))
        return first

    def _next_batch(self) -> dict:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def timed_window(self, n: int) -> float:
        """Times ``n`` steps ending in block_until_ready; returns seconds."""
        start = time.perf_counter()
        losses = []
        for _ in range(n):
            self.state, metrics = self.cs.train(self.state, self._next_batch())
            losses.append(metrics["loss"])
        jax.block_until_ready((self.state, losses))
        elapsed = time.perf_counter() - start
        self.losses.extend(float(x) for x in losses)  # read back after the clock stops
        return elapsed


# ----------------------------------------------------------------------------- Hugging Face


class HfRunner:
    """``GPT2LMHeadModel`` with the same dims, torch AdamW, fp32, pinned threads."""

    def __init__(self, cfg: Any, batches: list[dict[str, Any]], threads: int):
        import torch
        import transformers

        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        m, o = cfg.model, cfg.optim
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
            use_cache=False,
            bos_token_id=0,  # GPT-2's 50256 lies outside a small vocabulary; unused here
            eos_token_id=0,
        )
        self.model = transformers.GPT2LMHeadModel(hf_cfg).float().train()
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        # Weight decay on the dense kernels only, as jaxllm.optim.weight_decay_mask does
        # (GPT-2's Conv1D weights); none on embeddings, LayerNorms and biases.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            is_kernel = name.endswith(".weight") and p.ndim == 2 and ".wte." not in name
            is_kernel = is_kernel and ".wpe." not in name
            (decay if is_kernel else no_decay).append(p)
        self.opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": o.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=(o.b1, o.b2),
            eps=o.eps,
        )
        self.clip = o.clip_norm
        self.vocab = m.vocab_size
        self.batches = [
            (torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long())
            for b in batches
        ]
        self.i = 0
        self.losses: list[float] = []
        # Unique parameters (the tied wte/lm_head weight once).
        self.params = int(sum(p.numel() for p in self.model.parameters()))
        self.n_decay = sum(p.numel() for p in decay)

    def _step(self):
        torch = self.torch
        inputs, targets = self.batches[self.i % len(self.batches)]
        self.i += 1
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, self.vocab).float(), targets.reshape(-1)
        )
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.detach()

    def warmup(self, n: int) -> float:
        start = time.perf_counter()
        self._step()
        first = time.perf_counter() - start
        for _ in range(n - 1):
            self._step()
        return first

    def timed_window(self, n: int) -> float:
        start = time.perf_counter()
        losses = [self._step() for _ in range(n)]
        elapsed = time.perf_counter() - start  # torch CPU ops are synchronous
        self.losses.extend(float(x) for x in losses)
        return elapsed


def torch_matmul_peak(threads: int, n: int = 2048, runs: int = 8) -> float:
    """fp32 torch.mm FLOP/s on the same threads, fastest of ``runs`` (reference only)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(n, n)
    b = torch.full((n, n), 0.5)
    torch.mm(a, b)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / min(times)


# ----------------------------------------------------------------------------- driver


def summarize(times: list[float], tokens_per_step: int, steps: int) -> dict[str, Any]:
    rates = [tokens_per_step * steps / t for t in times]
    return {
        "tokens_per_s_median": round(statistics.median(rates), 1),
        "tokens_per_s_windows": [round(r, 1) for r in rates],
        "step_ms_median": round(1000.0 * statistics.median(times) / steps, 2),
    }


def bench_config(name: str, args: argparse.Namespace, threads: int, peak: float) -> dict:
    cfg = load_config(BASE_CONFIG, COMMON_OVERRIDES + CONFIGS[name])
    m = cfg.model
    seq, batch = cfg.data.seq_len, cfg.train.batch_size
    tokens_per_step = seq * batch
    counts = flops.param_counts(m)
    fpt = flops.train_flops_per_token(m, seq)
    data = synthetic_batches(batch, seq, m.vocab_size, seed=args.seed)

    log(f"[{name}] compiling jaxllm step ...")
    jx = JaxRunner(cfg, data)
    jax_compile_s = jx.warmup(args.warmup)
    hf = None
    hf_first_s = None
    if not args.skip_hf:
        log(f"[{name}] building HF GPT2LMHeadModel ...")
        hf = HfRunner(cfg, data, threads)
        hf_first_s = hf.warmup(args.warmup)

    jax_times, hf_times = [], []
    for r in range(args.repeats):
        jax_times.append(jx.timed_window(args.steps))
        msg = f"[{name}] window {r + 1}/{args.repeats}: jaxllm {jax_times[-1]:.2f}s"
        if hf is not None:
            hf_times.append(hf.timed_window(args.steps))
            msg += f", HF {hf_times[-1]:.2f}s"
        log(msg + f" ({args.steps} steps each)")

    out: dict[str, Any] = {
        "overrides": CONFIGS[name],
        "model": {
            "vocab_size": m.vocab_size,
            "d_model": m.d_model,
            "n_layers": m.n_layers,
            "n_heads": m.n_heads,
            "ff_dim": m.ff_dim,
            "max_len": m.max_len,
            "tied_embeddings": m.tied,
        },
        "seq_len": seq,
        "batch_size": batch,
        "tokens_per_step": tokens_per_step,
        "optimizer": {
            "name": "AdamW",
            "lr": cfg.optim.lr,
            "schedule": "constant, no warmup",
            "betas": [cfg.optim.b1, cfg.optim.b2],
            "eps": cfg.optim.eps,
            "weight_decay": cfg.optim.weight_decay,
            "weight_decay_on": "dense kernels only (not embeddings, norms, biases)",
            "clip_global_norm": cfg.optim.clip_norm,
        },
        "params": {
            "jaxllm_formula_total": counts["total"],
            "jaxllm_state_total": jx.params,
            "jaxllm_position_embedding": counts["position_embedding"],
            "jaxllm_matmul_N": counts["matmul"],
            "hf_total": hf.params if hf else None,
        },
        "flops_per_token": fpt,
        "flops_formula": "6*N + 6*L*H*Q*T (causal attention; N = matmul params, "
        "excludes position embeddings, tied embedding once)",
        "steps_per_window": args.steps,
        "repeats": args.repeats,
        "warmup_steps_excluded": args.warmup,
        "jaxllm": {
            "compile_and_first_step_s": round(jax_compile_s, 2),
            **summarize(jax_times, tokens_per_step, args.steps),
            "loss_first": round(jx.losses[0], 4),
            "loss_last": round(jx.losses[-1], 4),
            "loss_decreased": jx.losses[-1] < jx.losses[0],
        },
    }
    jres = out["jaxllm"]
    jres["mfu"] = round(flops.mfu(jres["tokens_per_s_median"], fpt, peak), 4)
    if hf is not None:
        hres = {
            "attn_implementation": hf.attn_implementation,
            "first_step_s": round(hf_first_s, 2),
            **summarize(hf_times, tokens_per_step, args.steps),
            "loss_first": round(hf.losses[0], 4),
            "loss_last": round(hf.losses[-1], 4),
            "loss_decreased": hf.losses[-1] < hf.losses[0],
        }
        hres["mfu"] = round(flops.mfu(hres["tokens_per_s_median"], fpt, peak), 4)
        out["hf"] = hres
        out["ratio_jaxllm_over_hf"] = round(
            jres["tokens_per_s_median"] / hres["tokens_per_s_median"], 3
        )
        per_window = [h / j for j, h in zip(jax_times, hf_times, strict=True)]
        out["ratio_per_window"] = [round(x, 3) for x in per_window]
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=5, help="timed windows per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (incl. compile)")
    p.add_argument("--configs", default="tiny,gpt15m", help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--skip-hf", action="store_true", help="jaxllm only")
    p.add_argument("--seed", type=int, default=0, help="synthetic-data seed")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        p.error("--steps, --repeats and --warmup must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = os.cpu_count() or 1  # XLA's CPU client uses one intra-op thread per core
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_start": load_average(),
        },
        "versions": {"python": platform.python_version(), "jax": jax.__version__},
        "jax_devices": [str(d) for d in jax.devices()],
        "threads": {"xla": threads, "torch": None if args.skip_hf else threads},
        "data": f"synthetic: {N_DATA_BATCHES} fixed batches of Zipf(s={ZIPF_EXPONENT}) "
        "random tokens, cycled; identical for jaxllm and HF",
        "precision": "fp32 on both sides",
    }
    import flax
    import optax

    result["versions"].update(flax=flax.__version__, optax=optax.__version__)
    if not args.skip_hf:
        import torch
        import transformers

        result["versions"].update(torch=torch.__version__, transformers=transformers.__version__)

    peak = flops.peak_flops_per_second(jax.devices(), "fp32")
    result["peak_flops_fp32"] = {
        "xla_matmul_probe": round(peak),
        "source": "jaxllm.flops.peak_flops_per_second (jitted 2048x2048 fp32 XLA matmul "
        "probe, see its docstring); the denominator of MFU for both jaxllm and HF",
    }
    if not args.skip_hf:
        result["peak_flops_fp32"]["torch_mm_probe"] = round(torch_matmul_peak(threads))

    result["configs"] = {}
    for name in args.configs:
        result["configs"][name] = bench_config(name, args, threads, peak)
    result["machine"]["load_average_end"] = load_average()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
