"""keye-jax: Kwai Keye-VL 1.5 (SigLIP vision tower + projector + Qwen3 decoder) in JAX / Flax NNX."""

__version__ = "0.1.0"
