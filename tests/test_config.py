"""Config parsing: YAML + overrides, types, close-match errors, round trip, mesh shapes."""

import pytest

from jaxllm.config import load_config, save_config
from jaxllm.errors import UserError
from jaxllm.sharding import mesh_shape


def test_overrides_types_and_round_trip(tmp_path):
    cfg = load_config(
        "configs/lm_tiny.yaml",
        [
            "optim.lr=2e-4",
            "train.steps=7",
            "model.tie_embeddings=false",
            "optim.factors=[1, 0.5]",
            "optim.boundaries=[3, 5]",
            "mesh.rules.heads=null",
        ],
    )
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7 and cfg.model.tie_embeddings is False and not cfg.model.tied
    assert cfg.optim.factors == [1.0, 0.5] and cfg.mesh.rules["heads"] is None
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg
    # An int is accepted where a float is wanted; YAML spells 3e-4 as a string, also handled.
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0


def test_flavour_defaults():
    gpt2 = load_config(None, ["model.flavour=gpt2", "model.d_model=64"]).model
    llama = load_config(
        None, ["model.flavour=llama", "model.d_model=64", "model.n_kv_heads=2"]
    ).model
    assert gpt2.tied and gpt2.bias and gpt2.ff_dim == 256
    assert not llama.tied and not llama.bias and llama.kv_heads == 2
    assert llama.ff_dim == 192  # 8/3 * 64 = 170.7, rounded up to a multiple of 64


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stpes=3"], "unknown config key 'train.stpes'; did you mean steps"),
        (["zzz=3"], "unknown config key 'zzz'; valid keys: task, precision"),
        (["train.steps=3.5"], "'train.steps' must be int, got 3.5"),
        (["train.steps=true"], "'train.steps' must be int, got True"),
        (["model.flavour=bert"], "allowed values: gpt2, llama"),
        (["train.steps=0"], "'train.steps' must be > 0"),
        (["train.batch_size=10", "train.grad_accum=4"], "not divisible by train.grad_accum=4"),
        (["model.n_kv_heads=4"], "not divisible by model.n_kv_heads=4"),
        (["data.seq_len=4096"], "exceeds model.max_len"),
        (["mesh.rules.embed=model"], "names mesh axis 'model'; allowed: data, fsdp, tensor"),
        (["mesh.rules.hidden=fsdp"], "unknown config key 'mesh.rules.hidden'"),
        (["optim.boundaries=[1]"], "same length"),
        (["train.steps.x=1"], "has no sub-key"),
    ],
)
def test_bad_values_name_key_and_fix(overrides, message):
    with pytest.raises(UserError) as err:
        load_config("configs/lm_tiny.yaml", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_mesh_shape_resolves_the_rest_and_rejects_mismatch():
    cfg = load_config(None, ["mesh.data=-1", "mesh.fsdp=2", "mesh.tensor=2"]).mesh
    assert mesh_shape(cfg, 8) == (2, 2, 2)
    with pytest.raises(UserError, match="does not divide 6 devices"):
        mesh_shape(load_config(None, ["mesh.fsdp=4"]).mesh, 6)
    with pytest.raises(UserError, match="only one of"):
        mesh_shape(load_config(None, ["mesh.fsdp=-1"]).mesh, 8)


def test_shipped_configs_load():
    for name in ("lm_tiny", "gpt2_124m", "llama_1b"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.train.steps > 0
    assert load_config("configs/cls_chatter_topic_dp.yaml").privacy.target_epsilon == 8.0
    assert load_config("configs/cls_chatter_topic_adv.yaml").adversarial.method == "fgm"
    assert load_config("configs/finetune_hf_cls.yaml").finetune.mode == "lora"
