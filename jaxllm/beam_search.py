"""Batched beam search on the KV cache, with a length penalty, EOS handling and early stop.

Algorithm (the t5x / GNMT formulation):

- The prompt is prefilled once per row ([B, T]); the cache is then repeated along its
  batch axis to [B*K, ...] (K = `beam_size`). Only beam 0 starts live, so the first
  step does not produce K copies of the same hypothesis.
- Each step feeds the K live beams' last tokens, takes the log-softmax, adds it to the
  beams' log-probabilities and keeps the top 2K of the K*V candidates. The best K that do
  not end in EOS stay live: their parents' caches are gathered (every cache leaf is
  reordered along its batch axis except `cache_index`, a scalar per layer).
- Candidates that end in EOS and rank among the top K (Hugging Face's rule; at the last
  step, every candidate) are *finished*: they enter a per-row pool of the K best finished
  hypotheses with their length-penalised score, keep that score and never grow again
  (their sequence is EOS-padded after the EOS, which is the same as only ever extending
  them with EOS at no cost). The top-K rule makes beam_size=1 exactly greedy decoding.
- Length penalty (GNMT, Wu et al. 2016, as t5x `brevity_penalty`):
  `score = log p(y) / ((5 + |y|) / 6) ** alpha`, where |y| counts the generated tokens
  including the EOS. alpha = 0 ranks by raw log-probability.
- Early stop: the loop ends for the whole batch once, in every row, the best finished
  score is >= the best score any live beam could still reach. A live beam's log-prob can
  only fall, so that bound is `live_logp / max(lp(next length), lp(max_new_tokens))`.
  Because only the best hypothesis is returned, this stop never changes the result.

One jit compile per (batch, prompt length, cache bucket, beam size): `max_new_tokens`,
`eos_id` and `length_penalty` are traced, and the token buffer spans the whole cache
bucket (rounded up with `decode.BUCKET`), sliced to `max_new_tokens` on the host.
Prompts of different lengths (left-padded, `prompt_lengths`) and prefix-LM prompts
(`prefix_lm`) work as in `jaxllm.decode.generate`; both are traced too, though a call
that uses either compiles once apart from plain calls, which do not pass them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.decode import check_lengths, check_prompt, prefill
from jaxllm.errors import UserError
from jaxllm.model import build_model


def length_penalty_factor(length: Any, alpha: Any) -> Any:
    """GNMT length penalty ((5 + length) / 6) ** alpha; a hypothesis' score is logp / this."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _map_cache(fn, cache):
    """Applies `fn` to every cache leaf with a batch axis (all but `cache_index`)."""

    def leaf(path, x):
        return x if getattr(path[-1], "key", None) == "cache_index" else fn(x)

    return jax.tree_util.tree_map_with_path(leaf, cache)


def _take(x, idx):
    """x[b, idx[b, j], ...] for x [B, N, ...] and idx [B, M]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def _step(state, logprobs, i, max_new_tokens, eos_id, alpha):
    """One beam step: extend the live beams by `logprobs` [B, K, V] at token index i.

    Returns the new state and, for each new live beam, its parent beam [B, K].
    """
    live_seqs, live_logp, fin_seqs, fin_scores = state
    batch, k, vocab = logprobs.shape
    cand = (live_logp[:, :, None] + logprobs).reshape(batch, k * vocab)
    top_logp, top_idx = jax.lax.top_k(cand, 2 * k)  # >= K of these do not end in EOS
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    slot = jnp.arange(live_seqs.shape[-1]) == i
    seqs = jnp.where(slot, token[:, :, None], _take(live_seqs, parent))  # [B, 2K, L]
    is_eos, last = token == eos_id, i == max_new_tokens - 1

    live_logp, pos = jax.lax.top_k(jnp.where(is_eos | last, -jnp.inf, top_logp), k)
    live_seqs, parent = _take(seqs, pos), jnp.take_along_axis(parent, pos, axis=1)

    # An EOS candidate finishes only if it ranks among the top K (it would have taken a
    # beam), so beam_size=1 is exactly greedy decoding, EOS included.
    finishing = (is_eos & (jnp.arange(2 * k) < k)) | last
    new_scores = jnp.where(finishing, top_logp / length_penalty_factor(i + 1, alpha), -jnp.inf)
    new_seqs = jnp.where(jnp.arange(seqs.shape[-1]) > i, eos_id, seqs)  # EOS-pad
    # Existing finished hypotheses come first, so they win ties (top_k is stable).
    fin_scores, pos = jax.lax.top_k(jnp.concatenate([fin_scores, new_scores], axis=1), k)
    fin_seqs = _take(jnp.concatenate([fin_seqs, new_seqs], axis=1), pos)
    return (live_seqs, live_logp, fin_seqs, fin_scores), parent


def _all_done(state, i, max_new_tokens, alpha):
    """True when no live beam of any row can beat that row's best finished hypothesis."""
    _, live_logp, _, fin_scores = state
    # Live beams have i tokens; any future finished length lies in [i + 1, max_new_tokens]
    # and the penalty is monotonic in the length, so its largest value is at an end.
    best_lp = jnp.maximum(
        length_penalty_factor(i + 1, alpha), length_penalty_factor(max_new_tokens, alpha)
    )
    bound = jnp.max(live_logp, axis=1) / best_lp
    return jnp.all(jnp.max(fin_scores, axis=1) >= bound)


@functools.partial(jax.jit, static_argnames=("model", "cache_len", "beam_size"))
def _beam_search(
    model,
    params,
    prompt,
    max_new_tokens,
    eos_id,
    alpha,
    lengths=None,
    prefix_lm=False,
    *,
    cache_len,
    beam_size,
):
    """Returns best tokens [B, cache_len - T], their scores [B], and the steps run.

    `lengths` ([B] real prompt lengths, left padding) and `prefix_lm` (traced bool) are
    optional so that plain calls keep their signature (and their compiled program).
    """
    batch, prompt_len = prompt.shape
    k, buf = beam_size, cache_len - prompt_len
    batch_axis = 1 if model.cfg.scan_layers else 0  # scanned caches lead with a layers axis

    logits, mutated = prefill(model, params, prompt, cache_len, lengths, prefix_lm)
    if lengths is None:
        lengths = jnp.full((batch,), prompt_len, jnp.int32)
    # Decode-step positions of the B*K beams: each continues from its row's length.
    beam_lengths = jnp.repeat(lengths, k)
    # Prefill once per row, then one cache copy per beam: row b's beams are b*K .. b*K+K-1.
    cache = _map_cache(lambda x: jnp.repeat(x, k, axis=batch_axis), mutated["cache"])

    def reorder(cache, parent):  # parent [B, K] beam index within each row
        flat = (jnp.arange(batch)[:, None] * k + parent).reshape(-1)
        return _map_cache(lambda x: jnp.take(x, flat, axis=batch_axis), cache)

    logprobs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
    logprobs = jnp.broadcast_to(logprobs[:, None], (batch, k, logprobs.shape[-1]))
    state = (
        jnp.zeros((batch, k, buf), jnp.int32),
        jnp.full((batch, k), -jnp.inf).at[:, 0].set(0.0),  # only beam 0 is live at first
        jnp.full((batch, k, buf), eos_id, jnp.int32),
        jnp.full((batch, k), -jnp.inf),
    )
    state, parent = _step(state, logprobs, 0, max_new_tokens, eos_id, alpha)
    cache = reorder(cache, parent)

    def cond(carry):
        i, _, state = carry
        return (i < max_new_tokens) & ~_all_done(state, i, max_new_tokens, alpha)

    def body(carry):
        i, cache, state = carry
        token = jax.lax.dynamic_index_in_dim(state[0], i - 1, axis=2, keepdims=False)
        pos = (beam_lengths + i - 1)[:, None]
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            token.reshape(batch * k, 1),
            positions=pos,
            segment_ids=jnp.ones((batch * k, 1), jnp.int32),
            mutable=["cache"],
        )
        logprobs = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1)
        state, parent = _step(
            state, logprobs.reshape(batch, k, -1), i, max_new_tokens, eos_id, alpha
        )
        return i + 1, reorder(mutated["cache"], parent), state

    steps, _, state = jax.lax.while_loop(cond, body, (jnp.array(1), cache, state))
    _, _, fin_seqs, fin_scores = state
    return fin_seqs[:, 0], fin_scores[:, 0], steps


def beam_search(
    model_cfg: ModelConfig,
    params: Any,
    prompt: np.ndarray,
    *,
    max_new_tokens: int = 32,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    eos_id: int = -1,
    policy: Any = None,
    prompt_lengths: Any = None,
    prefix_lm: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Beam search continuation of each row of `prompt` ([B, P] token ids).

    Args:
      max_new_tokens: length of the returned continuation (hypotheses may end earlier).
      beam_size: K beams per row (1 = greedy).
      length_penalty: GNMT alpha; scores are logp / ((5 + len) / 6) ** alpha, len counting
        the generated tokens including EOS (0 = raw log-probability).
      eos_id: end-of-sequence id (-1 = none: every hypothesis runs to max_new_tokens).
      prompt_lengths: optional [B] ints in 1..P: row b's prompt is its last
        `prompt_lengths[b]` tokens (left-padded, pad values ignored); each row is then
        searched exactly as it would be alone. None = every row is P tokens long.
      prefix_lm: attend bidirectionally over each prompt (prefix-LM), as in training.

    Returns:
      tokens [B, max_new_tokens] int32, the best hypothesis per row, EOS-padded after its
      EOS; scores [B] float32, its length-penalised log-probability.
    """
    if beam_size < 1:
        raise UserError(f"beam_size must be >= 1, got {beam_size}")
    prompt, cache_len = check_prompt(model_cfg, prompt, max_new_tokens)
    lengths = check_lengths(prompt, prompt_lengths)
    model = build_model(model_cfg, policy, decode=True)
    # Plain calls pass neither option, so they share the program compiled for callers of
    # `_beam_search` that predate them; any padded or prefix-LM call shares one other.
    extra = ()
    if prompt_lengths is not None or prefix_lm:
        extra = (jnp.asarray(lengths), jnp.bool_(prefix_lm))
    tokens, scores, _ = _beam_search(
        model,
        params,
        jnp.asarray(prompt),
        jnp.int32(max_new_tokens),
        jnp.int32(eos_id),
        jnp.float32(length_penalty),
        *extra,
        cache_len=cache_len,
        beam_size=beam_size,
    )
    return np.asarray(tokens)[:, :max_new_tokens], np.asarray(scores)
