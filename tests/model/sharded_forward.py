"""Run as a script with 8 virtual CPU devices: the sharded decoder equals the single-device one."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from keye_jax.config import KeyeConfig, TextConfig  # noqa: E402
from keye_jax.model import KeyeVL  # noqa: E402
from keye_jax.sharding import logical_to_spec, make_mesh, param_specs, shard_model  # noqa: E402


def main():
  t = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=1e4, mrope_section=(2, 3, 3))
  cfg = KeyeConfig(text=t, vision=None, attention_impl="xla")
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (8, 16)))
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  want = np.asarray(jax.jit(lambda m, x: m.decoder(x))(model, ids))
  worst = 0.0
  for shape in ({"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}):
    mesh = make_mesh(shape)
    m = KeyeVL(cfg, rngs=nnx.Rngs(0))
    shard_model(m, mesh)
    specs = param_specs(nnx.state(m), mesh_axes=mesh.axis_names)
    assert any(s != jax.sharding.PartitionSpec() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    x = jax.device_put(ids, NamedSharding(mesh, logical_to_spec(("batch", "length"), mesh_axes=mesh.axis_names)))
    with jax.set_mesh(mesh):
      got = np.asarray(jax.jit(lambda m, x: m.decoder(x))(m, x))
    err = float(np.abs(got - want).max())
    worst = max(worst, err)
    print(shape, "max abs diff", err)
  return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main())
