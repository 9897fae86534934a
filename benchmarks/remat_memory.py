"""Memory per chip of the real train step under each remat policy (AOT, nothing runs).

Prints one JSON object on stdout::

    python benchmarks/remat_memory.py                       # gpt2_124m on v5e-8 + lm_tiny on cpu
    python benchmarks/remat_memory.py --skip-tpu            # lm_tiny on cpu only

For each ``model.remat`` policy (``none``: keep every activation for the backward
pass; ``save_dots``: keep only matmul outputs, recompute the rest; ``full``: keep
only each layer's input and recompute the layer) the train step of ``jaxllm train``
is compiled ahead of time with ``jaxllm.plan`` and XLA's ``memory_analysis()`` is
read: arguments (params + Adam state + batch), temporaries (activations kept for the
backward pass and work space), and the total per chip. Step FLOPs from the cost model
show what the recomputation costs. Where XLA refuses to compile for lack of HBM its
own temporaries figure is reported (``compile_error`` is then set).

Targets: ``configs/gpt2_124m.yaml`` on a v5e-8 (libtpu's topology description; the
global batch cut to ``--tpu-batch`` so that the policies can be compared where they
fit) and ``configs/lm_tiny.yaml`` on this machine's single CPU device.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from jaxllm import plan  # noqa: E402
from jaxllm.config import load_config  # noqa: E402

POLICIES = ("none", "save_dots", "full")


def measure(config: str, topology: str, overrides: list[str]) -> list[dict]:
    """One row per remat policy: memory per chip (bytes) and cost-model FLOPs per step."""
    topo = plan.get_topology(topology)
    devices = plan.topology_devices(topo)
    rows = []
    for policy in POLICIES:
        cfg = load_config(config, [*overrides, f"model.remat={policy}"])
        r = plan.compile_memory(cfg, topo, devices)
        mem = r["memory_bytes"]
        flops = r["cost_flops"]
        rows.append(
            {
                "remat": policy,
                "arguments_bytes": mem["arguments"],
                "temporaries_bytes": mem["temporaries"],
                "total_bytes": mem["total"],
                "capacity_bytes": int(topo.hbm_bytes),
                "fits": r["compile_error"] is None and mem["total"] <= topo.hbm_bytes,
                "flops_per_step_cost_model": None if flops is None else flops * topo.chips,
                "compile_seconds": r.get("compile_seconds"),
                "compile_error": r["compile_error"],
            }
        )
        print(
            f"{config} {topology} remat={policy}: {mem['total'] / 2**30:.2f} GiB", file=sys.stderr
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tpu-config", default="configs/gpt2_124m.yaml")
    parser.add_argument("--topology", default="v5e-8")
    parser.add_argument("--tpu-batch", type=int, default=64, help="global batch for the TPU plan")
    parser.add_argument("--cpu-config", default="configs/lm_tiny.yaml")
    parser.add_argument("--skip-tpu", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    result = {
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "load_average_start": os.getloadavg()[0],
        },
        "runs": [],
    }
    targets = [(args.cpu_config, "cpu", ["mesh.data=1"])]
    if not args.skip_tpu:
        # The whole batch in one step (the config itself accumulates 8 micro-batches).
        tpu_overrides = [f"train.batch_size={args.tpu_batch}", "train.grad_accum=1"]
        targets.insert(0, (args.tpu_config, args.topology, tpu_overrides))
    for config, topology, overrides in targets:
        result["runs"].append(
            {
                "config": config,
                "topology": topology,
                "overrides": overrides,
                "policies": measure(config, topology, overrides),
            }
        )
    result["wall_seconds"] = time.perf_counter() - start
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
