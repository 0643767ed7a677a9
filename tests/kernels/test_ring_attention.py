import pytest
"""Ring attention on 8 virtual CPU devices equals single-device attention (outputs and q/k/v gradients).

The device count must be fixed before jax is imported, so the checks run in a fresh interpreter
(`python -m tests.kernels.test_ring_attention`) and the pytest test only launches it.
"""

import os
import subprocess
import sys

RTOL = 1e-4  # fp32 on CPU: only the summation order differs


def _checks():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh

  import kernels
  from kernels.ring_attention import ring_attention
  from tests.kernels import segment_layouts

  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8
  s = 256
  seg = jnp.asarray(np.stack([segment_layouts.many_short(s, seed=1),
                              segment_layouts.crossing_block_edges(s, 32),  # boundaries at device edges
                              segment_layouts.padding_at_end(s),
                              segment_layouts.one_long(s)]))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(4, s, 4, 72)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(4, s, 2, 72)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(4, s, 2, 72)), jnp.float32)
  w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

  def compare(name, fn, causal):
    ref = lambda q, k, v: kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
                                            impl="xla")
    results = []
    for f in (fn, ref):
      loss = lambda q, k, v: jnp.sum(f(q, k, v) * w)
      results.append((jax.jit(f)(q, k, v), *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)))
    for label, got, want in zip(("out", "dq", "dk", "dv"), *results):
      err = float(jnp.abs(got - want).max()) / max(float(jnp.abs(want).max()), 1e-6)
      assert err <= RTOL, (name, causal, label, err)
    print(f"ok {name} causal={causal}", flush=True)

  ring_mesh = Mesh(np.array(jax.devices()), ("context",))
  for causal in (True, False):
    compare("ring8-xla", lambda q, k, v: ring_attention(q, k, v, seg, seg, mesh=ring_mesh, causal=causal),
            causal)
  # Through the dispatch on a (data=2, context=4) mesh, Pallas kernels (interpret mode) per ring step.
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "context"))
  for causal in (True, False):
    compare("dispatch-pallas-data2-context4",
            lambda q, k, v: kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=causal,
                                              impl="pallas", block_q=32, block_kv=32, mesh=mesh), causal)
  # No mesh passed: the Pallas path picks up the ambient mesh (as in the sharded training step).
  mesh3 = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
  with jax.set_mesh(mesh3):
    compare("dispatch-pallas-ambient-data2-fsdp2-tensor2",
            lambda q, k, v: kernels.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=True,
                                              impl="pallas", block_q=32, block_kv=32), True)


@pytest.mark.slow   # 27 s idle: the fast suite must stay within the CI budget; run with -m slow
def test_ring_attention_on_eight_virtual_devices():
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "tests.kernels.test_ring_attention"], cwd=root, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert proc.stdout.count("ok ") == 5, proc.stdout


if __name__ == "__main__":
  _checks()
