"""Per-device memory of the shard_map kernels vs the plain jit path (AOT compile, no run).

Prints one JSON object: for each case, XLA's compiled memory analysis
(`temp_size_in_bytes`, the scratch a device needs beyond arguments and outputs) of
loss + gradient, so the numbers are what the compiler plans for one device.

- ``vocab_parallel``: LM head + cross-entropy from the final hidden states, plain
  (`tasks.lm_loss_sums` on full logits, vocab-sharded by the rules) vs
  `jaxllm.vocab_parallel` on a mesh data=2 x tensor=4, unchunked and in token chunks
  of 1024 (the default) and 256.
- ``ring_attention``: causal attention forward + backward, dense
  (`jax.nn.dot_product_attention`, the sequence on one device) vs
  `jaxllm.ring_attention` with the sequence split 8 ways, at growing lengths.

Usage:
  .venv/bin/python benchmarks/shard_map_memory.py [--devices 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _setup(devices: int) -> None:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    if not os.environ.get("JAX_PLATFORMS"):
        os.environ["JAX_PLATFORMS"] = "cpu"


def vocab_parallel_case(tokens: tuple[int, int], d_model: int, vocab: int) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxllm import sharding, tasks
    from jaxllm.config import load_config
    from jaxllm.vocab_parallel import vocab_parallel_lm_sums

    cfg = load_config(None, ["mesh.data=2", "mesh.tensor=4"])
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)
    batch, seq = tokens
    hidden = jax.ShapeDtypeStruct((batch, seq, d_model), jnp.float32)
    head = jax.ShapeDtypeStruct((d_model, vocab), jnp.float32)
    targets = jnp.zeros((batch, seq), jnp.int32)
    weights = jnp.ones((batch, seq), jnp.float32)

    def plain(h, w):
        return tasks.lm_loss_sums(h @ w, targets, weights)["loss_sum"]

    def fused(chunk_tokens):
        def loss(h, w):
            sums = vocab_parallel_lm_sums(
                h, w, targets, weights, tied=False, chunk_tokens=chunk_tokens
            )
            return sums["loss_sum"]

        return loss

    out = {
        "mesh": "data=2 x tensor=4",
        "tokens": batch * seq,
        "tokens_per_device": batch * seq // 2,
        "d_model": d_model,
        "vocab": vocab,
    }
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        shardings = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "tensor")))
        cases = (
            ("plain", plain),
            ("vocab_parallel_unchunked", fused(0)),
            ("vocab_parallel", fused(1024)),  # the default chunk_tokens
            ("vocab_parallel_chunk256", fused(256)),
        )
        for name, fn in cases:
            grad = jax.jit(jax.grad(fn, argnums=(0, 1)), in_shardings=shardings)
            mem = grad.lower(hidden, head).compile().memory_analysis()
            out[f"{name}_temp_bytes"] = int(mem.temp_size_in_bytes)
    out["ratio"] = round(out["vocab_parallel_temp_bytes"] / out["plain_temp_bytes"], 3)
    return out


def attention_case(impl: str, seq_len: int, ring: int, heads: int, dim: int) -> int:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxllm import sharding
    from jaxllm.attention import attention_mask
    from jaxllm.config import load_config
    from jaxllm.ring_attention import ring_attention, ring_spec

    rules_text = "{batch: data, length: fsdp}" if impl == "ring" else "{batch: data}"
    cfg = load_config(None, ["mesh.data=1", f"mesh.fsdp={ring}", f"mesh.rules={rules_text}"])
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.logical_rules(cfg.mesh)
    qkv = jax.ShapeDtypeStruct((1, seq_len, heads, dim), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(seq_len), (1, seq_len))

    def attn(q, k, v):
        if impl == "ring":
            spec = ring_spec(heads, heads)
            return ring_attention(q, k, v, positions, spec=spec)
        mask = attention_mask(positions, positions)
        return jax.nn.dot_product_attention(q, k, v, mask=mask)

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v) ** 2)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8, help="fake CPU devices (8)")
    parser.add_argument("--heads", type=int, default=2, help="attention heads (2)")
    parser.add_argument("--head-dim", type=int, default=16, help="attention head size (16)")
    args = parser.parse_args(argv)
    _setup(args.devices)
    import jax

    result = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "vocab_parallel": [
            vocab_parallel_case((8, 256), 256, 8192),
            vocab_parallel_case((8, 512), 256, 32768),
        ],
        "ring_attention": [],
    }
    ring = jax.device_count()
    for seq_len, impls in (
        (2048, "both"),
        (4096, "both"),
        (8192, "both"),
        (16384, "ring"),
        (32768, "ring"),
    ):
        row = {"seq_len": seq_len, "heads": args.heads, "head_dim": args.head_dim, "ring": ring}
        for impl in ("dense", "ring") if impls == "both" else ("ring",):
            print(f"compiling {impl} attention at T={seq_len}", file=sys.stderr)
            temp = attention_case(impl, seq_len, ring, args.heads, args.head_dim)
            row[f"{impl}_temp_bytes"] = temp
        result["ring_attention"].append(row)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
