"""The rollout engine: continuous batching gives what one-request-at-a-time sampling gives, log-probs
equal a full forward's, vision and prefill run once per prompt, fixed shapes never recompile.

A tiny random KeyeVL with a vision tower; image and video prompts are laid out by hand (vision start,
pad tokens, vision end, text) with 3D position ids from `processing.positions`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from keye_jax.config import KeyeConfig
from keye_jax.generate import Prompt, Sampler, SamplingParams
from keye_jax.model import KeyeVL, scatter_vision
from keye_jax.processing.positions import position_ids
from keye_jax.processing.vision_layout import vision_layout
from keye_jax.rollout import Request, RolloutEngine
from tests.generate.test_sampler import CharTokenizer
from tests.model.hf_reference import tiny_text_config, tiny_vision_config

IMG, VID, VSTART, VEND = 3, 4, 5, 6
BUCKETS = dict(length_buckets=(16, 32, 64), new_token_buckets=(16,), patch_buckets=(64, 256))


@pytest.fixture(scope="module")
def model():
  cfg = KeyeConfig(text=tiny_text_config(), vision=tiny_vision_config(), attention_impl="xla",
                   image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
  return KeyeVL(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model):
  """Shared by the tests below so they reuse compiled programs."""
  return RolloutEngine(model, CharTokenizer(), slots=4, stop_token_ids=(), chunk=4, **BUCKETS)


def _text(rng, n):
  return Prompt(rng.integers(10, 96, n).astype(np.int32))


def _vision(rng, grids, token, n_text):
  """One block per (h, w) grid (an image, or a video's frames), each wrapped in vision start/end."""
  dim = 3 * 14 * 14
  ids = []
  for h, w in grids:
    ids += [VSTART] + [token] * (h * w // 4) + [VEND]
  ids = np.concatenate([ids, rng.integers(10, 96, n_text)]).astype(np.int32)
  grids = np.asarray(grids)
  pos, _ = position_ids(ids, grids, (IMG, VID), 2)
  pixels = rng.standard_normal((int(sum(h * w for h, w in grids)), dim)).astype(np.float32)
  return Prompt(ids, pos, pixels, grids)


def _mixed_prompts(seed):
  rng = np.random.default_rng(seed)
  return [_text(rng, 5), _vision(rng, [(4, 4)], IMG, 7), _text(rng, 23), _vision(rng, [(4, 4), (4, 4)], VID, 3),
          _vision(rng, [(8, 4)], IMG, 12), _text(rng, 2)]


def _forward_logprobs(model, prompt, tokens):
  """log_softmax of a full forward over prompt + tokens[:-1], rows predicting `tokens`: (len(tokens), V)."""
  n, new = len(prompt.input_ids), np.asarray(tokens[:-1], np.int32)
  ids = np.concatenate([prompt.input_ids, new])[None]
  base = (np.broadcast_to(np.arange(n), (3, n)) if prompt.position_ids is None else prompt.position_ids)
  after = base.max() + 1 + np.arange(len(new))
  pos = np.concatenate([base, np.broadcast_to(after, (3, len(new)))], 1)[:, None]
  batch = dict(input_ids=ids, segment_ids=np.ones_like(ids), position_ids=pos)
  if prompt.pixel_values is not None:
    batch.update(pixel_values=prompt.pixel_values[None],
                 **{k: v[None] for k, v in vision_layout(prompt.grids_hw, len(prompt.pixel_values), 2).items()})
  logits = _forward(model, {k: jnp.asarray(v) for k, v in batch.items()}, n)
  return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), -1))[0, n - 1:]


@nnx.jit(static_argnums=2)
def _forward(m, b, n_prompt):
  """KeyeVL's forward, except that only the prompt's vision pad tokens take vision features (a sampled
  token may be an image/video pad id: to the decoder that is an ordinary token)."""
  ids = b["input_ids"]
  x = m.decoder.embed(ids)
  if "pixel_values" in b:
    feats = m.projector(m.vision(b["pixel_values"], b["patch_segment_ids"], b["patch_pos"]), b["merge_index"])
    x = scatter_vision(x, feats, m.vision_token_mask(ids) & (jnp.arange(ids.shape[1]) < n_prompt))
  return m.decoder.logits(m.decoder.hidden_states(x, b["position_ids"], b["segment_ids"]))


def test_continuous_batching_equals_one_request_at_a_time(engine):
  """Greedy and sampled requests, mixed prompt lengths, images and videos, n samples each, more samples
  than slots and different budgets: every sample is what it is when its request runs alone."""
  prompts = _mixed_prompts(0)
  reqs = []
  for i, p in enumerate(prompts):
    hot = i % 3 != 0
    params = [SamplingParams(max_new_tokens=int(m), temperature=1.0 if hot else 0.0, top_k=5 if i == 4 else 0,
                             top_p=0.9 if i == 2 else 1.0, seed=10 + i) for m in (12, 3, 7)]
    reqs.append(Request(p, params, 3))
  together = engine.generate(reqs)
  assert together.slot_utilisation > 0.5
  for r, req in enumerate(reqs):
    alone = engine.generate([req])
    for j, (a, b) in enumerate(zip(together[r], alone[0])):
      assert a.tokens == b.tokens, (r, j)
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6, err_msg=f"request {r} sample {j}")
    assert [len(g.tokens) for g in together[r]] == [12, 3, 7]
  sampled = together[1]
  assert sampled[0].tokens[:3] != sampled[1].tokens or sampled[0].tokens[:3] != sampled[2].tokens[:3]


def test_greedy_equals_the_sampler(model, engine):
  """The engine's greedy tokens and log-probs are the batch Sampler's (itself checked against transformers)."""
  prompts = _mixed_prompts(1)[:3]
  want = Sampler(model, stop_token_ids=(), batch_buckets=(4,), **BUCKETS).generate(prompts, SamplingParams(max_new_tokens=10))
  got = engine.generate([Request(p, SamplingParams(max_new_tokens=10), 2) for p in prompts])
  for w, grp in zip(want, got):
    for g in grp:
      assert g.tokens == w.tokens
      np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)


@pytest.mark.parametrize("kind", [0, 1, 3])   # text, image, video
def test_logprobs_equal_a_full_forward(model, engine, kind):
  """At temperature 1 (no top-k/top-p) the returned log-probs are the model's log_softmax of the sampled
  tokens, as a full forward over prompt + response computes them (fp32, <= 1e-5)."""
  prompt = _mixed_prompts(2)[kind]
  out = engine.generate([Request(prompt, SamplingParams(max_new_tokens=14, temperature=1.0, seed=kind), 2)])
  for g in out[0]:
    logp = _forward_logprobs(model, prompt, g.tokens)
    np.testing.assert_allclose(g.logprobs, logp[np.arange(len(g.tokens)), g.tokens], atol=1e-5, rtol=0)


def test_vision_once_and_prefill_once_per_prompt(engine):
  """8 samples of each of 4 prompts (an image and a video among them) through 4 slots: 2 encoder calls,
  4 prefills."""
  calls = {"encode": 0, "prefill": 0}
  real = {k: getattr(engine, "_" + k) for k in calls}

  def counting(name):
    def call(*a, **kw):
      calls[name] += 1
      return real[name](*a, **kw)
    return call

  prompts = _mixed_prompts(3)[:4]
  try:
    engine._encode, engine._prefill = counting("encode"), counting("prefill")
    out = engine.generate([Request(p, SamplingParams(max_new_tokens=5, temperature=1.0, seed=i), 8)
                           for i, p in enumerate(prompts)])
  finally:
    engine._encode, engine._prefill = real["encode"], real["prefill"]
  assert calls == {"encode": 2, "prefill": 4}
  assert (out.vision_encodes, out.prefills) == (2, 4)
  assert out.vision_tokens[0] is None and out.vision_tokens[1].shape[1] == 64 // 4   # patch bucket / 2x2 merge
  assert all(len(g) == 8 for g in out)


def test_no_recompiles_across_50_requests_of_mixed_sizes(model):
  engine = RolloutEngine(model, slots=4, stop_token_ids=(), **BUCKETS)
  rng = np.random.default_rng(4)
  for call in range(5):
    reqs = []
    for k in range(10):
      n_text = int(rng.integers(1, 60))
      p = _text(rng, n_text) if k % 3 else _vision(rng, [(4, 4)] if k % 2 else [(4, 8)], IMG, min(n_text, 20))
      params = SamplingParams(max_new_tokens=int(rng.integers(1, 17)), temperature=float(rng.choice([0.0, 0.7, 1.0])),
                              top_k=int(rng.choice([0, 3])), top_p=float(rng.choice([1.0, 0.8])), seed=k,
                              stop_token_ids=tuple(int(x) for x in rng.integers(10, 96, int(rng.integers(0, 3)))))
      reqs.append(Request(p, params, int(rng.integers(1, 4))))
    reqs[0] = Request(_text(rng, 60), SamplingParams(max_new_tokens=16, temperature=1.0), 1)  # largest bucket
    engine.generate(reqs)
    if call == 0:
      first = dict(engine.trace_counts)
  counts = dict(engine.trace_counts)
  # The tail phase's smaller slot states compile once each (slot counts 4 and 1 here), whenever first met.
  tail = len(engine.tail_slots)
  assert {k: v for k, v in counts.items() if k not in ("decode", "shrink")} == \
      {k: v for k, v in first.items() if k not in ("decode", "shrink")}, (first, counts)
  assert counts["decode"] <= 1 + tail and counts.get("shrink", 0) <= tail * (tail + 1) // 2, counts
  assert counts["new_carry"] == 1 and counts["insert"] <= 3, counts


def test_tail_phase_moves_the_last_rows_to_fewer_slots(model):
  """Once nothing waits, the last running rows continue in a smaller slot state (fewer rows computed
  per step) and every sample is exactly what it is without that phase; the full state is reused after."""
  rng = np.random.default_rng(5)
  prompts = [_text(rng, int(n)) for n in (9, 30, 17, 50)]
  reqs = [Request(p, [SamplingParams(max_new_tokens=m, temperature=1.0, seed=i) for m in (16, 2, 3, 2)], 4)
          for i, p in enumerate(prompts)]
  kw = dict(slots=8, stop_token_ids=(), **BUCKETS)
  with_tail, without = RolloutEngine(model, tail_slots=(2,), **kw), RolloutEngine(model, tail_slots=(), **kw)
  a, b = with_tail.generate(reqs), without.generate(reqs)
  for ga, gb in zip(a, b):
    for x, y in zip(ga, gb):
      assert x.tokens == y.tokens
      np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-6)
  assert a.decode_steps == b.decode_steps and a.slot_steps < b.slot_steps == b.decode_steps * 8
  assert a.slot_utilisation > b.slot_utilisation and with_tail.trace_counts["shrink"] == 1
  again = with_tail.generate(reqs)                                  # the kept full state: no new compile
  assert [g.tokens for g in again[3]] == [g.tokens for g in a[3]] and with_tail.trace_counts["new_carry"] == 1
  # The later prompt buckets and the tail decode were compiled ahead on the background thread, and the call
  # used those compiles (a miss would trace again).
  counts = with_tail.trace_counts
  assert (counts["prefill"], counts["insert"], counts["decode"], counts["shrink"]) == (3, 3, 2, 1), counts


def test_slot_reuse_after_stop_strings(engine):
  """Stop strings end samples early and free their slots for the waiting ones (6 samples, 4 slots)."""
  rng = np.random.default_rng(5)
  prompts = [_text(rng, 6), _text(rng, 9), _text(rng, 20)]
  free = engine.generate([Request(p, SamplingParams(max_new_tokens=16, temperature=1.0, seed=i), 2)
                          for i, p in enumerate(prompts)])
  stops = [g[0].text[4:6] for g in free]
  cut = engine.generate([Request(p, SamplingParams(max_new_tokens=16, temperature=1.0, seed=i, stop_strings=(s,)), 2)
                         for i, (p, s) in enumerate(zip(prompts, stops))])
  for f_grp, c_grp, s in zip(free, cut, stops):
    for f, c in zip(f_grp, c_grp):
      if s in f.text:
        assert c.text == f.text[:f.text.index(s)] and c.finish_reason == "stop"
        assert c.tokens == f.tokens[:len(c.tokens)] and len(c.tokens) < len(f.tokens)
      else:
        assert c.tokens == f.tokens and c.finish_reason == "length"
  assert cut.busy_slot_steps < free.busy_slot_steps


@pytest.mark.slow  # 15 s; the Sampler set_weights test stays in CI
def test_set_weights_changes_outputs_without_recompiling(model):
  from train.model_state import ModelShape
  engine = RolloutEngine(model, slots=2, stop_token_ids=(), **BUCKETS)
  reqs = [Request(p, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1), 2) for p in _mixed_prompts(6)[:2]]
  before = engine.generate(reqs)
  counts = dict(engine.trace_counts)
  other = KeyeVL(model.cfg, rngs=nnx.Rngs(7))
  shape = ModelShape.of(model.cfg)
  engine.set_weights(shape.build(shape.flatten(other)))       # what the RL trainer passes every step
  after = engine.generate(reqs)
  assert dict(engine.trace_counts) == counts
  fresh = RolloutEngine(other, slots=2, stop_token_ids=(), **BUCKETS).generate(reqs)
  assert [[g.tokens for g in grp] for grp in after] == [[g.tokens for g in grp] for grp in fresh]
  assert [[g.tokens for g in grp] for grp in after] != [[g.tokens for g in grp] for grp in before]
