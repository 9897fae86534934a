"""`jaxllm plan`: will this config fit that TPU slice, and how fast might it run?

The real train step (`jaxllm.step.compile_steps`: the same model, optimizer, shardings
and donation as `jaxllm train`) is compiled ahead of time for a named Cloud TPU
topology on whatever machine runs the command -- a laptop will do. libtpu describes
the slice's devices (`jax.experimental.topologies.get_topology_desc`); the state and
batch are abstract (`jax.eval_shape`), so nothing is allocated. XLA then reports:

- memory per chip (`compiled.memory_analysis()`): arguments, temporaries, outputs
  and generated code, compared with the chip's HBM;
- FLOPs and a step time from its cost model (`compiled.cost_analysis()`,
  ``flops`` and ``optimal_seconds``). The implied MFU is
  analytic FLOPs per step / (chips x peak x that time): the cost model's estimate,
  not a measurement.

Two limits of the cost model, seen with jax 0.10.2 and libtpu 0.0.42: its ``flops``
count a loop body once, so scanned layers (`model.scan_layers`) and gradient
accumulation (a scan over micro-batches) make it undercount by up to L x grad_accum
(the analytic 6N + attention count is printed beside it for that reason); and on a
compile-only client it returns a negative ``optimal_seconds`` ("no estimate") for any
program with sliced prefetches (async ``slice-start``/``slice-done`` pairs that memory
space assignment adds; jaxllm's train step has them, also with libtpu 0.0.52).

So the step time comes from separate compiles made for the estimate alone
(:func:`step_time_estimate`), on the same slice and mesh, collectives included, with
sliced prefetch off (``xla_tpu_sliced_prefetch_max_slices=0``) and unrolled layers: the
config itself when it has neither scanned layers nor accumulation, otherwise one
micro-batch at 1 and 2 layers, extrapolated linearly in depth, times grad_accum. Memory
figures always come from the real step as training compiles it.

When the step does not fit, the plan says by how much and compiles a few standard
fixes (FSDP over every chip, full remat, more gradient accumulation) to say which
of them would fit.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import flops, optim, sharding
from jaxllm.config import Config, from_dict, to_dict
from jaxllm.errors import UserError
from jaxllm.model import build_model
from jaxllm.precision import get_policy
from jaxllm.step import compile_steps

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation: what a chip holds and computes, and how slices are named."""

    peak_key: str  # flops.PEAK_FLOPS key (bf16 dense peak per chip)
    hbm_gib: float
    # Google names v4/v5p slices by TensorCores (2 per chip: v4-8 = 4 chips) and
    # v5e/v6e slices by chips (v5e-8 = 8 chips); JAX sees one device per chip on all
    # four (v4/v5p TensorCores are fused as "megacore").
    cores_per_chip: int
    chip_config: str  # libtpu chip config: "megacore" = one device per v4 chip
    # chips -> topology string in libtpu's notation (2D tori for v5e/v6e, 3D for v4/v5p)
    shapes: dict[int, str]
    chips_per_host: int  # of multi-host slices; v5e/v6e slices up to 8 chips are 1 host


_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}  # fmt: skip
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8"}  # fmt: skip

# Figures: Google Cloud TPU system-architecture pages (HBM per chip; peak bf16 per chip
# is flops.PEAK_FLOPS: v4 275 T, v5e 197 T, v5p 459 T, v6e 918 T).
GENERATIONS: dict[str, Generation] = {
    "v4": Generation("TPU v4", 32, 2, "megacore", _SHAPES_3D, 4),
    "v5e": Generation("TPU v5e", 16, 1, "default", _SHAPES_2D, 4),
    "v5p": Generation("TPU v5p", 95, 2, "default", _SHAPES_3D, 4),
    "v6e": Generation("TPU v6e", 32, 1, "default", _SHAPES_2D, 4),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice (e.g. ``v5e-8``) or ``cpu`` (this machine's CPU devices)."""

    name: str
    chips: int
    hosts: int
    hbm_bytes: float  # per chip (for cpu: this host's RAM shared by its devices)
    peak_flops: float | None  # bf16 per chip; None for cpu (no datasheet figure)
    generation: str = "cpu"
    topology: str = ""  # libtpu notation, e.g. "v5e:2x4"


def _tpu_topologies() -> dict[str, Topology]:
    table = {}
    for gen_name, gen in GENERATIONS.items():
        for chips, shape in gen.shapes.items():
            name = f"{gen_name}-{chips * gen.cores_per_chip}"
            single_host = gen.cores_per_chip == 1 and chips <= 8
            hosts = 1 if single_host else max(1, chips // gen.chips_per_host)
            peak = flops.PEAK_FLOPS[gen.peak_key]["bf16"]
            table[name] = Topology(
                name, chips, hosts, gen.hbm_gib * GIB, peak, gen_name, f"{gen_name}:{shape}"
            )
    return table


TOPOLOGIES: dict[str, Topology] = _tpu_topologies()


def topology_names() -> list[str]:
    """Every name `--topology` accepts, in table order, then ``cpu``."""
    return [*TOPOLOGIES, "cpu"]


def get_topology(name: str) -> Topology:
    """Looks a topology up by name (``v5e-8``, ``v5p-128``, ``cpu``, ...)."""
    if name == "cpu":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        n = len(jax.devices("cpu"))
        return Topology("cpu", n, 1, ram / n, None)
    if name not in TOPOLOGIES:
        raise UserError(f"unknown topology {name!r}; valid names: {', '.join(topology_names())}")
    return TOPOLOGIES[name]


def use_cpu_backend() -> None:
    """Keeps this process on the CPU backend (call before jax initialises a backend).

    A plan compiles for abstract devices and never runs anything, so it must not claim
    (or, off a TPU VM, probe for and warn about) a local accelerator. An explicit
    JAX_PLATFORMS is respected.
    """
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")


def _quiet_libtpu() -> None:
    # Off a TPU VM, libtpu looks for the VM's metadata server and prints warnings about
    # the accelerator type and worker hostnames; it needs neither to compile. On a TPU
    # VM (an accelerator device node exists) the environment is left alone.
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return
    for key, value in (
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("TPU_ACCELERATOR_TYPE", "v5litepod-8"),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_WORKER_ID", "0"),
        # libtpu locks /tmp/libtpu_lockfile for the one process that may own the TPUs;
        # compiling claims no TPU, so several plans (or tests) may run side by side.
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)


def topology_devices(topo: Topology) -> list[Any]:
    """The devices of `topo`: abstract TPU devices from libtpu, or the local CPU devices."""
    if topo.name == "cpu":
        return list(jax.devices("cpu"))
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(
            f"planning for {topo.name} needs libtpu to compile for TPU; "
            "pip install 'jaxllm[tpu]' (or use --topology cpu)"
        )
    from jax.experimental import topologies

    _quiet_libtpu()
    gen = GENERATIONS[topo.generation]
    bounds = (
        (1, 1, 1)
        if topo.chips == 1
        else (2, 4, 1)
        if topo.hosts == 1 and topo.chips == 8
        else (2, 2, 1)
    )
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topo.topology,
        chip_config_name=gen.chip_config,
        chips_per_host_bounds=bounds,
        num_slices=1,
    )
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise RuntimeError(f"libtpu gave {len(devices)} devices for {topo.topology}")
    return devices


def abstract_batch(cfg: Config, mesh: Any, rules: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The train step's batch as sharded ShapeDtypeStructs (the data pipeline's format).

    lm streams carry inputs/targets/weights; packed tasks add positions and segment ids,
    prefix-LM tasks a prefix mask, classify a label per row (`jaxllm.tasks`).
    """
    b, t = cfg.train.batch_size, cfg.data.seq_len
    keys = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32}
    if cfg.task != "lm":
        keys.update(positions=jnp.int32, segment_ids=jnp.int32)
    if cfg.task in ("translate", "dialogue"):
        keys["prefix_mask"] = jnp.bool_
    out = {
        k: jax.ShapeDtypeStruct((b, t), d, sharding=sharding.batch_sharding(mesh, rules, 2))
        for k, d in keys.items()
    }
    if cfg.task == "classify":
        out["label"] = jax.ShapeDtypeStruct(
            (b,), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, 1)
        )
    return out


def _first(cost: Any) -> dict:
    # cost_analysis() is a dict on current jax, a one-element list on older versions.
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


# XLA's cost model returns no step time for sliced prefetches (see the module docstring).
ESTIMATE_COMPILER_OPTIONS = {"xla_tpu_sliced_prefetch_max_slices": "0"}


def compile_memory(
    cfg: Config, topo: Topology, devices: list[Any], compiler_options: dict | None = None
) -> dict[str, Any]:
    """AOT-compiles the train step of `cfg` on `devices`; memory and cost per chip.

    Args:
        cfg: the config whose train step is compiled.
        topo: the slice (for messages).
        devices: its devices (abstract TPU devices or local CPU ones).
        compiler_options: XLA options for this compile only (the step-time estimate's).

    Returns:
        A dict: mesh sizes, parameter count and bytes, memory_analysis fields (bytes per
        chip) and their total, cost-model flops and optimal_seconds (None if absent).
    """
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.logical_rules(cfg.mesh)
    ways = sharding.batch_ways(mesh, rules)
    micro = cfg.train.batch_size // cfg.train.grad_accum
    if micro % ways:
        raise UserError(
            f"the micro-batch train.batch_size/train.grad_accum={micro} is not divisible by "
            f"the {ways} batch shards of the mesh on {topo.name}; use a multiple of {ways}"
        )
    model = build_model(cfg.model, get_policy(cfg.precision))
    schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
    steps = compile_steps(model, tx, cfg, schedule, mesh)
    state, batch = steps.abstract_state, abstract_batch(cfg, mesh, rules)
    params = jax.tree.leaves(state.params)
    common = {
        "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape, strict=True)),
        "parameters": int(sum(math.prod(p.shape) for p in params)),
        "parameter_bytes": int(sum(math.prod(p.shape) * p.dtype.itemsize for p in params)),
    }
    start = time.perf_counter()
    lowered = steps.lower_train(state, batch)
    common["lower_seconds"] = time.perf_counter() - start
    # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR) cannot load an executable
    # for compile-only TPU devices: every plan would warn and store a useless entry.
    cache_was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        compiled = lowered.compile(compiler_options=compiler_options or None)
        common["compile_seconds"] = time.perf_counter() - start - common["lower_seconds"]
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {**common, **_oom_result(str(e), state, batch)}
    finally:
        jax.config.update("jax_enable_compilation_cache", cache_was_on)
    mem = compiled.memory_analysis()
    cost = _first(compiled.cost_analysis())
    fields = {
        "arguments": mem.argument_size_in_bytes,
        "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes,  # outputs written into donated arguments
        "temporaries": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
    }
    # Donated state is updated in place: its outputs take no memory of their own.
    total = (
        fields["arguments"] + fields["outputs"] - fields["aliased"]
        + fields["temporaries"] + fields["generated_code"]
    )  # fmt: skip
    return {
        **common,
        "memory_bytes": {**fields, "total": total},
        "compile_error": None,
        "cost_flops": float(cost["flops"]) if "flops" in cost else None,
        "cost_optimal_seconds": (
            float(cost["optimal_seconds"]) if cost.get("optimal_seconds", 0) > 0 else None
        ),
        "cost_optimal_seconds_raw": cost.get("optimal_seconds"),
    }


# XLA:TPU refuses to compile a program that cannot fit, e.g. "the total memory required
# for HLO temporaries (66.16G) exceeds available HBM (15.75G)" (sizes in GiB).
_OOM_TEMPS = re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)")


def _sharded_bytes(tree: Any) -> int:
    """Bytes per device of a tree of sharded ShapeDtypeStructs."""
    return int(
        sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in jax.tree.leaves(tree)
        )
    )


def _oom_result(message: str, state: Any, batch: dict) -> dict[str, Any]:
    """Memory per chip of a step XLA refused to compile: its temporaries + our arguments."""
    found = _OOM_TEMPS.search(message)
    temps = 0
    if found:
        temps = int(float(found.group(1)) * 1024 ** (" KMGT".index(found.group(2) or " ")))
    state_bytes = _sharded_bytes(state)
    fields = {
        "arguments": state_bytes + _sharded_bytes(batch),
        "outputs": state_bytes,  # the new state, written into the donated old one
        "aliased": state_bytes,
        "temporaries": temps,
        "generated_code": 0,
    }
    return {
        "memory_bytes": {**fields, "total": fields["arguments"] + temps},
        "compile_error": " ".join(message.split())[:400],
        "cost_flops": None,
        "cost_optimal_seconds": None,
        "cost_optimal_seconds_raw": None,
    }


def _with(cfg: Config, overrides: list[str]) -> Config:
    return from_dict(to_dict(cfg), overrides)


def step_time_estimate(cfg: Config, topo: Topology, devices: list[Any]) -> dict[str, Any]:
    """XLA's cost-model time for one train step of `cfg` on the slice (not a measurement).

    The cost model counts a loop body once, so scanned layers and gradient accumulation
    are estimated from one micro-batch of an unrolled model at 1 and 2 layers on the same
    mesh: t(L) = t(1) + (L - 1) * (t(2) - t(1)), times grad_accum (this counts the
    optimizer update and the gradient reduction once per micro-batch, a little high).

    Returns:
        ``step_seconds`` (None, with a ``reason``, when no estimate can be made), the
        ``method`` used and the compiled times it came from.
    """
    if topo.peak_flops is None:
        return {"step_seconds": None, "reason": "no TPU cost model for CPU devices"}
    accum = cfg.train.grad_accum
    if not cfg.model.scan_layers and accum == 1:
        seconds = compile_memory(cfg, topo, devices, ESTIMATE_COMPILER_OPTIONS)[
            "cost_optimal_seconds"
        ]
        reason = None if seconds else "XLA's cost model gave no estimate"
        return {"step_seconds": seconds, "method": "the step itself", "reason": reason}
    micro = ["train.grad_accum=1", f"train.batch_size={cfg.train.batch_size // accum}",
             "model.scan_layers=false"]  # fmt: skip
    times = []
    for layers in (1, 2):
        try:
            small = _with(cfg, [*micro, f"model.n_layers={layers}"])
            seconds = compile_memory(small, topo, devices, ESTIMATE_COMPILER_OPTIONS)[
                "cost_optimal_seconds"
            ]
        except UserError as e:  # a config that cannot be cut to 1 or 2 layers
            return {"step_seconds": None, "reason": str(e)}
        if not seconds:
            return {"step_seconds": None, "reason": "XLA's cost model gave no estimate"}
        times.append(seconds)
    micro_seconds = times[0] + (cfg.model.n_layers - 1) * (times[1] - times[0])
    return {
        "step_seconds": accum * micro_seconds,
        "method": f"one micro-batch at 1 and 2 unrolled layers, x{accum} micro-batches",
        "seconds_1_layer": times[0],
        "seconds_2_layers": times[1],
        "reason": None,
    }


def candidate_fixes(cfg: Config, n_devices: int) -> list[list[str]]:
    """Standard ways to cut memory per chip that `cfg` does not already use.

    FSDP over every chip (parameters, gradients and Adam moments sharded n ways), full
    remat (keep only layer inputs for the backward pass), 4x more gradient accumulation
    (a quarter of the activations at once, same global batch), and all three together.
    """
    fixes: list[list[str]] = []
    m = cfg.mesh
    if n_devices > 1 and (m.data, m.fsdp, m.tensor) not in ((1, -1, 1), (1, n_devices, 1)):
        fixes.append(["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"])
    if cfg.model.remat != "full":
        fixes.append(["model.remat=full"])
    accum = cfg.train.grad_accum * 4
    if cfg.train.batch_size % accum == 0:
        fixes.append([f"train.grad_accum={accum}"])
    if len(fixes) > 1:
        fixes.append([o for fix in fixes for o in fix])
    return fixes


def plan(cfg: Config, topology: str, check_fixes: bool = True) -> dict[str, Any]:
    """Compiles `cfg`'s train step for `topology` and reports memory, FLOPs and speed.

    Args:
        cfg: the experiment config (its mesh section is resolved against the slice).
        topology: a name from :func:`topology_names` (``v5e-8``, ``v5p-128``, ``cpu``).
        check_fixes: when the step does not fit, compile :func:`candidate_fixes` too
            and report which of them fit.

    Returns:
        A JSON-serialisable report; ``fits`` says whether the step fits per-chip memory.
    """
    topo = get_topology(topology)
    devices = topology_devices(topo)
    sharding.mesh_shape(cfg.mesh, len(devices))  # a mesh that cannot divide: UserError
    result = compile_memory(cfg, topo, devices)
    mem = result["memory_bytes"]
    tokens = cfg.train.batch_size * cfg.data.seq_len
    per_token = flops.train_flops_per_token(cfg.model, cfg.data.seq_len)
    analytic = per_token * tokens
    fits = result["compile_error"] is None and mem["total"] <= topo.hbm_bytes
    estimate = (
        step_time_estimate(cfg, topo, devices)
        if fits
        else {"step_seconds": None, "reason": "the step does not fit"}
    )
    seconds = estimate["step_seconds"]
    mfu = None
    if topo.peak_flops and seconds:
        mfu = analytic / (topo.chips * topo.peak_flops * seconds)
    report: dict[str, Any] = {
        "topology": topo.name,
        "topology_libtpu": topo.topology or None,
        "device_kind": devices[0].device_kind,
        "chips": topo.chips,
        "hosts": topo.hosts,
        "mesh": result["mesh"],
        "precision": cfg.precision,
        "remat": cfg.model.remat,
        "scan_layers": cfg.model.scan_layers,
        "global_batch": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "seq_len": cfg.data.seq_len,
        "parameters": result["parameters"],
        "parameter_bytes": result["parameter_bytes"],
        "memory_per_chip_bytes": mem,
        "capacity_per_chip_bytes": int(topo.hbm_bytes),
        "memory_used_fraction": mem["total"] / topo.hbm_bytes,
        "fits": fits,
        # XLA's own refusal (out of memory), when it would not compile the step at all.
        "compile_error": result["compile_error"],
        # XLA's count of the per-chip program, times the chips: comparable with 6N+attn
        # for unrolled layers without accumulation (loop bodies are counted once).
        "flops_per_step_cost_model": (
            result["cost_flops"] * topo.chips if result["cost_flops"] is not None else None
        ),
        "flops_per_step_analytic": analytic,
        "flops_analytic_formula": "6*N + 6*L*H*Q*T per token (causal attention; jaxllm.flops)",
        "peak_flops_per_chip": topo.peak_flops,
        "step_seconds_cost_model": seconds,
        "implied_mfu_cost_model": mfu,
        "step_estimate": estimate,
        # The real step's own figure; <= 0 (no estimate) when it has sliced prefetches.
        "optimal_seconds_raw": result["cost_optimal_seconds_raw"],
        "lower_seconds": result.get("lower_seconds"),
        "compile_seconds": result.get("compile_seconds"),
        "note": (
            "step time and MFU are XLA's cost-model estimates (compiled with sliced "
            "prefetch off; scanned layers and accumulation extrapolated from 1 and 2 "
            "unrolled layers), not measurements; cost-model FLOPs count a loop body once"
        ),
    }
    if not report["fits"] and check_fixes:
        report["fixes"] = []
        for fix in candidate_fixes(cfg, len(devices)):
            try:
                fixed = compile_memory(_with(cfg, fix), topo, devices)
            except UserError:
                continue  # e.g. the micro-batch no longer divides the mesh
            total = fixed["memory_bytes"]["total"]
            fits = fixed["compile_error"] is None and total <= topo.hbm_bytes
            report["fixes"].append({"overrides": fix, "total_bytes": total, "fits": fits})
    return report


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def check_fits(report: dict[str, Any]) -> None:
    """Raises UserError (one line: the overflow and concrete fixes) if the step won't fit."""
    if report["fits"]:
        return
    mem = report["memory_per_chip_bytes"]
    parts = ("arguments", "temporaries", "outputs", "generated_code")
    biggest = max(parts, key=lambda k: mem[k])
    cap = report["capacity_per_chip_bytes"]
    if report["compile_error"]:
        # XLA's own limit is a little under the datasheet HBM (runtime reservations).
        msg = (
            f"XLA cannot fit the train step on {report['topology']}: it needs about "
            f"{_gib(mem['total'])} per chip ({biggest} {_gib(mem[biggest])}) and a chip has "
            f"{_gib(cap)}"
        )
    else:
        msg = (
            f"the train step needs {_gib(mem['total'])} per chip on {report['topology']} but "
            f"a chip has {_gib(cap)} ({_gib(mem['total'] - cap)} over; largest part: "
            f"{biggest} {_gib(mem[biggest])})"
        )
    fixes = report.get("fixes")
    if fixes:
        good = [" ".join(f["overrides"]) for f in fixes if f["fits"]]
        checked = "; ".join(
            f"{' '.join(f['overrides'])} -> {_gib(f['total_bytes'])}" for f in fixes
        )
        if good:
            msg += f"; fits with: {min(good, key=len)} (checked: {checked})"
        else:
            msg += (
                f"; none of the checked fixes fit ({checked}): lower train.batch_size, "
                "use a larger topology or a smaller model"
            )
    else:
        msg += (
            "; try mesh.fsdp=-1 mesh.data=1 (shard the state over every chip), "
            "model.remat=full, a larger train.grad_accum or a smaller train.batch_size"
        )
    raise UserError(msg)


def format_report(report: dict[str, Any]) -> str:
    """The plan as an aligned two-column table."""
    mem = report["memory_per_chip_bytes"]
    cap = report["capacity_per_chip_bytes"]
    mesh = " ".join(f"{k}={v}" for k, v in report["mesh"].items())
    unit = "device" if report["topology"] == "cpu" else "chip"

    def num(x: float | None, fmt: str) -> str:
        unit = " s" if fmt.endswith(" s") else ""
        return "n/a" if x is None else format(x, fmt.removesuffix(" s")) + unit

    rows = [
        ("topology", f"{report['topology']} ({report['device_kind']}, {report['chips']} "
                     f"{unit}s, {report['hosts']} host(s))"),
        ("mesh", mesh),
        ("batch", f"{report['global_batch']} x {report['seq_len']} tokens, "
                  f"grad_accum {report['grad_accum']}, {report['precision']}, "
                  f"remat {report['remat']}"),
        ("parameters", f"{report['parameters']:,} ({_gib(report['parameter_bytes'])})"),
        (f"memory/{unit}: arguments", _gib(mem["arguments"])),
        (f"memory/{unit}: temporaries", _gib(mem["temporaries"])),
        (f"memory/{unit}: outputs", f"{_gib(mem['outputs'])} ({_gib(mem['aliased'])} "
                                    "aliased to donated inputs)"),
        (f"memory/{unit}: generated code", _gib(mem["generated_code"])),
        (f"memory/{unit}: total", f"{_gib(mem['total'])} of {_gib(cap)} "
                                  f"({100 * report['memory_used_fraction']:.1f}%)"),
        ("fits", "yes" if report["fits"] else "NO"),
        ("FLOPs/step (cost model)", num(report["flops_per_step_cost_model"], ".4g")),
        ("FLOPs/step (6N + attention)", num(report["flops_per_step_analytic"], ".4g")),
        ("step time (cost model)", num(report["step_seconds_cost_model"], ".4g s")),
        ("implied MFU (cost model)", num(report["implied_mfu_cost_model"], ".1%")),
    ]  # fmt: skip
    for fix in report.get("fixes", []):
        rows.append(
            (f"fix: {' '.join(fix['overrides'])}",
             f"{_gib(fix['total_bytes'])} ({'fits' if fix['fits'] else 'does not fit'})")
        )  # fmt: skip
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append(f"note: {report['note']}")
    return "\n".join(lines)
