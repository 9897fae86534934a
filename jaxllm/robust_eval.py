"""What eval scores when inputs are filtered or noised: the prepared eval records.

- ``input_filter.*`` (`jaxllm.input_filter`): rejected eval examples are left out of
  every metric and reported: ``rejected_inputs`` (the total), ``rejected_<rule>`` (per
  rule) and ``details.rejected_inputs`` (index in the split, rule, what it found).
- ``eval.char_noise``: the kept examples are scored a second time with character noise
  (`jaxllm.data.augment`: delete, insert and swap, each at that rate per character,
  applied to every example with a generator seeded by ``(eval.seed, index)``), so every
  model meets the same noisy inputs: ``noisy_*`` metrics beside the clean ones.

Task ``lm`` with ``data.pack=false`` scores windows of one token stream, not records:
the filter does not apply there (eval says so) and noise is refused by the config.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from jaxllm import data
from jaxllm.config import AugmentConfig
from jaxllm.data.augment import Augmenter
from jaxllm.errors import UserError
from jaxllm.input_filter import InputFilter, filter_records, rejection_counts

log = logging.getLogger(__name__)


def uses_records(cfg: Any) -> bool:
    """Whether the eval pipeline reads records (everything but lm windows)."""
    return not (cfg.task == "lm" and not cfg.data.pack)


@dataclasses.dataclass
class EvalInputs:
    """The prepared eval split.

    Attributes:
      records: Records to score (the filter's accepted ones), or None: the pipeline
        reads the split itself (no filter, no noise, or lm windows).
      rejected: One ``{"index", "rule", "detail"}`` per rejected example; None when
        no filter ran.
      filter_skipped: A filter is configured but the task scores lm windows.
    """

    records: list[dict] | None = None
    rejected: list[dict] | None = None
    filter_skipped: bool = False

    def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(flat result entries, details entries) saying what the filter rejected."""
        if self.filter_skipped:
            return {"input_filter": "not applied (task=lm scores windows)"}, {}
        if self.rejected is None:
            return {}, {}
        flat: dict[str, Any] = {"rejected_inputs": len(self.rejected)}
        flat.update({f"rejected_{k}": v for k, v in rejection_counts(self.rejected).items()})
        return flat, {"rejected_inputs": self.rejected}


def eval_records(cfg: Any, tokenizer: Any) -> EvalInputs:
    """The eval split's records after the input filter, and the rejections.

    Raises:
      UserError: If the filter rejects every example.
    """
    filt = InputFilter(cfg.input_filter, tokenizer)
    if not uses_records(cfg):
        if filt.active:
            log.warning("input_filter does not apply to task=lm with data.pack=false eval")
        return EvalInputs(filter_skipped=filt.active)
    if not filt.active and not cfg.eval.char_noise:
        return EvalInputs()
    source = data.load_records(cfg.data, cfg.data.eval_split, cfg.task)
    records = [source[i] for i in range(len(source))]
    if not filt.active:
        return EvalInputs(records)
    kept, rejected = filter_records(filt, cfg.task, records)
    if not kept:
        raise UserError(
            f"input_filter rejected all {len(records)} examples of the "
            f"'{cfg.data.eval_split}' split ({rejection_counts(rejected)}); relax input_filter.*"
        )
    if rejected:
        log.warning(
            "input_filter rejected %d eval examples: %s", len(rejected), rejection_counts(rejected)
        )
    return EvalInputs(kept, rejected)


def noised_records(cfg: Any, records: list[dict]) -> list[dict]:
    """`records` with ``eval.char_noise`` character noise (see the module docstring)."""
    rate = cfg.eval.char_noise
    aug = Augmenter(
        AugmentConfig(
            prob=1.0, char_delete=rate, char_insert=rate, char_swap=rate, seed=cfg.eval.seed
        )
    )
    return [aug(cfg.task, rec, i, 0)[0] for i, rec in enumerate(records)]
