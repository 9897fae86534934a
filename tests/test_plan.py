"""`jaxllm plan`: AOT compilation of the real train step for TPU slices and the CPU.

TPU plans compile against libtpu's description of a slice (no TPU needed); the
numbers are checked against what the config implies (parameter counts, Adam state
per chip, the analytic 6N+attention FLOPs).
"""

import json
import re

import pytest

from jaxllm import flops, plan
from jaxllm.cli import main
from jaxllm.config import load_config
from jaxllm.errors import UserError

GIB = 1024**3


def test_topology_table_follows_google_naming():
    # v4/v5p names count TensorCores (2 per chip); v5e/v6e names count chips.
    assert plan.get_topology("v4-8").chips == 4
    assert plan.get_topology("v5p-128").chips == 64
    assert plan.get_topology("v5p-128").hosts == 16
    v5e = plan.get_topology("v5e-8")
    assert (v5e.chips, v5e.hosts, v5e.topology) == (8, 1, "v5e:2x4")
    assert v5e.hbm_bytes == 16 * GIB and v5e.peak_flops == 197e12
    assert plan.get_topology("v5e-16").hosts == 4
    assert plan.get_topology("v6e-256").chips == 256
    assert plan.get_topology("v6e-256").peak_flops == 918e12


def test_unknown_topology_lists_the_valid_names(capsys):
    with pytest.raises(UserError, match=r"unknown topology 'v5e-7'; valid names: .*v5e-8.*cpu"):
        plan.get_topology("v5e-7")
    assert main(["plan", "configs/lm_tiny.yaml", "--topology", "tpu-9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxllm: error: unknown topology 'tpu-9'") and "v5p-128" in err


@pytest.mark.slow
def test_cpu_plan_of_lm_tiny_through_the_cli(capsys, tmp_path):
    out = tmp_path / "plan.json"
    # Two layers instead of four: the same program, half the compile time.
    argv = ["plan", "configs/lm_tiny.yaml", "model.n_layers=2", "--topology", "cpu", "--json"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == report
    cfg = load_config("configs/lm_tiny.yaml", ["model.n_layers=2"])
    assert report["parameters"] == flops.param_counts(cfg.model)["total"]
    assert report["parameter_bytes"] == 4 * report["parameters"]  # fp32 params
    assert report["chips"] == 8 and report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    mem = report["memory_per_chip_bytes"]
    # Pure data parallelism: every device holds the parameters and both Adam moments.
    assert mem["arguments"] >= 3 * report["parameter_bytes"]
    assert mem["aliased"] >= 3 * report["parameter_bytes"]  # the donated state
    assert mem["total"] > mem["arguments"] and report["fits"]
    analytic = flops.train_flops_per_token(cfg.model, 128) * 16 * 128
    assert report["flops_per_step_analytic"] == pytest.approx(analytic)
    # XLA counts every op, not just matmuls: a little more than 6N + attention.
    ratio = report["flops_per_step_cost_model"] / analytic
    assert 0.9 < ratio < 1.5, ratio


def test_candidate_fixes_are_the_ones_the_config_does_not_use():
    cfg = load_config("configs/lm_tiny.yaml", ["train.batch_size=32"])
    assert plan.candidate_fixes(cfg, 8) == [
        ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"],
        ["model.remat=full"],
        ["train.grad_accum=4"],
        ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1", "model.remat=full", "train.grad_accum=4"],
    ]
    fsdp_full = load_config("configs/gpt2_124m.yaml", ["model.remat=full", "train.grad_accum=128"])
    assert plan.candidate_fixes(fsdp_full, 8) == [["train.grad_accum=512"]]


# ~1.2B fp32 parameters with Adam: ~14 GiB of state per chip when replicated (lm_tiny's
# mesh is data=-1), ~2 GiB with FSDP over the 8 chips. Scanned layers and full remat
# keep the compiles short; grad_accum=4 would leave 2 rows for 8 shards (not checked).
BIG = ["model.d_model=4096", "model.n_heads=32", "model.n_layers=6", "model.scan_layers=true",
       "model.remat=full", "train.batch_size=8"]  # fmt: skip


@pytest.mark.slow
def test_a_step_that_cannot_fit_fails_naming_the_fix_that_fits(capsys, tmp_path):
    out = tmp_path / "plan.json"
    argv = ["plan", "configs/lm_tiny.yaml", *BIG, "--topology", "v5e-8", "--out", str(out)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("jaxllm: error: ")
    assert "train step on v5e-8" in err and "GiB per chip" in err and "16.00 GiB" in err
    assert "fits with: mesh.data=1 mesh.fsdp=-1 mesh.tensor=1" in err
    assert re.search(r"^fits\s+NO$", captured.out, re.M)  # the table came first
    report = json.loads(out.read_text())
    n = report["parameters"]
    assert n > 1.2e9 and not report["fits"]
    # Replicated state: params + two Adam moments in fp32 on every chip.
    assert report["memory_per_chip_bytes"]["arguments"] >= 12 * n
    (fix,) = report["fixes"]
    assert fix["fits"] and fix["total_bytes"] < 12 * n / 8 + 4 * GIB


@pytest.mark.slow
def test_gpt2_124m_on_v5e_8_gives_sane_numbers():
    cfg = load_config("configs/gpt2_124m.yaml", [])  # as shipped: grad_accum 8
    report = plan.plan(cfg, "v5e-8", check_fixes=False)
    n = flops.param_counts(cfg.model)["total"]
    assert report["parameters"] == n and 124e6 < n < 125e6
    assert report["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    mem = report["memory_per_chip_bytes"]
    # FSDP: each chip holds about an eighth of fp32 params + 2 Adam moments (12 B/param).
    assert 12 * n / 8 <= mem["arguments"] < 12 * n / 8 + 0.1 * GIB
    assert mem["total"] > report["parameter_bytes"]
    assert report["fits"] and report["memory_used_fraction"] < 1
    assert report["flops_per_step_cost_model"] > 0
    # The step-time estimate: scanned layers and 8 micro-batches, so extrapolated from 1
    # and 2 unrolled layers; a second layer costs time, and no estimate beats the peak.
    est = report["step_estimate"]
    assert est["reason"] is None and 0 < est["seconds_1_layer"] < est["seconds_2_layers"]
    seconds = report["step_seconds_cost_model"]
    assert seconds == pytest.approx(8 * (est["seconds_1_layer"] + 11 * (
        est["seconds_2_layers"] - est["seconds_1_layer"])))  # fmt: skip
    mfu = report["implied_mfu_cost_model"]
    assert mfu == pytest.approx(
        report["flops_per_step_analytic"] / (8 * report["peak_flops_per_chip"] * seconds)
    )
    assert 0 < mfu < 1
