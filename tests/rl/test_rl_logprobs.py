"""The first ratio is exactly 1: the log-probs the sampler returns for its tokens (the old policy) and the
trainer's log-probs of the same tokens in packed RL rows agree to fp32 precision, for a prompt with an
image and one with a video (slow/fast frames), through the RL prompt stream's decoder and the loop's
rollout adapter (parameters handed over in place); at temperature 1 and at 0.7, where both sides measure
softmax(logits / temperature), the policy the rollouts sample."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from keye_jax.model import KeyeVL
from tests.tiny_demo import tiny_demo
from train.data.decode import token_ids
from train.data.sources import ManifestSource
from train.model_state import ModelShape
from train.rl.batch import Response, pack_responses
from train.rl.config import RLConfig
from train.rl.prompts import PromptDecoder
from train.rl.rollouts import Rollouts, to_prompt
from train.rl.update import aligned_logprobs, rl_loss_fn


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("rl_demo")
  tok, cfg = tiny_demo(root, seed=2)
  return root, tok, cfg


def _prompt(root, tok, manifest):
  src = ManifestSource(str(root / "data" / manifest))
  p = PromptDecoder(tok, 0)(src[0])
  assert "_bad" not in p and "_skip" not in p, p
  return p


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_and_trainer_logprobs_agree_so_the_first_ratio_is_one(setup, temperature):
  root, tok, cfg = setup
  prompts = [_prompt(root, tok, "train_reasoning.jsonl"), _prompt(root, tok, "train_video.jsonl")]
  assert prompts[0]["pixel_values"] is not None and prompts[1]["pixel_values"] is not None
  assert len(prompts[1]["grids_hw"]) > 1  # video frames
  shape = ModelShape.of(cfg)
  params = shape.flatten(KeyeVL(cfg, rngs=nnx.Rngs(3)))
  rl = RLConfig(max_new_tokens=12, temperature=temperature, group_size=2, minibatches=1)
  rollouts = Rollouts(shape, tok, None, rl)
  rollouts.set_weights(params)
  groups = rollouts.sample([to_prompt(p) for p in prompts], [11, 12], 2)
  responses = [Response(p["input_ids"], p["position_ids"], p["pixel_values"], p["grids_hw"],
                        np.asarray(x.tokens, np.int32), np.asarray(x.logprobs, np.float32), 1.0 if k else -1.0)
               for p, grp in zip(prompts, groups) for k, x in enumerate(grp)]
  assert all(len(r.tokens) > 0 for r in responses)
  n_patch = sum(len(p["pixel_values"]) for p in prompts) * 2
  seq = sum(len(r.prompt_ids) + len(r.tokens) for r in responses)
  batch = pack_responses(responses, seq_len=seq + 8, num_patches=-(-n_patch // 4) * 4 + 4, rows=2,
                         ids=token_ids(tok))
  jb = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  lp = np.asarray(jax.jit(lambda prm, b: aligned_logprobs(shape.build(prm), b, chunk=64,
                                                          temperature=temperature))(params, jb))
  mask = batch["loss_mask"]
  assert mask.sum() == sum(len(r.tokens) for r in responses)
  diff = np.abs(lp[mask] - batch["old_logprobs"][mask])
  assert diff.max() <= 1e-5, diff.max()
  # ... so the GSPO ratio of every response is 1 and nothing is clipped
  total, n, m = jax.jit(lambda prm, b: rl_loss_fn(rl, chunk=64)(shape.build(prm), b))(params, jb)
  assert float(n) == 4
  np.testing.assert_allclose(float(m["ratio_sum"]) / 4, 1.0, atol=1e-5)
  assert float(m["clip_sum"]) == 0.0


def test_a_sampled_vision_pad_token_is_an_ordinary_token_to_the_trainer(setup):
  """A response may contain an image/video pad id (the sampler can draw any token; to the decoder it is an
  ordinary token). The trainer must not give it vision features: before, the first such token in a packed
  row took the next example's first vision token and shifted every later image in the row by one (seen in
  the demo's RL: ratios of 0.77 on a clean response that shared a row with one)."""
  from tests.generate.test_rollout import _forward_logprobs
  root, tok, cfg = setup
  src = ManifestSource(str(root / "data" / "train_reasoning.jsonl"))
  prompts = [PromptDecoder(tok, 0)(src[i]) for i in range(2)]
  assert all(p["pixel_values"] is not None for p in prompts)
  shape = ModelShape.of(cfg)
  model = KeyeVL(cfg, rngs=nnx.Rngs(3))
  params = shape.flatten(model)
  ids = token_ids(tok)
  tokens = [np.asarray([40, ids.image_pad, 41, ids.video_pad, 42], np.int32), np.asarray([43, 44, 45], np.int32)]
  # the reference: each response alone, only its prompt's pad tokens taking vision features (the sampler's view)
  want = [_forward_logprobs(model, to_prompt(p), t)[np.arange(len(t)), t] for p, t in zip(prompts, tokens)]
  responses = [Response(p["input_ids"], p["position_ids"], p["pixel_values"], p["grids_hw"], t,
                        np.zeros(len(t), np.float32), 1.0) for p, t in zip(prompts, tokens)]
  n_patch = sum(len(p["pixel_values"]) for p in prompts)
  seq = sum(len(r.prompt_ids) + len(r.tokens) for r in responses)
  batch = pack_responses(responses, seq_len=seq + 8, num_patches=-(-n_patch // 4) * 4, rows=1, ids=ids)
  assert (batch["segment_ids"][0] == 2).any()  # both responses share the row, the one with pad ids first
  jb = {k: jax.numpy.asarray(v) for k, v in batch.items()}
  lp = np.asarray(jax.jit(lambda prm, b: aligned_logprobs(shape.build(prm), b, chunk=64))(params, jb))[0]
  for s, w in zip((1, 2), want):
    got = lp[(batch["segment_ids"][0] == s) & batch["loss_mask"][0]]
    np.testing.assert_allclose(got, w, atol=1e-5, err_msg=f"response {s}")


def test_rl_samples_from_the_policy_it_trains():
  """A greedy "policy" gives no signal, and top-k/top-p would sample a distribution the trainer's log-probs
  do not measure: the config refuses both by name."""
  from keye_jax.config import ConfigError
  from train.rl.config import load_rl_config
  with pytest.raises(ConfigError, match=r"rl.temperature=0.0 must be > 0"):
    RLConfig(temperature=0.0)
  with pytest.raises(ConfigError, match=r"unknown config key rl.top_p"):
    load_rl_config(str(pathlib.Path(__file__).parents[2] / "configs/demo/rl.yaml"), ["rl.top_p=0.9"])
