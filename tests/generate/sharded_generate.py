"""Run as a script with 4 virtual CPU devices: sampling over a mesh gives the single-device tokens."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from keye_jax.config import KeyeConfig, TextConfig  # noqa: E402
from keye_jax.generate import Prompt, Sampler, SamplingParams  # noqa: E402
from keye_jax.model import KeyeVL  # noqa: E402
from keye_jax.rollout import Request, RolloutEngine  # noqa: E402
from keye_jax.sharding import make_mesh, shard_model  # noqa: E402


def main():
  t = TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, head_dim=16, rope_theta=1e4, mrope_section=(2, 3, 3))
  cfg = KeyeConfig(text=t, vision=None, attention_impl="xla")
  rng = np.random.default_rng(0)
  prompts = [Prompt(rng.integers(1, 128, n).astype(np.int32)) for n in (5, 12, 9)]
  params = SamplingParams(max_new_tokens=12)
  want = Sampler(KeyeVL(cfg, rngs=nnx.Rngs(0)), stop_token_ids=()).generate(prompts, params)
  mesh = make_mesh({"data": 2, "tensor": 2})
  model = shard_model(KeyeVL(cfg, rngs=nnx.Rngs(0)), mesh)
  sampler = Sampler(model, stop_token_ids=(), mesh=mesh)
  got = sampler.generate(prompts, params)
  same = [g.tokens for g in got] == [w.tokens for w in want]
  err = max(np.abs(np.subtract(g.logprobs, w.logprobs)).max() for g, w in zip(got, want))
  print("same tokens", same, "max logprob diff", err)
  # The rollout engine over the same mesh: its 4 slots split over data=2, same greedy tokens.
  reqs = [Request(p, params, 2) for p in prompts]
  rolled = RolloutEngine(model, stop_token_ids=(), slots=4, mesh=mesh).generate(reqs)
  same_rollout = all(g.tokens == w.tokens for grp, w in zip(rolled, want) for g in grp)
  err_rollout = max(np.abs(np.subtract(g.logprobs, w.logprobs)).max() for grp, w in zip(rolled, want) for g in grp)
  print("rollout: same tokens", same_rollout, "max logprob diff", err_rollout)
  return 0 if same and err <= 1e-4 and same_rollout and err_rollout <= 1e-4 else 1


if __name__ == "__main__":
  sys.exit(main())
