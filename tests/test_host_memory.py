"""keye_jax.host_memory: after keep_freed_memory(), a jitted call whose temporaries are large reuses the
pages of the previous call instead of faulting fresh ones in (checked in fresh processes, since it must
run before JAX creates its CPU client)."""

import json
import os
import subprocess
import sys

import pytest

from keye_jax import host_memory

_PROBE = r"""
import json, os, resource, sys
from keye_jax import host_memory
applied = host_memory.keep_freed_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
# ~110 MB of temporaries per call: (3072, 3072) fp32 intermediates the result depends on.
f = jax.jit(lambda x: ((x @ x) * 2.0 + jnp.tanh(x @ x.T)).sum())
x = jnp.ones((3072, 3072), jnp.float32) * 1e-3
f(x).block_until_ready()
faults = []
for _ in range(3):
  r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(json.dumps({"applied": applied, "faults": min(faults)}))
"""


def _probe(mode: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
@pytest.mark.slow   # a performance property (bench_train relies on it): ~20 s idle
def test_freed_memory_is_reused_without_page_faults():
  system, reuse = _probe("system"), _probe("reuse")
  assert reuse["applied"]
  # The system allocator faults fresh pages in on every call (885k faults measured here, 0 with reuse).
  assert system["faults"] > 10_000, system
  assert reuse["faults"] < system["faults"] / 20, (system, reuse)


def test_runs_on_cpu_follows_jax_platforms(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.runs_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not host_memory.runs_on_cpu()


def test_prepare_host_applies_only_on_the_cpu(monkeypatch):
  """cpu_ops.prepare_host, the one place that chooses the malloc setting: nothing when JAX will not
  run on the CPU."""
  from keye_jax import cpu_ops
  calls = []
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert not cpu_ops.prepare_host() and not calls
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_ops.prepare_host() and calls == [1]
