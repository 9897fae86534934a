"""Checkpoint conversion between Hugging Face and jaxllm (`jaxllm convert`)."""
