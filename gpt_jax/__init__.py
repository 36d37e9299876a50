"""gpt_jax: build your own GPT end to end in JAX and Flax NNX."""

__version__ = "0.1.0"
