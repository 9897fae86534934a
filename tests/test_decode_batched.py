"""Batched decoding of prompts of different lengths (left padding) and prefix-LM decoding.

Each padded batch must decode exactly as its rows do alone, unpadded; prefix-LM decoding
must match full (non-cached) forward passes with `prefix_mask` over the prompt. The
models are tiny and random (weights drawn with numpy onto the `init` shapes, as in
test_beam_search.py). Compiles dominate the run time, so every test uses the same
prompt shapes and `max_new_tokens` and the jitted programs are shared between tests.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.beam_search import beam_search
from jaxllm.config import ModelConfig
from jaxllm.decode import _generate, generate, prefill
from jaxllm.errors import UserError
from jaxllm.model import build_model

VOCAB = 17
FLAVOURS = {
    "gpt2": dict(flavour="gpt2"),
    # Local layers check that windows count true positions, not cache slots.
    "llama": dict(flavour="llama", n_kv_heads=2, attention="alternating", window=4),
}
LENGTHS = np.array([3, 7, 5])
P = int(LENGTHS.max())
NEW = 8  # max_new_tokens everywhere: it is static in `_generate`
FULL = 16  # length of the right-padded full-forward references (>= P + NEW)


@functools.lru_cache
def _setup(flavour, seed=1, std=0.3, scan=False):
    """A tiny random model and its params: norm scales 1, everything else N(0, std).

    With `scan`, the same model with scanned layers and the same weights, stacked.
    """
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_len=64, **FLAVOURS[flavour]
    )
    if scan:
        cfg, params = _setup(flavour, seed, std)
        layers = [params[f"layer_{i}"] for i in range(cfg.n_layers)]
        rest = {k: v for k, v in params.items() if not k.startswith("layer_")}
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        return ModelConfig(**{**cfg.__dict__, "scan_layers": True}), {**rest, "layers": stacked}
    shapes = jax.eval_shape(
        build_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)
    )
    rng = np.random.RandomState(seed)

    def draw(path, x):
        if path[-1].key == "scale":
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

    return cfg, jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def _prompts(seed=1):
    """A [3, P] left-padded batch (random pad tokens) and its rows, unpadded."""
    padded = np.random.RandomState(seed).randint(0, VOCAB, (len(LENGTHS), P)).astype(np.int32)
    rows = [padded[b, P - n :] for b, n in enumerate(LENGTHS)]
    return padded, rows


def _with_pad(padded, value):
    out = padded.copy()
    for b, n in enumerate(LENGTHS):
        out[b, : P - n] = value
    return out


@functools.partial(jax.jit, static_argnames="model")
def _forward(model, params, tokens, prefix_mask):
    return model.apply({"params": params}, tokens, prefix_mask=prefix_mask)


def _full_forward(cfg, params, seqs, n_prefix):
    """Full non-cached forward of each sequence with `prefix_mask` on its first n_prefix[b]
    tokens, as logits [B, len(seq), V] per row.

    The sequences are right-padded to FULL tokens so that one compile serves every
    length: a right pad is neither causally visible nor prefix, so no real token sees it.
    """
    tokens = np.zeros((len(seqs), FULL), np.int32)
    prefix = np.zeros((len(seqs), FULL), bool)
    for b, seq in enumerate(seqs):
        tokens[b, : len(seq)] = seq
        prefix[b, : n_prefix[b]] = True
    logits = np.asarray(_forward(build_model(cfg), params, jnp.asarray(tokens), prefix))
    return [logits[b, : len(seq)] for b, seq in enumerate(seqs)]


@functools.partial(jax.jit, static_argnames=("model", "cache_len"))
def _prefill(model, params, prompt, lengths, prefix_lm, *, cache_len):
    return prefill(model, params, prompt, cache_len, lengths, prefix_lm)[0]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_greedy_padded_batch_equals_rows_alone(flavour):
    cfg, params = _setup(flavour)
    padded, rows = _prompts()
    new = generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=LENGTHS)
    for b, row in enumerate(rows):
        alone = generate(cfg, params, row[None], max_new_tokens=NEW)[0]
        np.testing.assert_array_equal(new[b], alone, err_msg=f"row {b}")
    assert len(np.unique(new)) > 3  # a near-constant output would make the check weak
    # Pad values are never looked at, even ones outside the vocabulary.
    for value in (0, -1, 10**6):
        np.testing.assert_array_equal(
            generate(
                cfg, params, _with_pad(padded, value), max_new_tokens=NEW, prompt_lengths=LENGTHS
            ),
            new,
        )
    # Explicit full lengths are the old, unpadded behaviour.
    np.testing.assert_array_equal(
        generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=[P] * 3),
        generate(cfg, params, padded, max_new_tokens=NEW),
    )

    # EOS: one that row 0 first emits mid-way; rows stop (and repeat it) independently.
    j = next(j for j in range(1, NEW) if new[0, j] not in new[0, :j])
    eos = int(new[0, j])
    ended = generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=LENGTHS, eos_id=eos)
    np.testing.assert_array_equal(ended[0], [*new[0, :j]] + [eos] * (NEW - j))
    for b, row in enumerate(rows):
        alone = generate(cfg, params, row[None], max_new_tokens=NEW, eos_id=eos)[0]
        np.testing.assert_array_equal(ended[b], alone, err_msg=f"row {b}")
        stop = list(new[b]).index(eos) if eos in new[b] else NEW
        np.testing.assert_array_equal(alone, [*new[b, :stop]] + [eos] * (NEW - stop))


def test_lengths_and_prefix_flag_do_not_recompile():
    cfg, params = _setup("gpt2")  # the shapes of the test above
    padded, _ = _prompts()
    generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=LENGTHS)
    compiled = _generate._cache_size()
    generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=[1, 2, 7], prefix_lm=True)
    generate(cfg, params, padded, max_new_tokens=NEW)
    assert _generate._cache_size() == compiled


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_prefix_lm_prefill_equals_full_forward(flavour):
    cfg, params = _setup(flavour)
    padded, rows = _prompts()
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    model = build_model(cfg, decode=True)
    logits = {
        flag: np.asarray(
            _prefill(model, params, jnp.asarray(padded), lengths, jnp.bool_(flag), cache_len=64)
        )
        for flag in (True, False)
    }
    bidir = _full_forward(cfg, params, rows, LENGTHS)
    causal = _full_forward(cfg, params, rows, [0] * 3)
    for b, n in enumerate(LENGTHS):
        # Every real prompt position, the last (which picks the first new token) included.
        np.testing.assert_allclose(logits[True][b, P - n :], bidir[b], atol=1e-5)
        np.testing.assert_allclose(logits[False][b, P - n :], causal[b], atol=1e-5)
        # The flag really changes what the prompt sees.
        assert np.abs(logits[True][b, -1] - logits[False][b, -1]).max() > 1e-3


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_prefix_lm_greedy_equals_repeated_full_forwards(flavour):
    cfg, params = _setup(flavour)
    padded, rows = _prompts()
    new = generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=LENGTHS, prefix_lm=True)
    seqs = [list(row) for row in rows]
    for _ in range(NEW):
        # Recomputed from scratch each step; the prefix covers the prompt only, the
        # generated tokens are causal targets as in prefix-LM training.
        logits = _full_forward(cfg, params, seqs, LENGTHS)
        for seq, row_logits in zip(seqs, logits, strict=True):
            seq.append(int(row_logits[-1].argmax()))
    want = np.array([seq[n:] for seq, n in zip(seqs, LENGTHS, strict=True)])
    np.testing.assert_array_equal(new, want)
    assert len(np.unique(new)) > 3
    causal = generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=LENGTHS)
    assert (new != causal).any()  # with these weights the flag changes some token


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_padded_prefix_lm_equals_rows_alone(flavour):
    cfg, params = _setup(flavour)
    padded, rows = _prompts(seed=3)
    kw = dict(max_new_tokens=NEW, prefix_lm=True)
    new = generate(cfg, params, padded, prompt_lengths=LENGTHS, **kw)
    for b, row in enumerate(rows):
        np.testing.assert_array_equal(new[b], generate(cfg, params, row[None], **kw)[0])


def _beam_rows_check(cfg, params, padded, rows, *, reference=None, **kw):
    """Beam search of the padded batch vs each row alone (or vs `reference` params' rows,
    the same model unscanned). Returns the batch's tokens."""
    ref_cfg, ref_params = reference or (cfg, params)
    tokens, scores = beam_search(cfg, params, padded, prompt_lengths=LENGTHS, **kw)
    for b, row in enumerate(rows):
        # The row's full length, given explicitly, picks the same compiled program as the
        # padded batch (plain calls share the one of test_beam_search.py instead).
        row_tokens, row_scores = beam_search(
            ref_cfg, ref_params, row[None], prompt_lengths=[len(row)], **kw
        )
        np.testing.assert_array_equal(tokens[b], row_tokens[0], err_msg=f"row {b} {kw}")
        np.testing.assert_allclose(scores[b], row_scores[0], atol=1e-5)
    return tokens


def test_beam_padded_batch_equals_rows_alone():
    cfg, params = _setup("llama")
    padded, rows = _prompts(seed=2)
    greedy = generate(cfg, params, padded, max_new_tokens=NEW, prompt_lengths=LENGTHS)
    eos = int(greedy[1, 2])  # an EOS some row is likely to reach early
    kw = dict(max_new_tokens=NEW, beam_size=3, length_penalty=0.6)
    for prefix_lm in (False, True):
        for eos_id in (-1, eos):
            tokens = _beam_rows_check(
                cfg, params, padded, rows, eos_id=eos_id, prefix_lm=prefix_lm, **kw
            )
            if eos_id == eos and not prefix_lm:
                assert (tokens[:, :-1] == eos).any(), "no row ended early; pick another EOS"
    # Through generate(strategy="beam") as well.
    np.testing.assert_array_equal(
        generate(cfg, params, padded, strategy="beam", prompt_lengths=LENGTHS, eos_id=eos, **kw),
        beam_search(cfg, params, padded, prompt_lengths=LENGTHS, eos_id=eos, **kw)[0],
    )


def test_scan_layers_padded_equals_rows_alone():
    """Scanned caches lead with a layers axis (beam reordering works on axis 1)."""
    cfg, params = _setup("llama", scan=True)
    unscanned = _setup("llama")
    padded, rows = _prompts(seed=2)
    for prefix_lm in (False, True):
        new = generate(
            cfg, params, padded, max_new_tokens=NEW, prompt_lengths=LENGTHS, prefix_lm=prefix_lm
        )
        for b, row in enumerate(rows):
            alone = generate(*unscanned, row[None], max_new_tokens=NEW, prefix_lm=prefix_lm)
            np.testing.assert_array_equal(new[b], alone[0], err_msg=f"row {b} {prefix_lm=}")
    eos = int(new[1, 2])
    kw = dict(max_new_tokens=NEW, beam_size=3, length_penalty=0.6, eos_id=eos)
    _beam_rows_check(cfg, params, padded, rows, reference=unscanned, **kw)


def test_prompt_length_errors():
    cfg, params = _setup("gpt2")
    padded, _ = _prompts()
    for bad in ([3, 7], [0, 7, 5], [3, 8, 5], [[3, 7, 5]], [3.0, 7.0, 5.0]):
        with pytest.raises(UserError, match="prompt_lengths"):
            generate(cfg, params, padded, max_new_tokens=4, prompt_lengths=bad)
        with pytest.raises(UserError, match="prompt_lengths"):
            beam_search(cfg, params, padded, max_new_tokens=4, prompt_lengths=bad)
