"""Rollouts for the RL loop: G sampled responses per prompt from the trainer's own parameters.

`Rollouts.set_weights(params)` hands the train state's parameters (the flat dict, on the trainer's mesh)
to the sampler as they are: `ModelShape.build(params)` makes a module over the same arrays, so there is no
copy, no name mapping and no resharding, and the compiled sampling programs are reused (the weights are
arguments). `sample(prompts, seeds)` returns, per prompt, G `Generation`s (tokens, the log-probs of the
sampled tokens under the policy, softmax(logits / rl.temperature), text, finish_reason, thinking, answer).

Every prompt has its own seed, so its responses do not depend on which other prompts share the batch (or
the process): what makes a run on two processes equal to a run on one, and a resumed run equal to an
uninterrupted one. The engine is keye_jax.rollout.RolloutEngine (vision and prefill once per prompt, its
G samples in the shared decode slots). With `keep_features` (the loop sets it when the vision tower is
frozen), `features` holds, after each `sample`, per prompt the tower's output for its patches (Pp, Dv)
float32 on the host (None without images): the RL step's log-prob passes use them instead of re-encoding.

Several processes (multi-host): every process samples its own prompts, as many times as its hints need,
so the engines cannot share one SPMD program over the global mesh. Each process runs its engine on a
mesh of its own devices (`engine_mesh`, the trainer's axis names; see `hosts_mesh`) with its share of the
decode slots: `rl.slots` is the global number, like `rl.prompts_per_step` and `data.batch_size`, and each
process's engine has rl.slots / processes of them (`slots_per_process`), so the KV cache per chip does not
depend on how many hosts the slice has. `set_weights` brings
the parameters there with one jitted identity whose output sharding is their own spec on a (hosts, *local
axes) view of the devices: every process then holds the whole model laid out as on its local mesh, and
those device buffers become the local arrays as they are (`jax.make_array_from_single_device_arrays`), never
through the host. That is a copy (a process's devices hold the whole model, not their 1/n share of it),
made once per RL step. With one process none of this happens: the trainer's arrays are used in place.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from keye_jax.generate import Prompt, SamplingParams
from keye_jax.rollout import Request, RolloutEngine


class Rollouts:
  def __init__(self, shape, tokenizer, mesh, rl_cfg, *, keep_features: bool = False):
    self.shape, self.tokenizer, self.mesh, self.cfg = shape, tokenizer, mesh, rl_cfg
    self.keep_features = keep_features
    self.features: list = []  # per prompt of the last `sample`: (Pp, Dv) float32 or None (keep_features only)
    self.engine = None
    self.tokens = 0  # generated tokens so far
    self.seconds = 0.0
    self.engine_mesh = mesh
    self.slots = slots_per_process(rl_cfg.slots, jax.process_count())
    if jax.process_count() > 1:
      hosts = hosts_mesh(mesh)
      self.engine_mesh = process_mesh(mesh, jax.process_index())
      specs = shape.specs(mesh.axis_names)
      self._hosts_fn = jax.jit(lambda p: p, out_shardings={k: NamedSharding(hosts, s) for k, s in specs.items()})
      self._local = {k: NamedSharding(self.engine_mesh, s) for k, s in specs.items()}

  def local_params(self, params: dict) -> dict:
    """The trainer's parameters (global arrays) as arrays on this process's engine mesh (same specs)."""
    if self.engine_mesh is self.mesh:
      return params
    local = lambda k, x: jax.make_array_from_single_device_arrays(x.shape, self._local[k],
                                                                  [s.data for s in x.addressable_shards])
    return {k: local(k, x) for k, x in self._hosts_fn(params).items()}

  def set_weights(self, params: dict):
    model = self.shape.build(self.local_params(params))
    if self.engine is None:
      self.engine = RolloutEngine(model, self.tokenizer, slots=self.slots, mesh=self.engine_mesh)
    else:
      self.engine.set_weights(model)

  def params(self, seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, seed=int(seed))

  def sample(self, prompts: list[Prompt], seeds: list[int], n: int) -> list[list]:
    """Per prompt, `n` Generations sampled with that prompt's seed."""
    t0 = time.perf_counter()
    self.features = []
    if not prompts:
      return []
    out = self.engine.generate([Request(p, self.params(s), n=n) for p, s in zip(prompts, seeds)])
    groups = out.groups
    if self.keep_features:
      if len(out.vision_features) != len(prompts):
        raise ValueError(f"rl: the rollout engine returned vision features for {len(out.vision_features)} of "
                         f"{len(prompts)} prompts")
      # The engine's (1, P bucket, Dv) tower output (on this process's devices) -> the prompt's own patches.
      self.features = [None if f is None else np.asarray(f[0, :len(p.pixel_values)], np.float32)
                       for p, f in zip(prompts, out.vision_features)]
    self.seconds += time.perf_counter() - t0
    self.tokens += sum(len(g.tokens) for grp in groups for g in grp)
    return groups


def slots_per_process(slots: int, processes: int) -> int:
  """Decode slots of one process's rollout engine: rl.slots is global (as rl.prompts_per_step is), split
  evenly over the processes."""
  if slots < 1 or slots % processes:
    raise ValueError(f"rl.slots={slots} must be a positive multiple of the {processes} processes (each process's "
                     f"rollout engine runs rl.slots / processes of the decode slots)")
  return slots // processes


def process_mesh(mesh: Mesh, index: int) -> Mesh:
  """Process `index`'s rollout engine mesh: its devices of `mesh`, laid out as `hosts_mesh` lays them out."""
  return Mesh(hosts_mesh(mesh).devices[index], mesh.axis_names)


def hosts_mesh(mesh: Mesh) -> Mesh:
  """The devices of `mesh` as (hosts, *local axes): row h is process h's devices as a mesh with the same
  axis names, tensor and context as in `mesh`, fsdp the largest divisor of `mesh`'s fsdp that fits, data
  the rest (so a parameter dimension split over an axis of `mesh` splits evenly over the local one too).
  The processes are those holding `mesh`'s devices (all of them in a run; a topology's hosts in `keye plan`)."""
  n = len({d.process_index for d in mesh.devices.flat})
  rows = [[d for d in mesh.devices.flat if d.process_index == p] for p in range(n)]
  per = len(rows[0])
  sizes = dict(mesh.shape)
  model = sizes.get("tensor", 1) * sizes.get("context", 1)
  if any(len(r) != per for r in rows) or per % model:
    raise ValueError(f"rl: the rollout engine runs on each process's own devices, but mesh {sizes} over "
                     f"{n} processes of {[len(r) for r in rows]} devices splits tensor x context = {model} "
                     "over hosts")
  local = dict(sizes, fsdp=int(np.gcd(sizes.get("fsdp", 1), per // model)))
  local["data"] = per // (model * local["fsdp"])
  shape = [local.get(a, 1) for a in mesh.axis_names]
  return Mesh(np.asarray(rows).reshape(n, *shape), ("hosts", *mesh.axis_names))


def to_prompt(p: dict) -> Prompt:
  """A prompt-stream item -> the sampler's Prompt."""
  return Prompt(np.asarray(p["input_ids"], np.int32), np.asarray(p["position_ids"], np.int32),
                p.get("pixel_values"), p.get("grids_hw"))


def prompt_seed(run_seed: int, key: int, level: int = 0) -> int:
  """The sampling seed of a prompt (its global mixture element `key`) at hint level `level`."""
  return int(np.random.SeedSequence([run_seed, key, level]).generate_state(1)[0] >> 1)
