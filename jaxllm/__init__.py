"""jaxllm: train, fine-tune, compress and evaluate transformer LMs with JAX/Flax."""

__version__ = "0.1.0"
