"""Model compression as pure functions over parameter pytrees and dot_general hooks.

- :mod:`jaxllm.compress.prune`: magnitude masks (unstructured, global, N:M), the optax
  transforms that keep pruned weights at zero, gradual (Zhu & Gupta) pruning.
- :mod:`jaxllm.compress.quant`: straight-through fake quantisation, QAT and int8
  dot_general factories, PTQ calibration, int8/int4 weight trees.
"""
