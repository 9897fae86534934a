"""Compile time of the real train step against depth, scanned layers against unrolled.

Prints one JSON object on stdout::

    python benchmarks/compile_time.py
    python benchmarks/compile_time.py --depths 2 4 8 16 --topology v5e-8

``model.scan_layers=true`` wraps the transformer block in ``nn.scan``: XLA compiles
one layer body and loops over the stacked parameters, so compile time should stay
flat as layers are added. ``false`` unrolls the layers into one long program whose
compile time grows with depth. Each point is the train step of ``jaxllm train``
(model, loss, AdamW, shardings and donation from ``jaxllm.step.compile_steps``)
lowered and compiled ahead of time through ``jaxllm.plan`` -- traced, lowered to
StableHLO (``lower_seconds``) and compiled by XLA (``compile_seconds``) -- for
``configs/lm_tiny.yaml`` with ``model.n_layers`` set to each depth, on this machine's
single CPU device by default (``--topology v5e-8`` compiles for a TPU slice with
libtpu instead). Each point is compiled once (compilation is deterministic work; on a
shared machine the spread comes from other load, so quote the load average).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/lm_tiny.yaml")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--topology", default="cpu")
    args = parser.parse_args()
    topo = plan.get_topology(args.topology)
    devices = plan.topology_devices(topo)
    mesh = ["mesh.data=1"] if args.topology == "cpu" else []
    start = time.perf_counter()
    rows = []
    for depth in args.depths:
        for scan in (True, False):
            cfg = load_config(
                args.config, [*mesh, f"model.n_layers={depth}", f"model.scan_layers={scan}"]
            )
            r = plan.compile_memory(cfg, topo, devices)
            rows.append(
                {
                    "n_layers": depth,
                    "scan_layers": scan,
                    "parameters": r["parameters"],
                    "lower_seconds": round(r["lower_seconds"], 3),
                    "compile_seconds": round(r["compile_seconds"], 3),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr)
    result = {
        "config": args.config,
        "topology": args.topology,
        "machine": {
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "load_average_start": os.getloadavg()[0],
        },
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    # Deepest over shallowest compile time, per mode: ~1 means flat.
    for scan in (True, False):
        times = [r["compile_seconds"] for r in rows if r["scan_layers"] == scan]
        result[f"growth_{'scan' if scan else 'unrolled'}"] = round(times[-1] / times[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
