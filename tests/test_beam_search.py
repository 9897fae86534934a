"""Beam search on the KV cache against greedy decoding and exhaustive full-forward search.

The models are tiny and random (vocab 11-13, weights scaled up so that next-token
distributions are peaked); tests share model shapes so that compiles are reused.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.beam_search import _beam_search, beam_search, length_penalty_factor
from jaxllm.config import ModelConfig
from jaxllm.decode import generate
from jaxllm.errors import UserError
from jaxllm.model import build_model

FLAVOURS = {
    "gpt2": dict(flavour="gpt2"),
    "llama_gqa_scan": dict(flavour="llama", n_kv_heads=2, scan_layers=True),
}


@functools.lru_cache
def _setup(flavour, vocab, seed=0, std=0.1):
    """A tiny random model and its params: norm scales 1, everything else N(0, std).

    Params are drawn with numpy onto the `init` shapes: compiling `init` takes seconds.
    """
    cfg = ModelConfig(
        vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, max_len=64, **FLAVOURS[flavour]
    )
    shapes = jax.eval_shape(
        build_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)
    )
    rng = np.random.RandomState(seed)

    def draw(path, x):
        if path[-1].key == "scale":
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, std, x.shape), x.dtype)

    return cfg, jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


@functools.partial(jax.jit, static_argnames="model")
def _forward(model, params, tokens):
    return model.apply({"params": params}, tokens)


def _cont_logprobs(cfg, params, prompts, conts):
    """Per-token log-probabilities [N, n] of continuations conts [N, n] after prompts [N, T],
    from the full (non-cached) forward pass, in float64."""
    t, n = prompts.shape[1], conts.shape[1]
    seqs = jnp.asarray(np.concatenate([prompts, conts], axis=1))
    logits = np.asarray(_forward(build_model(cfg), params, seqs), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.take_along_axis(logp[:, t - 1 : t - 1 + n], conts[:, :, None], axis=2)[..., 0]


def _score(tok_logp, conts, eos, alpha):
    """GNMT score: the log-prob up to and including the first EOS / ((5 + len) / 6)^alpha."""
    n = conts.shape[1]
    is_eos = conts == eos
    length = np.where(is_eos.any(1), is_eos.argmax(1) + 1, n)
    total = np.where(np.arange(n) < length[:, None], tok_logp, 0.0).sum(1)
    return total / ((5.0 + length) / 6.0) ** alpha


def _canonical(conts, eos):
    """EOS-pads every continuation after its first EOS."""
    after = np.cumsum(conts == eos, axis=1) - (conts == eos) > 0
    return np.where(after, eos, conts)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_beam_size_one_equals_greedy(flavour):
    cfg, params = _setup(flavour, vocab=13)
    prompt = np.random.RandomState(1).randint(0, 13, (3, 5))
    greedy = generate(cfg, params, prompt, max_new_tokens=12)
    assert len(np.unique(greedy)) > 2  # a constant output would make the check weak
    tokens, _ = beam_search(cfg, params, prompt, max_new_tokens=12, beam_size=1)
    np.testing.assert_array_equal(tokens, greedy)
    # With an EOS that row 0 emits mid-way: greedy stops there and so does beam 1 (alpha=0).
    j = next(j for j in range(1, 12) if greedy[0, j] not in greedy[0, :j])
    eos = int(greedy[0, j])
    greedy = generate(cfg, params, prompt, max_new_tokens=12, eos_id=eos)
    assert (greedy[0, j:] == eos).all() and (greedy[0, :j] != eos).all()
    tokens = generate(
        cfg,
        params,
        prompt,
        max_new_tokens=12,
        strategy="beam",
        beam_size=1,
        length_penalty=0.0,
        eos_id=eos,
    )
    np.testing.assert_array_equal(tokens, greedy)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_wide_beam_finds_the_exhaustive_best(flavour):
    vocab, n, rows = 11, 3, 2
    cfg, params = _setup(flavour, vocab=vocab, seed=1)
    prompt = np.random.RandomState(3).randint(0, vocab, (rows, 4))
    conts = np.array(list(itertools.product(range(vocab), repeat=n)), np.int32)  # all V^3
    tok_logp = _cont_logprobs(
        cfg, params, np.repeat(prompt, len(conts), axis=0), np.tile(conts, (rows, 1))
    ).reshape(rows, len(conts), n)
    eos_row0 = int(tok_logp[0, :, 0].argmax() // vocab**2)  # row 0's likeliest first token
    for eos, alpha in [(-1, 0.0), (eos_row0, 0.0), (eos_row0, 1.0), ((eos_row0 + 1) % vocab, 0.6)]:
        tokens, scores = beam_search(
            cfg,
            params,
            prompt,
            max_new_tokens=n,
            beam_size=vocab**2,  # every prefix stays alive: the search is exact
            length_penalty=alpha,
            eos_id=eos,
        )
        hyps = _canonical(conts, eos)  # the hypothesis each continuation stands for
        index = {}
        for b in range(rows):
            full = _score(tok_logp[b], conts, eos, alpha)
            best = hyps[full.argmax()]
            others = full[(hyps != best).any(1)]
            assert full.max() - others.max() > 1e-3, "near tie: the check would be weak"
            np.testing.assert_array_equal(tokens[b], best, err_msg=f"{eos=} {alpha=}")
            # The returned score is the full forward's penalised log-prob of the sequence.
            index[b] = int((tokens[b] % vocab) @ vocab ** np.arange(n - 1, -1, -1))
            np.testing.assert_allclose(scores[b], full[index[b]], atol=1e-4)
        if eos == eos_row0 and alpha == 0.0:
            # A longer hypothesis has log-prob <= its first token's <= p(eos): row 0 stops
            # at once and is EOS-padded.
            np.testing.assert_array_equal(tokens[0], [eos] * n)
        if alpha and eos in tokens[0]:  # the GNMT penalty as documented
            length = list(tokens[0]).index(eos) + 1
            raw = _score(tok_logp[0, index[0]][None], tokens[:1], eos, 0.0)[0]
            penalty = ((5 + length) / 6) ** alpha
            np.testing.assert_allclose(scores[0], raw / penalty, atol=1e-4)
            np.testing.assert_allclose(length_penalty_factor(length, alpha), penalty, rtol=1e-6)


def test_batched_rows_equal_unbatched_runs_and_eos_padding():
    cfg, params = _setup("llama_gqa_scan", vocab=13)  # as above: shared compiles
    prompt = np.random.RandomState(1).randint(0, 13, (3, 5))
    greedy = generate(cfg, params, prompt, max_new_tokens=12)
    eos = int(greedy[1, 2])  # an EOS some row is likely to reach early
    kw = dict(max_new_tokens=12, beam_size=4, length_penalty=0.6, eos_id=eos)
    tokens, scores = beam_search(cfg, params, prompt, **kw)
    for b in range(len(prompt)):
        row_tokens, row_scores = beam_search(cfg, params, prompt[b : b + 1], **kw)
        np.testing.assert_array_equal(row_tokens[0], tokens[b])
        np.testing.assert_allclose(row_scores[0], scores[b], atol=1e-5)
    ended = [b for b in range(len(prompt)) if (tokens[b, :-1] == eos).any()]
    assert ended, "no row ended early; pick another EOS"
    for b in ended:  # EOS-padded after the first EOS
        assert (tokens[b, list(tokens[b]).index(eos) :] == eos).all()
    full = _score(_cont_logprobs(cfg, params, prompt, tokens), tokens, eos, 0.6)
    np.testing.assert_allclose(scores, full, atol=1e-4)


def test_one_compile_per_bucket_and_early_stop():
    cfg, params = _setup("llama_gqa_scan", vocab=13)  # the shapes used above
    prompt = np.random.RandomState(1).randint(0, 13, (3, 5))
    model = build_model(cfg, decode=True)

    def run(max_new, eos, alpha, prompt=prompt):
        tokens, _, steps = _beam_search(
            model,
            params,
            jnp.asarray(prompt, jnp.int32),
            jnp.int32(max_new),
            jnp.int32(eos),
            jnp.float32(alpha),
            cache_len=64,
            beam_size=4,
        )
        return np.asarray(tokens), int(steps)

    assert run(9, -1, 0.6)[1] == 9  # no EOS: every step runs
    compiled = _beam_search._cache_size()
    first = np.asarray(_forward(build_model(cfg), params, jnp.asarray(prompt)))[:, -1]
    eos = int(first[0].argmax())
    # When every row's best is [eos] (alpha=0), no live beam can beat it: stop after step 1.
    tokens, steps = run(20, eos, 0.0, prompt=np.stack([prompt[0]] * 3))
    assert steps == 1 and (tokens[:, :20] == eos).all()
    tokens, steps = run(20, eos, 0.0)
    assert (tokens[0, :20] == eos).all() and steps > 1  # the other rows go on
    run(30, 5, 1.0)
    # Through the public API too: other lengths in the same bucket do not recompile.
    beam_search(cfg, params, prompt, max_new_tokens=7, beam_size=4, eos_id=2)
    assert _beam_search._cache_size() == compiled  # max_new, EOS and alpha are traced


def test_user_errors():
    cfg, params = _setup("gpt2", vocab=13)
    prompt = np.zeros((1, 4), np.int32)
    with pytest.raises(UserError, match="beam_size"):
        beam_search(cfg, params, prompt, beam_size=0)
    with pytest.raises(UserError, match="max_len"):
        generate(cfg, params, prompt, strategy="beam", max_new_tokens=100)
