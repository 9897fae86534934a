"""Autoregressive decoding on the KV cache: greedy, temperature / top-k / top-p sampling, beam.

One prefill call writes the prompt's keys and values into the cache; each further
step feeds one token. The whole generation is one jitted `lax.while_loop`, compiled
once per (batch, prompt bucket, cache bucket) so repeated calls do not recompile.
Beam search lives in `jaxllm.beam_search`; `generate(strategy="beam")` dispatches to it.

Rows may have prompts of different lengths (a batch of translation sources, say): the
prompt is left-padded to a common length P and `prompt_lengths` says how many of each
row's trailing tokens are real. Padding gets segment id 0 (invisible to every query) and
real token j of a row gets position j, so each row decodes exactly as it would alone,
unpadded. The lengths are traced, so they cost no recompiles. `prefix_lm=True` makes
the real prompt tokens a bidirectional prefix, as the prefix-LM tasks train it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import UserError
from jaxllm.model import build_model

STRATEGIES = ("greedy", "sample", "beam")
BUCKET = 64  # cache lengths round up to a multiple of this to bound recompiles


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Masks logits outside the top-k set and outside the top-p nucleus (to -inf).

    Args:
      logits: [B, V] float logits, already divided by the temperature.
      top_k: keep the k largest (0 = no limit).
      top_p: keep the smallest set whose probability mass reaches p (1.0 = no limit).
    """
    neg = jnp.finfo(logits.dtype).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if not (isinstance(top_p, float) and top_p >= 1.0):  # traced top_p: always filter
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The cut-off is the first sorted logit at which the mass *before* it reaches p;
        # the most likely token always survives.
        keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, neg, logits)
    return logits


def _next_token(logits, rng, strategy, temperature, top_k, top_p):
    if strategy == "greedy":
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def prompt_layout(
    prompt_len: int, lengths: jax.Array | None, batch: int
) -> tuple[jax.Array, jax.Array]:
    """Positions and segment ids [B, P] of a left-padded prompt.

    Args:
      prompt_len: P, the padded prompt length.
      lengths: [B] int number of real (trailing) tokens per row; None = all P.
      batch: B.

    Returns:
      positions, 0 at each row's first real token (0 on the padding too, so that learned
      position tables are never indexed out of range), and segment ids, 1 on real tokens
      and 0 on the padding.
    """
    if lengths is None:
        lengths = jnp.full((batch,), prompt_len, jnp.int32)
    pos = jnp.arange(prompt_len, dtype=jnp.int32)[None, :] - (prompt_len - lengths[:, None])
    real = pos >= 0
    return jnp.maximum(pos, 0), real.astype(jnp.int32)


def prefill(
    model: Any,
    params: Any,
    prompt: jax.Array,
    cache_len: int,
    lengths: jax.Array | None = None,
    prefix_lm: bool | jax.Array = False,
) -> tuple[jax.Array, dict]:
    """Allocates an empty KV cache of `cache_len` and runs the prompt through it.

    Shared by sampling and beam search so both fill the cache the same way.

    Args:
      model: a `Transformer` built with `decode=True`.
      params: its parameters.
      prompt: [B, P] int token ids; with `lengths`, row b's real tokens are its last
        `lengths[b]` entries (left padding; pad values are ignored).
      cache_len: number of cache slots (>= P plus the tokens still to come).
      lengths: optional [B] int real-token counts in 1..P (None = every row is full).
      prefix_lm: if True (may be traced), every real prompt token is a prefix token:
        the prompt attends to itself bidirectionally and later tokens see all of it.

    Returns:
      The prompt's logits [B, P, V] (rows' padding positions hold meaningless values;
      the last position is always a real token) and the mutated variables
      (`{"cache": ...}`).
    """
    batch, prompt_len = prompt.shape
    cache = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, cache_len), jnp.int32))
    )["cache"]
    cache = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache)
    positions, segment_ids = prompt_layout(prompt_len, lengths, batch)
    # Pad values are arbitrary (even out of the vocabulary): an out-of-range embedding
    # lookup gives NaN, and NaN values poison attention even under a zero weight.
    prompt = jnp.where(segment_ids > 0, prompt, 0)
    prefix_mask = None
    if not (isinstance(prefix_lm, bool) and not prefix_lm):
        prefix_mask = (segment_ids > 0) & prefix_lm
    return model.apply(
        {"params": params, "cache": cache},
        prompt,
        positions=positions,
        segment_ids=segment_ids,
        prefix_mask=prefix_mask,
        mutable=["cache"],
    )


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "cache_len", "strategy", "top_k")
)
def _generate(
    model,
    params,
    prompt,
    rng,
    temperature,
    top_p,
    eos_id,
    lengths,
    prefix_lm,
    *,
    max_new_tokens,
    cache_len,
    strategy,
    top_k,
):
    batch, _ = prompt.shape
    logits, mutated = prefill(model, params, prompt, cache_len, lengths, prefix_lm)
    first = _next_token(logits[:, -1], rng, strategy, temperature, top_k, top_p)
    # EOS-filled: once every row is done the loop stops early, and the unwritten tail must
    # read as the EOS that finished rows repeat (with eos_id=-1 every slot is written).
    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
    done = first == eos_id

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, cache, out, done, _ = carry
        token = out[:, i - 1]
        pos = (lengths + i - 1)[:, None]  # each row continues from its own length
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            token[:, None],
            positions=pos,
            segment_ids=jnp.ones((batch, 1), jnp.int32),
            mutable=["cache"],
        )
        nxt = _next_token(
            logits[:, -1], jax.random.fold_in(rng, i), strategy, temperature, top_k, top_p
        )
        nxt = jnp.where(done, eos_id, nxt)  # finished rows keep emitting EOS
        out = out.at[:, i].set(nxt)
        return i + 1, mutated["cache"], out, done | (nxt == eos_id), None

    _, _, out, _, _ = jax.lax.while_loop(
        cond, body, (jnp.array(1), mutated["cache"], out, done, None)
    )
    return out


def check_prompt(
    model_cfg: ModelConfig, prompt: Any, max_new_tokens: int
) -> tuple[np.ndarray, int]:
    """Validates a [B, T] prompt and returns it with the bucketed KV-cache length."""
    if max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    prompt = np.asarray(prompt, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise UserError("the prompt is empty; give at least one token of text")
    needed = prompt.shape[1] + max_new_tokens
    if needed > model_cfg.max_len:
        raise UserError(
            f"prompt ({prompt.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_len={model_cfg.max_len}; shorten the prompt or lower max_new_tokens"
        )
    # Rounding up to a bucket bounds how many cache shapes (compiles) a session sees.
    return prompt, min(model_cfg.max_len, -(-needed // BUCKET) * BUCKET)


def check_lengths(prompt: np.ndarray, prompt_lengths: Any) -> np.ndarray:
    """Validates per-row prompt lengths for a left-padded [B, P] prompt.

    Args:
      prompt: the [B, P] prompt (already through `check_prompt`).
      prompt_lengths: [B] ints in 1..P, or None (every row is P tokens long).

    Returns:
      [B] int32 lengths.
    """
    batch, prompt_len = prompt.shape
    if prompt_lengths is None:
        return np.full((batch,), prompt_len, np.int32)
    lengths = np.asarray(prompt_lengths)
    if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
        raise UserError(
            f"prompt_lengths must be {batch} integers (one per prompt row), got {lengths!r}"
        )
    if lengths.size and (lengths.min() < 1 or lengths.max() > prompt_len):
        raise UserError(
            f"prompt_lengths must lie in 1..{prompt_len} (the padded prompt length), "
            f"got {lengths.tolist()}"
        )
    return lengths.astype(np.int32)


def generate(
    model_cfg: ModelConfig,
    params: Any,
    prompt: np.ndarray,
    *,
    max_new_tokens: int = 32,
    strategy: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int = -1,
    seed: int = 0,
    policy: Any = None,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    prompt_lengths: Any = None,
    prefix_lm: bool = False,
) -> np.ndarray:
    """Continues each row of `prompt` ([B, P] token ids) on the KV cache.

    `strategy="beam"` runs `jaxllm.beam_search.beam_search` with `beam_size` beams and
    GNMT `length_penalty` (alpha) and returns the best hypothesis per row.

    Args:
      prompt_lengths: optional [B] ints in 1..P for prompts of different lengths: row b's
        prompt is its last `prompt_lengths[b]` tokens (left-padded; pad values are
        ignored). Each row then continues exactly as it would alone. None = all P long.
      prefix_lm: treat each row's prompt as a prefix-LM prefix (bidirectional attention
        over it, as `prefix_mask` in training); False = plain causal LM.

    Returns:
      [B, max_new_tokens] int32 new tokens; after a row emits `eos_id` it repeats it.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"strategy={strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
    if strategy == "beam":
        from jaxllm.beam_search import beam_search  # imports this module: import lazily

        tokens, _ = beam_search(
            model_cfg,
            params,
            prompt,
            max_new_tokens=max_new_tokens,
            beam_size=beam_size,
            length_penalty=length_penalty,
            eos_id=eos_id,
            policy=policy,
            prompt_lengths=prompt_lengths,
            prefix_lm=prefix_lm,
        )
        return tokens
    if temperature <= 0 and strategy == "sample":
        raise UserError("temperature must be > 0 for sampling; use strategy=greedy instead")
    if not 0.0 < top_p <= 1.0 or top_k < 0:
        raise UserError(f"top_p must be in (0, 1] and top_k >= 0, got {top_p}, {top_k}")
    prompt, cache_len = check_prompt(model_cfg, prompt, max_new_tokens)
    lengths = check_lengths(prompt, prompt_lengths)
    model = build_model(model_cfg, policy, decode=True)
    out = _generate(
        model,
        params,
        jnp.asarray(prompt),
        jax.random.PRNGKey(seed),
        jnp.float32(temperature),
        jnp.float32(top_p),
        jnp.int32(eos_id),
        jnp.asarray(lengths),
        jnp.bool_(prefix_lm),  # traced: the flag costs no second compile
        max_new_tokens=max_new_tokens,
        cache_len=cache_len,
        strategy=strategy,
        top_k=top_k,
    )
    return np.asarray(out)
