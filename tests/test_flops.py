"""Parameter counts, training FLOPs, the peak table and the CPU probe cache."""

import json
import math

import jax
import pytest

from jaxllm import flops
from jaxllm.config import ModelConfig

GPT2 = ModelConfig(flavour="gpt2", vocab_size=100, d_model=16, n_layers=2, n_heads=2, max_len=32)
LLAMA = ModelConfig(
    flavour="llama", vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64
)


def _count(shapes):
    return sum(math.prod(s) for s in shapes.values())


def _gpt2_shapes(bias=True, tied=True):
    # d=16, H=2, Q=8, F=4*16=64, V=100, max_len=32; names follow the model's convention.
    shapes = {"token_embed/embedding": (100, 16), "pos_embed/embedding": (32, 16)}
    for i in range(2):
        layer = {
            "ln_1/scale": (16,),
            "ln_1/bias": (16,),
            "attn/query/kernel": (16, 2, 8),
            "attn/key/kernel": (16, 2, 8),
            "attn/value/kernel": (16, 2, 8),
            "attn/out/kernel": (2, 8, 16),
            "ln_2/scale": (16,),
            "ln_2/bias": (16,),
            "mlp/fc/kernel": (16, 64),
            "mlp/proj/kernel": (64, 16),
        }
        if bias:
            layer.update(
                {
                    "attn/query/bias": (2, 8),
                    "attn/key/bias": (2, 8),
                    "attn/value/bias": (2, 8),
                    "attn/out/bias": (16,),
                    "mlp/fc/bias": (64,),
                    "mlp/proj/bias": (16,),
                }
            )
        shapes.update({f"layer_{i}/{k}": v for k, v in layer.items()})
    shapes.update({"ln_f/scale": (16,), "ln_f/bias": (16,)})
    if not tied:
        shapes["lm_head/kernel"] = (16, 100)
    return shapes


def test_gpt2_param_counts():
    counts = flops.param_counts(GPT2)
    # Per layer: norms 4*16=64; attention 4*16*16=1024 + biases 16*3+16=64;
    # mlp 2*16*64=2048 + biases 64+16=80 -> 3280. Total 1600 + 512 + 2*3280 + 32.
    assert _count(_gpt2_shapes()) == 8704
    assert counts["per_layer"] == 3280
    assert counts["total"] == 8704
    assert counts["embedding"] == 1600
    assert counts["position_embedding"] == 512
    assert counts["lm_head"] == 0
    assert counts["non_embedding"] == 8704 - 1600 - 512
    # N: no positions, the tied embedding counted once as the vocabulary projection.
    assert counts["matmul"] == 8704 - 512


def test_gpt2_overrides_untied_no_bias():
    cfg = ModelConfig(**{**GPT2.__dict__, "use_bias": False, "tie_embeddings": False})
    counts = flops.param_counts(cfg)
    # Per layer 64 + 1024 + 2048 = 3136; total 1600 + 512 + 2*3136 + 32 + 1600 (head).
    assert _count(_gpt2_shapes(bias=False, tied=False)) == 10016
    assert counts["total"] == 10016
    assert counts["lm_head"] == 1600
    assert counts["non_embedding"] == 10016 - 1600 - 512 - 1600
    # The untied input embedding is a lookup; the head is the one vocabulary matmul.
    assert counts["matmul"] == 10016 - 512 - 1600


def test_llama_gqa_param_counts():
    # d=32, H=4, K=2 kv heads, Q=8, F = 64*ceil(int(8*32/3)/64) = 128, untied, no bias.
    assert LLAMA.ff_dim == 128
    shapes = {"token_embed/embedding": (100, 32)}
    for i in range(2):
        layer = {
            "attn_norm/scale": (32,),
            "attn/query/kernel": (32, 4, 8),
            "attn/key/kernel": (32, 2, 8),
            "attn/value/kernel": (32, 2, 8),
            "attn/out/kernel": (4, 8, 32),
            "mlp_norm/scale": (32,),
            "mlp/gate/kernel": (32, 128),
            "mlp/up/kernel": (32, 128),
            "mlp/down/kernel": (128, 32),
        }
        shapes.update({f"layer_{i}/{k}": v for k, v in layer.items()})
    shapes.update({"final_norm/scale": (32,), "lm_head/kernel": (32, 100)})
    # Per layer 32+1024+512+512+1024+32+3*4096 = 15424; total 3200 + 2*15424 + 32 + 3200.
    assert _count(shapes) == 37280
    counts = flops.param_counts(LLAMA)
    assert counts["per_layer"] == 15424
    assert counts["total"] == 37280
    assert counts["position_embedding"] == 0
    assert counts["lm_head"] == 3200
    assert counts["non_embedding"] == 37280 - 3200 - 3200
    assert counts["matmul"] == 37280 - 3200


def test_train_flops_per_token_hand_numbers():
    # GPT-2 tiny: N = 8192, L*H*Q*T = 2*2*8*32 = 1024.
    assert flops.train_flops_per_token(GPT2, 32) == 6 * 8192 + 6 * 1024
    assert flops.train_flops_per_token(GPT2, 32, causal=False) == 6 * 8192 + 12 * 1024


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_causal_attention_is_half(cfg):
    six_n = 6.0 * flops.param_counts(cfg)["matmul"]
    causal = flops.train_flops_per_token(cfg, 64) - six_n
    full = flops.train_flops_per_token(cfg, 64, causal=False) - six_n
    assert full > 0
    assert causal == full / 2


def test_peak_table():
    assert flops.PEAK_FLOPS["H100"]["bf16"] == 989e12
    assert flops.table_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert flops.table_peak("NVIDIA A100-SXM4-40GB", "bf16") == 312e12
    assert flops.table_peak("TPU v4", "bf16") == 275e12
    assert flops.table_peak("TPU v5 lite", "bf16") == 197e12
    assert flops.table_peak("TPU v5p", "bf16") == 459e12
    assert flops.table_peak("TPU v6 lite", "bf16") == 918e12
    assert flops.table_peak("cpu", "fp32") is None


def test_cpu_peak_is_probed_once_and_not_multiplied(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(flops, "_probe_cache", {})
    monkeypatch.setattr(flops, "_probe", lambda device, dtype: calls.append(dtype) or 5e10)
    cache = tmp_path / "peak.json"
    devices = jax.devices()
    assert devices[0].platform == "cpu"
    # However many fake CPU devices there are, they share one host: one probe figure.
    assert flops.peak_flops_per_second(devices, "fp32", str(cache)) == 5e10
    assert flops.peak_flops_per_second(devices[:1], "fp32", str(cache)) == 5e10
    assert calls == ["fp32"]
    # The figure was written to the JSON cache; a fresh process (empty in-process
    # cache) reads it instead of probing.
    assert list(json.loads(cache.read_text()).values()) == [5e10]
    monkeypatch.setattr(flops, "_probe_cache", {})
    assert flops.peak_flops_per_second(devices, "fp32", str(cache)) == 5e10
    assert calls == ["fp32"]


def test_mfu():
    assert flops.mfu(1000.0, 6e6, 1.2e10) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        flops.mfu(1000.0, 6e6, 0.0)
