"""Test-wide setup: CPU only (libtpu is installed for ahead-of-time compiles; it must not grab the
runtime), quiet logs, fp32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
