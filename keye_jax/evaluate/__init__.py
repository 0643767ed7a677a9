"""Benchmarks: adapters for the published formats, answer extraction, and the `keye eval` harness."""

from keye_jax.evaluate.harness import adapter, run_eval

__all__ = ["run_eval", "adapter"]
