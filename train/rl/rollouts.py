"""Rollouts for the RL loop: G sampled responses per prompt from the trainer's own parameters.

`Rollouts.set_weights(params)` hands the train state's parameters (the flat dict, on the trainer's mesh)
to the sampler as they are: `ModelShape.build(params)` makes a module over the same arrays, so there is no
copy, no name mapping and no resharding, and the compiled sampling programs are reused (the weights are
arguments). `sample(prompts, seeds)` returns, per prompt, G `Generation`s (tokens, the log-probs of the
sampled tokens under the model at temperature 1, text, finish_reason, thinking, answer).

Every prompt has its own seed, so its responses do not depend on which other prompts share the batch (or
the process): what makes a run on two processes equal to a run on one, and a resumed run equal to an
uninterrupted one. The engine is keye_jax.rollout.RolloutEngine (vision and prefill once per prompt, its
G samples in the shared decode slots).
"""

from __future__ import annotations

import time

import numpy as np

from keye_jax.generate import Prompt, SamplingParams
from keye_jax.rollout import Request, RolloutEngine


class Rollouts:
  def __init__(self, shape, tokenizer, mesh, rl_cfg):
    self.shape, self.tokenizer, self.mesh, self.cfg = shape, tokenizer, mesh, rl_cfg
    self.engine = None
    self.tokens = 0  # generated tokens so far
    self.seconds = 0.0

  def set_weights(self, params: dict):
    model = self.shape.build(params)
    if self.engine is None:
      self.engine = RolloutEngine(model, self.tokenizer, slots=self.cfg.slots, mesh=self.mesh)
    else:
      self.engine.set_weights(model)

  def params(self, seed: int, *, greedy: bool = False, max_new_tokens: int | None = None) -> SamplingParams:
    c = self.cfg
    return SamplingParams(max_new_tokens=max_new_tokens or c.max_new_tokens,
                          temperature=0.0 if greedy else c.temperature, top_k=c.top_k, top_p=c.top_p,
                          seed=int(seed))

  def sample(self, prompts: list[Prompt], seeds: list[int], n: int) -> list[list]:
    """Per prompt, `n` Generations sampled with that prompt's seed."""
    t0 = time.perf_counter()
    if not prompts:
      return []
    groups = self.engine.generate([Request(p, self.params(s), n=n) for p, s in zip(prompts, seeds)]).groups
    self.seconds += time.perf_counter() - t0
    self.tokens += sum(len(g.tokens) for grp in groups for g in grp)
    return groups


def to_prompt(p: dict) -> Prompt:
  """A prompt-stream item -> the sampler's Prompt."""
  return Prompt(np.asarray(p["input_ids"], np.int32), np.asarray(p["position_ids"], np.int32),
                p.get("pixel_values"), p.get("grids_hw"))


def prompt_seed(run_seed: int, key: int, level: int = 0) -> int:
  """The sampling seed of a prompt (its global mixture element `key`) at hint level `level`."""
  return int(np.random.SeedSequence([run_seed, key, level]).generate_state(1)[0] >> 1)
