"""Hugging Face <-> jaxllm conversion, checked against `transformers` itself.

Small random models are built locally with transformers on the CPU torch wheel and
saved as safetensors with a BPE tokenizer trained here; nothing is downloaded.
"""

import json
import os

import jax
import numpy as np
import pytest
import tokenizers
import torch  # the [hf] extra, which `make test` installs (CPU wheel, pinned)
import transformers

from jaxllm import sharding
from jaxllm.cli import main
from jaxllm.convert import hf
from jaxllm.convert.safetensors_io import SafetensorsReader
from jaxllm.data.hf_tokenizer import HFTokenizer
from jaxllm.decode import generate
from jaxllm.errors import UserError
from jaxllm.workdir import restore_params, workdir_config

VOCAB = 384
TEXT = [
    "The list type is a mutable sequence; tuples are immutable sequences.",
    "Dictionaries map hashable keys to arbitrary values, in insertion order.",
    "A generator function returns an iterator that yields values lazily.",
] * 20

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    ),
    "llama_gqa_llama3_rope": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "mistral_sliding_window": lambda: transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
        sliding_window=5, bos_token_id=1, eos_token_id=2, head_dim=16,
    ),
    "qwen2_biases_tied": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
    ),
}  # fmt: skip


def _tokenizer(folder: str) -> None:
    """A byte-level BPE trained on TEXT, saved as tokenizer.json + tokenizer_config.json."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(TEXT, trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
                   "bos_token": "<s>", "model_max_length": 64}, f)  # fmt: skip


def _hf_model(kind: str, folder: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]())
    model.eval()
    with torch.no_grad():  # random biases and norm scales, so a wrong mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    _tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind -> (torch model, HF folder, jaxllm workdir), converted through the CLI."""
    out = {}
    for kind in CONFIGS:
        root = tmp_path_factory.mktemp(kind)
        src, dst = str(root / "hf"), str(root / "jaxllm")
        model = _hf_model(kind, src)
        assert main(["convert", "hf-to-jaxllm", src, dst]) == 0
        out[kind] = (model, src, dst)
    return out


def _tokens(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, length)).astype(np.int32)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _jax_logits(workdir, tokens, overrides=()):
    cfg = workdir_config(workdir, list(overrides))
    session, params, _ = restore_params(workdir, cfg)
    return np.asarray(session.model.apply({"params": params}, tokens)), session, params


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_converted_logits_equal_transformers(converted, kind):
    model, _, dst = converted[kind]
    tokens = _tokens()
    ours, _, _ = _jax_logits(dst, tokens)
    theirs = _torch_logits(model, tokens)
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= 1e-4


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_export_back_loads_in_transformers_with_identical_logits(converted, kind, tmp_path):
    model, _, dst = converted[kind]
    back = str(tmp_path / "back")
    assert main(["convert", "jaxllm-to-hf", dst, back]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    assert type(reloaded) is type(model)
    tokens = _tokens(seed=1)
    np.testing.assert_array_equal(_torch_logits(reloaded, tokens), _torch_logits(model, tokens))
    fast = transformers.AutoTokenizer.from_pretrained(back)
    assert fast.encode("tuples are immutable", add_special_tokens=False) == HFTokenizer(
        os.path.join(back, "tokenizer.json")
    ).encode("tuples are immutable")


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa_llama3_rope", "mistral_sliding_window"])
def test_greedy_generation_matches_transformers_generate(converted, kind):
    model, _, dst = converted[kind]
    prompt = _tokens(batch=1, length=7, seed=2)
    cfg = workdir_config(dst, [])
    _, params, _ = restore_params(dst, cfg)
    ours = generate(cfg.model, params, prompt, max_new_tokens=12, strategy="greedy")
    with torch.no_grad():
        theirs = model.generate(
            torch.as_tensor(prompt, dtype=torch.long), max_new_tokens=12, do_sample=False,
            min_new_tokens=12, pad_token_id=0,
        )[:, prompt.shape[1] :].numpy()  # fmt: skip
    np.testing.assert_array_equal(ours, theirs)


def test_sharded_load_equals_single_device_load(converted):
    _, src, _ = converted["llama_gqa_llama3_rope"]
    tokens = _tokens(batch=4)
    cfg = workdir_config(converted["llama_gqa_llama3_rope"][2], ["mesh.data=2", "mesh.tensor=4"])
    abstract = hf.abstract_params(cfg, sharding.make_mesh(cfg.mesh))
    sharded = hf.load_hf_params(src, cfg, abstract)
    q = sharded["layer_0"]["attn"]["query"]["kernel"]
    assert len(q.sharding.device_set) == 8 and not q.is_fully_replicated
    one = jax.devices()[:1]
    cfg1 = workdir_config(converted["llama_gqa_llama3_rope"][2], ["mesh.data=1"])
    mesh1 = sharding.make_mesh(cfg1.mesh, one)
    single = hf.load_hf_params(src, cfg1, hf.abstract_params(cfg1, mesh1))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 sharded, single)  # fmt: skip
    _, session, _ = _jax_logits(converted["llama_gqa_llama3_rope"][2], tokens)
    sharded_logits = session.model.apply({"params": sharded}, tokens)
    single_logits = session.model.apply({"params": single}, tokens)
    np.testing.assert_allclose(np.asarray(sharded_logits), np.asarray(single_logits), atol=1e-5)


def test_import_reads_views_not_copies(converted):
    """Every parameter source is a view of the mapped file: nothing is read up front."""
    _, src, dst = converted["llama_gqa_llama3_rope"]
    cfg = workdir_config(dst, [])
    reader = SafetensorsReader(src)
    sources = hf._sources(cfg.model, reader)
    (mapped,) = reader._maps.values()
    assert sources and all(np.shares_memory(v, mapped) for v in sources.values())


def test_tokenizer_matches_transformers(converted):
    _, src, dst = converted["gpt2"]
    ours = HFTokenizer(os.path.join(dst, "tokenizer.json"))
    theirs = transformers.AutoTokenizer.from_pretrained(src)
    text = "Dictionaries map keys to values; généralement, ça marche. 3.14"
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == text
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)


def test_bad_inputs_fail_with_one_clear_line(tmp_path, capsys):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    assert main(["convert", "hf-to-jaxllm", str(pickled), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "pickled PyTorch weights" in err and "\n" not in err
    with pytest.raises(UserError, match="model_type 'bert' is not supported"):
        hf.model_config_from_hf({"model_type": "bert"})
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        hf.model_config_from_hf(
            {**CONFIGS["llama_gqa_llama3_rope"]().to_dict(),
             "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}
        )  # fmt: skip
    assert main(["convert", "hf-to-jaxllm", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "config.json" in capsys.readouterr().err


@pytest.mark.slow
def test_shipped_finetune_config_trains_lora_on_a_converted_checkpoint(converted, tmp_path):
    from jaxllm.config import load_config
    from jaxllm.train import host_params, train

    _, _, dst = converted["gpt2"]
    cfg = load_config(
        "configs/finetune_hf_cls.yaml",
        [f"init_from={dst}", "model.vocab_size=384", "model.d_model=64", "model.n_layers=2",
         "model.n_heads=4", "model.max_len=64", "data.seq_len=64", "train.steps=3",
         "train.batch_size=8", "train.eval_batches=1", "train.eval_every=0",
         "train.checkpoint_every=0", "train.progress_bar=false", "train.tensorboard=false"],
    )  # fmt: skip
    out = train(cfg, str(tmp_path / "ft"))
    params = host_params(out["state"])
    base = restore_params(dst, workdir_config(dst, []))[1]
    # LoRA: the converted backbone is untouched; adapters and the new head trained.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base)["layer_1"],
                 params["layer_1"])  # fmt: skip
    assert np.abs(params["lora"]["layer_1"]["attn"]["query"]["kernel"]["b"]).max() > 0
    assert np.isfinite(out["eval_loss"]) and 0.0 <= out["eval_accuracy"] <= 1.0


def test_foreign_sentencepiece_ids_are_kept(tmp_path):
    """A checkpoint's own SentencePiece model (Llama: unk 0, bos 1, eos 2, no pad)."""
    import sentencepiece as spm

    from jaxllm.data.tokenizer import load_tokenizer

    path = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_prefix=path, vocab_size=50, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    tok = load_tokenizer(path + ".model")
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2)
    sp = spm.SentencePieceProcessor(model_file=path + ".model")
    assert tok.encode("tuples are immutable") == sp.encode("tuples are immutable")
