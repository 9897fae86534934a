"""What each compression stage cost and saved: size, sparsity, quality, latency.

One row per model (the teacher, then every stage): parameters, non-zero parameters,
bytes of its parameters-only checkpoint on disk, the task's eval metrics, CPU forward
latency (ms per batch) and decode tokens/s. Written as ``report.json``, ``report.md``
and ``quality_vs_size.png``.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def count_params(params: Any) -> tuple[int, int]:
    """(parameters, non-zero parameters) of a model tree.

    An integer kernel counts its ``qvalue`` entries (its scales are metadata, like a
    float kernel's dtype); ``act_scale`` scalars are not counted either.
    """
    total, nonzero = 0, 0

    def visit(node: Any, key: str = "") -> None:
        nonlocal total, nonzero
        # An integer kernel: {"qvalue", "scale"} (is_quantized), maybe beside act_scale.
        if isinstance(node, dict) and "qvalue" in node:
            arr = np.asarray(jax.device_get(node["qvalue"]))
            total, nonzero = total + arr.size, nonzero + int(np.count_nonzero(arr))
        elif isinstance(node, dict):
            for k, v in node.items():
                visit(v, k)
        elif key != "act_scale":
            arr = np.asarray(jax.device_get(node))
            total, nonzero = total + arr.size, nonzero + int(np.count_nonzero(arr))

    visit(params)
    return total, nonzero


def dir_bytes(path: str) -> int:
    """Bytes of every file under `path` (a checkpoint on disk)."""
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def _median_seconds(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile (and warm caches) outside the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_latency_ms(model: Any, params: Any, batch: int, length: int, repeats: int) -> float:
    """Median wall time of one jitted forward pass on a [batch, length] token batch (ms)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 100, (batch, length)), jnp.int32)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return 1000.0 * _median_seconds(lambda: apply(params, tokens), repeats)


def decode_tokens_per_sec(
    model_cfg: Any, params: Any, batch: int, prompt_len: int, new_tokens: int, repeats: int
) -> float:
    """Greedy KV-cache decode throughput: batch * new_tokens / median wall time."""
    from jaxllm.decode import generate

    prompt = np.random.default_rng(1).integers(3, 100, (batch, prompt_len)).astype(np.int32)

    def run():
        # eos_id -1 never matches: every row generates exactly new_tokens.
        return generate(model_cfg, params, prompt, max_new_tokens=new_tokens, eos_id=-1)

    return batch * new_tokens / _median_seconds(run, repeats)


COLUMNS = [
    ("stage", "stage", "{}"),
    ("params", "params", "{:,}"),
    ("nonzero", "non-zero", "{:,}"),
    ("sparsity", "sparsity", "{:.1%}"),
    ("bytes_on_disk", "bytes on disk", "{:,}"),
]


def write_report(rows: list[dict], out_dir: str, metric: str, info: dict) -> dict[str, str]:
    """Writes report.json, report.md and quality_vs_size.png; returns their paths.

    Args:
      rows: one dict per model (``stage``, ``params``, ``nonzero``, ``bytes_on_disk``,
        ``forward_ms``, ``decode_tok_s`` and ``eval_*`` metrics).
      out_dir: where the files go.
      metric: the main quality metric (an ``eval_*`` key without the prefix).
      info: the command, machine and recipe, written above the table.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = {"json": "report.json", "md": "report.md", "png": "quality_vs_size.png"}
    paths = {k: os.path.join(out_dir, n) for k, n in names.items()}
    with open(paths["json"], "w") as f:
        json.dump({"info": info, "main_metric": metric, "rows": rows}, f, indent=2)
    metric_keys = [k for k in rows[0] if k.startswith("eval_")]
    lines = [f"# Compression report: {info.get('recipe', '')}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    head = [c[1] for c in COLUMNS] + [k[5:] for k in metric_keys] + ["forward ms", "decode tok/s"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for r in rows:
        cells = [fmt.format(r[key]) for key, _, fmt in COLUMNS]
        cells += [_num(r.get(k)) for k in metric_keys]
        cells += [_num(r.get("forward_ms")), _num(r.get("decode_tok_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Relative to `{base['stage']}`:", ""]
    for r in rows[1:]:
        q = r.get(f"eval_{metric}")
        b = base.get(f"eval_{metric}")
        rel = f"{q / b - 1:+.2%}" if q is not None and b else "n/a"
        lines.append(
            f"- {r['stage']}: {metric} {rel}, size x{_ratio(r, base, 'bytes_on_disk')}"
            f", forward x{_ratio(r, base, 'forward_ms')}, decode x{_ratio(r, base, 'decode_tok_s')}"
        )
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, metric, paths["png"])
    return paths


def _num(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _ratio(r: dict, base: dict, key: str) -> str:
    a, b = r.get(key), base.get(key)
    return f"{a / b:.3f}" if a and b else "n/a"


def _plot(rows: list[dict], metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on TPU VMs or CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        x, y = r["bytes_on_disk"] / 2**20, r.get(f"eval_{metric}")
        if y is None:
            continue
        ax.scatter(x, y)
        ax.annotate(r["stage"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("checkpoint size on disk (MiB)")
    ax.set_ylabel(metric)
    ax.set_title("quality against size")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
