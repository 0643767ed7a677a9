"""Vision once per RL step: the rollout encodes each prompt's images/frames once; with the tower frozen, the
RL update (the trainer's own jitted step) and the reference pass read those features from the packed rows
and never run the tower, and give the loss, gradients and log-probs that re-encoding the pixels gives. A
trainable tower is still re-encoded. Tower runs are counted at trace time (VisionTower.__call__ wrapped)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# A rollout engine, the RL step and the reference pass are compiled: ~35 s idle, ~65 s loaded. The fast
# suite covers encode-once in tests/generate/test_rollout.py; this file runs with -m slow.
pytestmark = pytest.mark.slow
from flax import nnx

from keye_jax.model import KeyeVL
from keye_jax.processing.vision_layout import vision_layout
from keye_jax.sharding import make_mesh
from keye_jax.vision import VisionTower
from tests.tiny_demo import tiny_demo
from train.config import OptimizerConfig
from train.data.config import DataConfig
from train.data.decode import token_ids
from train.data.sources import ManifestSource
from train.model_state import ModelShape
from train.rl.batch import Response, pack_responses, reused_vision_dim
from train.rl.config import RLConfig, RLRunConfig
from train.rl.prompts import PromptDecoder
from train.rl.rollouts import Rollouts, to_prompt
from train.rl.update import make_ref_logprobs, rl_loss_fn, to_global
from train.step import init_state, make_step

ROWS = 4


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
  """An image prompt and a video prompt (several frames), 2 samples each from a tiny Keye-VL."""
  root = tmp_path_factory.mktemp("vision_reuse")
  tok, cfg = tiny_demo(root, seed=2)
  prompts = [PromptDecoder(tok, 0)(ManifestSource(str(root / "data" / m))[0])
             for m in ("train_reasoning.jsonl", "train_video.jsonl")]
  assert prompts[0]["pixel_values"] is not None and len(prompts[1]["grids_hw"]) > 1  # image; video frames
  shape = ModelShape.of(cfg)
  params = shape.flatten(KeyeVL(cfg, rngs=nnx.Rngs(3)))
  rl = RLConfig(max_new_tokens=12, temperature=1.0, group_size=2, minibatches=1, prompts_per_step=2, kl_coef=0.1)
  rollouts = Rollouts(shape, tok, None, rl, keep_features=True)
  rollouts.set_weights(params)
  outs = []
  generate = rollouts.engine.generate
  rollouts.engine.generate = lambda reqs: outs.append(generate(reqs)) or outs[-1]
  groups = rollouts.sample([to_prompt(p) for p in prompts], [11, 12], 2)
  responses = [Response(p["input_ids"], p["position_ids"], p["pixel_values"], p["grids_hw"],
                        np.asarray(x.tokens, np.int32), np.asarray(x.logprobs, np.float32), 0.5 + k, f)
               for p, grp, f in zip(prompts, groups, rollouts.features) for k, x in enumerate(grp)]
  assert all(len(r.tokens) > 0 for r in responses)
  seq = max(len(r.prompt_ids) + len(r.tokens) for r in responses) + 8
  patches = -(-max(len(p["pixel_values"]) for p in prompts) // 4) * 4
  run_cfg = RLRunConfig(model=cfg, data=DataConfig(seq_len=seq, num_patches=patches, batch_size=ROWS),
                        optimizer=OptimizerConfig(trainable=("projector", "language"), learning_rate=1e-3,
                                                  schedule="constant"),
                        loss_chunk=64, steps=1, rl=dataclasses.replace(rl, max_prompt_len=seq - 12,
                                                                       max_prompt_patches=patches))
  ids = token_ids(tok)
  pack = lambda dim: pack_responses(responses, seq, patches, ROWS, ids, with_ref=True, vision_dim=dim)
  return dict(cfg=cfg, shape=shape, params=params, prompts=prompts, out=outs[-1], features=rollouts.features,
              run_cfg=run_cfg, reuse=pack(reused_vision_dim(cfg, run_cfg.optimizer.trainable)), pixels=pack(0))


@pytest.fixture
def tower_calls(monkeypatch):
  """Counts VisionTower applications in every graph traced while the test runs."""
  calls = []
  call = VisionTower.__call__
  monkeypatch.setattr(VisionTower, "__call__", lambda self, *a: calls.append(1) or call(self, *a))
  return calls


def test_the_rollout_encodes_each_prompt_once_and_keeps_the_towers_output(rollout):
  out, cfg, params = rollout["out"], rollout["cfg"], rollout["params"]
  assert out.vision_encodes == 2 and out.prefills == 2
  tower = rollout["shape"].build(params).vision
  for p, f in zip(rollout["prompts"], rollout["features"]):
    n = len(p["pixel_values"])
    assert f.shape == (n, cfg.vision.hidden_size) and f.dtype == np.float32
    lay = vision_layout(p["grids_hw"], -(-n // 4) * 4)
    pix = np.zeros((len(lay["patch_segment_ids"]), p["pixel_values"].shape[1]), np.float32)
    pix[:n] = p["pixel_values"]
    want = jax.jit(tower)(pix[None], lay["patch_segment_ids"][None], lay["patch_pos"][None])
    np.testing.assert_allclose(f, np.asarray(want[0, :n]), rtol=1e-5, atol=1e-5)


def test_packed_features_sit_where_the_pixels_do(rollout):
  reuse, pixels = rollout["reuse"], rollout["pixels"]
  assert "pixel_values" not in reuse and reuse["vision_features"].shape == (*pixels["pixel_values"].shape[:2], 64)
  for k in pixels:
    if k != "pixel_values":
      np.testing.assert_array_equal(reuse[k], pixels[k], err_msg=k)
  real = pixels["patch_segment_ids"] > 0
  assert real.sum() == 4 * 0 + sum(2 * len(p["pixel_values"]) for p in rollout["prompts"])
  assert np.all(reuse["vision_features"][~real] == 0) and np.any(reuse["vision_features"][real] != 0)


def _grads(rollout, batch, keys):
  """Loss sum and gradients of the GSPO loss over the parameters `keys`, eagerly jitted."""
  shape, params, rl = rollout["shape"], rollout["params"], rollout["run_cfg"].rl
  frozen = {k: v for k, v in params.items() if k not in keys}

  def loss(train):
    return rl_loss_fn(rl, chunk=64)(shape.build({**train, **frozen}), batch)[0]

  return jax.jit(jax.value_and_grad(loss))({k: params[k] for k in keys})


def test_frozen_tower_update_and_reference_never_run_it_and_match_reencoding(rollout, tower_calls):
  """The trainer's RL step and the reference pass on the rows with features trace no tower; their
  reference log-probs, loss, gradient norm and every gradient equal those of re-encoding the pixels."""
  shape, params, run_cfg = rollout["shape"], rollout["params"], rollout["run_cfg"]
  mesh = make_mesh(run_cfg.mesh)
  ref_lp, calls = {}, {}
  for name in ("reuse", "pixels"):
    ref = make_ref_logprobs(shape, mesh, list(rollout[name]), run_cfg.loss_chunk)
    before = len(tower_calls)
    ref_lp[name] = np.asarray(ref(params, to_global(rollout[name], mesh)))
    calls[name] = len(tower_calls) - before
  assert calls == {"reuse": 0, "pixels": 1}  # (the counter sees the tower when the pixels are re-encoded)
  mask = rollout["pixels"]["loss_mask"]
  np.testing.assert_allclose(ref_lp["reuse"][mask], ref_lp["pixels"][mask], rtol=1e-5)
  # The real step (make_step, as `keye rl` builds it) on the rows with features: no tower in its graph.
  batch = dict(rollout["reuse"], ref_logprobs=ref_lp["reuse"])
  fns = make_step(run_cfg, shape, mesh, 1, list(batch), loss_fn=rl_loss_fn(run_cfg.rl, run_cfg.loss_chunk))
  assert sorted(fns.train_keys) == sorted(k for k in params if not k.startswith("vision/"))
  before = len(tower_calls)
  fns.step.lower(init_state(fns, 0, {k: jnp.array(v) for k, v in params.items()}), to_global(batch, mesh))
  assert len(tower_calls) == before  # traced (not compiled here; tests/rl/test_rl_loop.py runs it)
  # Its loss and gradients (the step's loss function, differentiated as the step does) against the pixels'.
  r_loss, r_g = _grads(rollout, batch, fns.train_keys)
  assert len(tower_calls) == before
  p_loss, p_g = _grads(rollout, dict(rollout["pixels"], ref_logprobs=ref_lp["pixels"]), fns.train_keys)
  assert float(p_loss) != 0.0
  np.testing.assert_allclose(float(r_loss), float(p_loss), rtol=1e-5)
  for k in p_g:
    scale = float(np.abs(p_g[k]).max())
    np.testing.assert_allclose(r_g[k], p_g[k], rtol=1e-5, atol=1e-5 * scale + 1e-12, err_msg=k)
  assert float(np.abs(p_g["projector/linear_1/kernel"]).max()) > 0  # the projector trains on reused features


def test_a_trainable_tower_is_re_encoded(rollout, tower_calls):
  cfg, shape, params = rollout["cfg"], rollout["shape"], rollout["params"]
  run_cfg = dataclasses.replace(rollout["run_cfg"], optimizer=OptimizerConfig(learning_rate=1e-3, schedule="constant"))
  assert "vision" in run_cfg.optimizer.trainable and reused_vision_dim(cfg, run_cfg.optimizer.trainable) == 0
  assert reused_vision_dim(dataclasses.replace(cfg, vision=None), ("language",)) == 0
  batch = rollout["pixels"]
  assert "vision_features" not in batch and "pixel_values" in batch
  mesh = make_mesh(run_cfg.mesh)
  fns = make_step(run_cfg, shape, mesh, 1, list(batch), loss_fn=rl_loss_fn(run_cfg.rl, run_cfg.loss_chunk))
  assert any(k.startswith("vision/") for k in fns.train_keys)
  fns.step.lower(init_state(fns, 0, {k: jnp.array(v) for k, v in params.items()}), to_global(batch, mesh))
  assert len(tower_calls) == 1  # traced, not compiled: the step's graph runs the tower on the pixels
