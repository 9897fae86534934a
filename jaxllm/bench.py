"""`jaxllm bench NAME [ARGS...]`: run one of the repository's benchmark scripts.

The scripts live in `benchmarks/` of a source checkout (they compare against peers such as
Hugging Face transformers on torch, which the package itself does not depend on). Each
prints one JSON object on stdout; `BENCHMARKS.md` quotes them. A script runs in its own
Python process so that it can choose its own devices (`JAX_PLATFORMS`, fake device
counts) before JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

from jaxllm.errors import UserError

# bench name -> (script, what it measures)
BENCHMARKS = {
    "train": ("train_throughput.py", "training tokens/s and MFU vs HF transformers (torch CPU)"),
    "decode": ("decode_throughput.py", "KV-cache decode tokens/s vs HF transformers generate"),
    "int8": ("int8_inference.py", "fp32 vs weight-only int8 vs W8A8 forward and decode"),
    "compile": ("compile_time.py", "train-step compile time against depth, scan vs unrolled"),
    "data": ("data_throughput.py", "input pipeline examples/s and tokens/s"),
    "remat": ("remat_memory.py", "per-chip memory of the train step against the remat policy"),
    "shard_map": ("shard_map_memory.py", "per-device memory of vocab-parallel loss and ring"),
}


def benchmarks_dir() -> str:
    """The `benchmarks/` folder of the source checkout this package was imported from."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(here, "benchmarks")


def run_benchmark(name: str, args: list[str]) -> int:
    """Runs benchmark `name` with `args`; its JSON goes to stdout. Returns its exit status.

    Raises:
      UserError: unknown name, or no `benchmarks/` folder (an installed wheel).
    """
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}")
    script = os.path.join(benchmarks_dir(), BENCHMARKS[name][0])
    if not os.path.isfile(script):
        raise UserError(
            f"jaxllm bench needs a source checkout: {script} does not exist; clone the "
            "repository and run `pip install -e .` from it"
        )
    # The repository root first on the path, so the scripts import this jaxllm.
    env = dict(os.environ)
    root = os.path.dirname(benchmarks_dir())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return subprocess.call([sys.executable, script, *args], env=env, cwd=root)


def describe() -> str:
    """One line per benchmark, for `jaxllm bench --help`."""
    return "\n".join(f"  {n:10s} {desc}" for n, (_, desc) in BENCHMARKS.items())
