"""Smoke runs of the benchmark scripts: they start, finish and print well-formed JSON.

Each script runs as a subprocess in its ``--quick`` mode (seconds, tiny sizes). No
timing is asserted, only that every figure is present and positive and that the
cross-checks the scripts report hold.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_benchmark(name: str, *args: str) -> dict:
    """Runs ``jaxllm bench <name>`` with `args` on one CPU device; returns its JSON."""
    env = dict(os.environ)
    # conftest.py asks for 8 fake CPU devices; a benchmark measures one real device.
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(
        f for f in flags if not f.startswith("--xla_force_host_platform_device_count")
    )
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", "bench", name, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # stdout is the JSON object alone; progress is on stderr


@pytest.mark.slow
def test_decode_throughput_quick():
    out = _run_benchmark("decode", "--quick")
    assert out["jax_devices"] == ["cpu:0"]
    assert out["machine"]["cores"] >= 1 and out["machine"]["cpu"]
    assert len(out["machine"]["load_average_start"]) == 3
    assert {"jax", "torch", "transformers"} <= set(out["versions"])
    decode = out["decode"]
    assert (decode["new_tokens"], decode["batches"], decode["repeats"]) == (8, [1, 2], 1)
    assert list(out["configs"]) == ["tiny"]

    tiny = out["configs"]["tiny"]
    assert tiny["model"]["d_model"] == 192 and tiny["model"]["vocab_size"] == 4096
    params = tiny["params"]
    # configs/lm_tiny.yaml: 4 layers of 12*192^2 + 13*192, embeddings 4096*192 + 256*192,
    # final LayerNorm 2*192.
    assert params["jaxllm_state_total"] == params["hf_total"] == 2_615_424
    assert params["equal"] is True
    # Same weights on both sides: greedy decoding agrees token for token.
    assert tiny["greedy_tokens_match"] is True
    assert tiny["greedy_tokens_match_batch"] == 1

    assert set(tiny["batches"]) == {"1", "2"}
    for batch, res in tiny["batches"].items():
        assert res["tokens_per_window"] == int(batch) * 8
        for side in ("jaxllm", "hf"):
            assert res[side]["tokens_per_s_median"] > 0
            assert len(res[side]["tokens_per_s_windows"]) == 1
        assert res["jaxllm"]["compile_and_first_call_s"] > 0
        assert res["ratio_jaxllm_over_hf"] > 0
        assert res["greedy_check"]["match"] is True
        assert res["greedy_check"]["fraction_equal"] == 1.0


def _decode_module():
    """benchmarks/decode_throughput.py imported in-process (benchmarks/ is no package)."""
    import importlib

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        return importlib.import_module("decode_throughput")
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))


def test_decode_compare_reports_first_differing_step():
    bench = _decode_module()
    ours = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    theirs = np.array([[5, 6, 7, 8], [1, 2, 9, 9]])
    assert bench.compare(ours, ours) == {
        "match": True,
        "fraction_equal": 1.0,
        "first_differing_step": None,
    }
    assert bench.compare(ours, theirs) == {
        "match": False,
        "fraction_equal": 0.75,
        "first_differing_step": 2,
    }


def test_decode_args_defaults_and_quick():
    bench = _decode_module()
    args = bench.parse_args([])
    assert (args.configs, args.batches) == (["tiny", "gpt15m"], [1, 16])
    assert (args.prompt_len, args.new_tokens, args.repeats) == (16, 64, 5)
    quick = bench.parse_args(["--quick", "--batches", "4,8"])
    assert (quick.configs, quick.batches, quick.new_tokens, quick.repeats) == (
        ["tiny"],
        [1, 2],
        8,
        1,
    )
    # Throughput of 3 windows of 128 tokens at 1, 2 and 4 s: median 64 tokens/s.
    assert bench.summarize([1.0, 2.0, 4.0], 128) == {
        "tokens_per_s_median": 64.0,
        "tokens_per_s_windows": [128.0, 64.0, 32.0],
    }


def test_decode_args_reject_unknown_config_and_zero_batch():
    bench = _decode_module()
    for bad in (["--configs", "gpt3"], ["--batches", "1,0"], ["--new-tokens", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_bench_rejects_unknown_names_and_lists_the_benchmarks():
    proc = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", "bench", "nope"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr and "'decode'" in proc.stderr
    from jaxllm.bench import BENCHMARKS, benchmarks_dir

    # Every listed benchmark is a script of this checkout.
    for script, _ in BENCHMARKS.values():
        assert os.path.isfile(os.path.join(benchmarks_dir(), script)), script


@pytest.mark.slow
def test_int8_gemm_probe_reports_both_dtypes():
    out = _run_benchmark("int8", "--gemm-only", "--batch", "2", "--length", "32")
    assert set(out["cpu_isa"]) >= {"avx2", "avx512_vnni", "avx_vnni"}
    shapes = [row["m_k_n"] for row in out["gemm"]]
    assert shapes == [[2048, 2048, 2048], [64, 192, 768], [64, 768, 192]]
    for row in out["gemm"]:
        assert row["fp32_gflops"] > 0 and row["int8_gops"] > 0
        assert row["int8_over_fp32"] == pytest.approx(
            row["int8_gops"] / row["fp32_gflops"], rel=0.05
        )
