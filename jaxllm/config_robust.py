"""Config sections of private and robust training: `privacy`, `adversarial`, `input_filter`.

Kept beside `jaxllm.config` (which holds them in `Config` and calls
:func:`validate_robustness`) so that each file keeps one job; the sections are read by
`jaxllm.privacy`, `jaxllm.adversarial` and `jaxllm.input_filter`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from jaxllm.errors import UserError


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class PrivacyConfig:
    """DP-SGD (`jaxllm.privacy`): per-example clipping, Gaussian noise, RDP accounting.

    The privacy unit is one training row (a classify example; an lm window). Set either
    `noise_multiplier` or `target_epsilon` (the noise is then derived for train.steps).
    """

    dp: bool = False
    noise_multiplier: float = 0.0  # sigma: noise std / clip_norm on the summed gradient
    clip_norm: float = 1.0  # C: every example's gradient is scaled to L2 norm <= C
    target_epsilon: float = 0.0  # >0: the smallest noise that reaches it after train.steps
    delta: float = 1e-5  # the delta epsilon is reported at (keep it below 1 / examples)


@dataclass
class AdversarialConfig:
    """Adversarial training on input embeddings (`jaxllm.adversarial`).

    The perturbation of each example lies in an L2 ball of radius `epsilon` over its
    whole [length, d_model] embedding; loss = clean + weight * adversarial.
    """

    method: str = field(default="none", metadata=_choices("none", "fgm", "pgd"))
    epsilon: float = 1.0
    steps: int = 3  # pgd: ascent steps
    step_size: float = 0.0  # pgd: L2 length of each step (0 = 2.5 * epsilon / steps)
    weight: float = 1.0


@dataclass
class InputFilterConfig:
    """Checks on raw input text at generate/eval time (`jaxllm.input_filter`); off by default.

    A rejected prompt stops `jaxllm generate`; rejected eval examples are not scored and
    are reported (count per rule and the list) in the eval result.
    """

    max_chars: int = 0  # 0 = no limit
    max_tokens: int = 0  # tokenizer pieces; 0 = no limit
    reject_control_chars: bool = False  # Unicode C* characters except tab, newline, CR
    ascii_only: bool = False
    # Letters must belong to these scripts (first word of their Unicode name: latin,
    # greek, cyrillic, arabic, hebrew, cjk, hiragana, ...); digits, punctuation,
    # symbols and spaces always pass. Empty = any script.
    allowed_scripts: list[str] = field(default_factory=list)
    blocklist_words: list[str] = field(default_factory=list)  # whole words, any case
    blocklist_patterns: list[str] = field(default_factory=list)  # regexes, re.search, any case


def validate_robustness(cfg: Any) -> None:
    """Checks the privacy, adversarial, input_filter and eval.char_noise settings of `cfg`.

    Raises:
      UserError: One line naming the key, what is wrong and the fix.
    """
    p, a, f = cfg.privacy, cfg.adversarial, cfg.input_filter
    if p.noise_multiplier < 0 or p.target_epsilon < 0:
        raise UserError("privacy.noise_multiplier and privacy.target_epsilon must be >= 0")
    if p.clip_norm <= 0:
        raise UserError(f"privacy.clip_norm must be > 0, got {p.clip_norm}")
    if not 0.0 < p.delta < 1.0:
        raise UserError(f"privacy.delta must be in (0, 1), got {p.delta}; e.g. 1e-5")
    if p.noise_multiplier and p.target_epsilon:
        raise UserError(
            "set privacy.noise_multiplier or privacy.target_epsilon, not both (the noise "
            "is derived from the target)"
        )
    if not p.dp and (p.noise_multiplier or p.target_epsilon):
        raise UserError(
            "privacy.noise_multiplier/target_epsilon are set but privacy.dp=false; set "
            "privacy.dp=true to train with DP-SGD"
        )
    if p.dp and (cfg.data.pack and cfg.task != "classify" or cfg.data.length_policy == "split"):
        raise UserError(
            "privacy.dp=true clips one gradient per row, so a row must be one example: "
            "set data.pack=false and data.length_policy=truncate or drop"
        )
    if a.epsilon <= 0 or a.weight < 0:
        raise UserError("adversarial.epsilon must be > 0 and adversarial.weight >= 0")
    if a.steps < 1 or a.step_size < 0:
        raise UserError("adversarial.steps must be >= 1 and adversarial.step_size >= 0")
    if f.max_chars < 0 or f.max_tokens < 0:
        raise UserError("input_filter.max_chars and input_filter.max_tokens must be >= 0")
    for i, pattern in enumerate(f.blocklist_patterns):
        try:
            re.compile(pattern)
        except (re.error, OverflowError) as e:
            raise UserError(
                f"input_filter.blocklist_patterns[{i}] is not a valid regex ({e}): {pattern!r}"
            ) from e
    if not all(w.strip() for w in f.blocklist_words + f.allowed_scripts):
        raise UserError("input_filter.blocklist_words/allowed_scripts must not hold empty entries")
    if not 0.0 <= cfg.eval.char_noise <= 1.0:
        raise UserError(f"eval.char_noise must be in [0, 1], got {cfg.eval.char_noise}")
    if cfg.eval.char_noise and cfg.task == "lm" and not cfg.data.pack:
        raise UserError(
            "eval.char_noise noises documents, but task=lm with data.pack=false scores "
            "windows of one token stream; set data.pack=true or eval.char_noise=0"
        )
