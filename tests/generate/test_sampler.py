"""The sampler against transformers' generate (same random weights, fp32), and its own invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from keye_jax.config import KeyeConfig
from keye_jax.generate import Prompt, Sampler, SamplingParams, bucket, pack_prompts, split_thinking
from keye_jax.model import KeyeVL
from keye_jax.params import set_flat
from tests.model.hf_reference import hf_qwen3, hf_state_to_flat, tiny_text_config

NEW = 32


@pytest.fixture(scope="module")
def pair():
  t = tiny_text_config()
  hf = hf_qwen3(t, seed=3)
  cfg = KeyeConfig(text=t, vision=None, attention_impl="xla")
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  set_flat(model, hf_state_to_flat(hf.state_dict(), cfg))
  return t, hf, model


@pytest.fixture(scope="module")
def sampler(pair):
  """Shared by the tests below so they reuse compiled programs (a new Sampler compiles afresh)."""
  return Sampler(pair[2], CharTokenizer(), stop_token_ids=(), batch_buckets=(2, 4), length_buckets=(16, 32),
                 new_token_buckets=(32,), stream_chunk=8)


def _prompts(rng, lengths, vocab):
  return [rng.integers(1, vocab, n).astype(np.int32) for n in lengths]


def _hf_greedy(hf, prompts, new):
  s = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), s), np.int64)
  mask = np.zeros((len(prompts), s), np.int64)
  for r, p in enumerate(prompts):
    ids[r, s - len(p):], mask[r, s - len(p):] = p, 1
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                      min_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
  return out[:, s:].numpy()


def test_greedy_matches_transformers_generate_batched_left_padded(pair, sampler):
  t, hf, model = pair
  prompts = _prompts(np.random.default_rng(0), [5, 17, 11, 3], t.vocab_size)
  want = _hf_greedy(hf, prompts, NEW)
  got = sampler.generate([Prompt(p) for p in prompts], SamplingParams(max_new_tokens=NEW))
  for r, g in enumerate(got):
    assert g.finish_reason == "length" and len(g.tokens) == NEW
    np.testing.assert_array_equal(np.asarray(g.tokens), want[r], err_msg=f"row {r}")


@pytest.mark.slow   # test_decoder and test_rollout pin cached decoding; ~8 s idle
def test_cached_decoding_equals_full_recomputation(pair, sampler):
  """Every generated token is the argmax of a full forward over prompt + generated prefix, and its
  log-prob matches that forward's log_softmax."""
  t, _, model = pair
  prompts = _prompts(np.random.default_rng(1), [9, 4], t.vocab_size)
  got = sampler.generate([Prompt(p) for p in prompts], SamplingParams(max_new_tokens=20))
  forward = nnx.jit(lambda m, ids: jax.nn.log_softmax(m.decoder(ids), axis=-1))
  for p, g in zip(prompts, got):
    seq = np.concatenate([p, g.tokens[:-1]])[None]
    logp = np.asarray(forward(model, jnp.asarray(seq)))[0, len(p) - 1:]
    np.testing.assert_array_equal(logp.argmax(-1), g.tokens)
    np.testing.assert_allclose(logp[np.arange(len(g.tokens)), g.tokens], g.logprobs, atol=1e-4)


def test_bucketing_no_recompilation_across_20_prompts(pair):
  t, _, model = pair
  sampler = Sampler(model, stop_token_ids=(), length_buckets=(16, 32), new_token_buckets=(8,))
  rng = np.random.default_rng(2)
  lengths = rng.integers(2, 32, 20)
  for i, p in enumerate(_prompts(rng, lengths, t.vocab_size)):  # max_new_tokens and stop ids vary too
    sampler.generate([Prompt(p)], SamplingParams(max_new_tokens=int(rng.integers(2, 9)),
                                                 stop_token_ids=tuple(range(i % 4))))
  n_buckets = len({bucket(int(n), (16, 32)) for n in lengths})
  assert n_buckets == 2
  assert sampler.trace_counts["prefill"] == n_buckets, sampler.trace_counts
  assert sampler.trace_counts["decode"] == n_buckets, sampler.trace_counts


def test_per_row_stopping_leaves_other_rows_unchanged(pair, sampler):
  t, _, model = pair
  prompts = [Prompt(p) for p in _prompts(np.random.default_rng(4), [6, 10], t.vocab_size)]
  free = sampler.generate(prompts, SamplingParams(max_new_tokens=16))
  stop = free[0].tokens[5]
  first = free[0].tokens.index(stop)
  got = sampler.generate(prompts, SamplingParams(max_new_tokens=16, stop_token_ids=(stop,)))
  assert got[0].tokens == free[0].tokens[:first + 1] and got[0].finish_reason == "stop"
  if stop not in free[1].tokens:
    assert got[1].tokens == free[1].tokens and got[1].finish_reason == "length"
  else:
    assert got[1].tokens == free[1].tokens[:free[1].tokens.index(stop) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(pair, sampler):
  t, _, model = pair
  prompts = [Prompt(p) for p in _prompts(np.random.default_rng(5), [7, 12], t.vocab_size)]
  hot = dict(max_new_tokens=24, temperature=1.5)
  a = sampler.generate(prompts, SamplingParams(**hot, seed=1))
  b = sampler.generate(prompts, SamplingParams(**hot, seed=1))
  c = sampler.generate(prompts, SamplingParams(**hot, seed=2))
  assert [g.tokens for g in a] == [g.tokens for g in b]
  assert [g.tokens for g in a] != [g.tokens for g in c]
  greedy = sampler.generate(prompts, SamplingParams(max_new_tokens=24))
  k1 = sampler.generate(prompts, SamplingParams(**hot, top_k=1, seed=3))
  p0 = sampler.generate(prompts, SamplingParams(**hot, top_p=1e-6, seed=4))
  assert [g.tokens for g in k1] == [g.tokens for g in greedy] == [g.tokens for g in p0]


def test_top_k_and_top_p_restrict_the_support():
  from keye_jax.generate import sample_token
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  sample = jax.jit(sample_token, static_argnames="greedy")
  draw = lambda k, p: np.asarray(sample(logits, jax.random.key(0), 1.0, k, p, greedy=False)[0])
  assert set(draw(2, 1.0)) == {0, 1}
  assert set(draw(0, 0.7)) == {0, 1}           # 0.5 < 0.7 so the second token is still needed
  assert set(draw(0, 1.0)) == {0, 1, 2, 3}
  freq = np.bincount(draw(0, 1.0), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


class CharTokenizer:
  """id i <-> one letter; enough to test text-level stopping and streaming."""
  letters = "abcdefghijklmnopqrstuvwxyz <>/"

  def decode(self, ids, skip_special_tokens=True):
    return "".join(self.letters[i % len(self.letters)] for i in ids)


def test_stop_strings_and_streaming(pair, sampler):
  t, _, model = pair
  prompt = [Prompt(_prompts(np.random.default_rng(6), [8], t.vocab_size)[0])]
  free = sampler.generate(prompt, SamplingParams(max_new_tokens=24))[0]
  stop = free.text[9:11]
  pieces = []
  got = sampler.generate(prompt, SamplingParams(max_new_tokens=24, stop_strings=(stop,)),
                         stream=lambda r, s: pieces.append(s))[0]
  cut = free.text.index(stop)
  assert got.text == free.text[:cut] and got.finish_reason == "stop"
  assert "".join(pieces) == got.text
  assert stop in sampler.decode(got.tokens) and stop not in sampler.decode(got.tokens[:-1])


def test_split_thinking_and_pack_prompts_positions():
  assert split_thinking("<think>\nlet me see\n</think>\n\nB") == ("let me see", "B")
  assert split_thinking("plain answer") == ("", "plain answer")
  pos = np.array([[0, 1, 2, 2, 3], [0, 1, 2, 3, 3], [0, 1, 2, 2, 2]])
  b = pack_prompts([Prompt(np.arange(5), pos), Prompt(np.arange(3))], seq_len=8, batch_size=4,
                   num_patches=None)
  np.testing.assert_array_equal(b["segment_ids"][0], [0, 0, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(b["position_ids"][:, 0, :3], 1)
  np.testing.assert_array_equal(b["rope_delta"][:2], [4 - 8, 3 - 8])
  assert b["dummy"].tolist() == [False, False, True, True]


@pytest.mark.slow   # sharding parity is pinned by test_decoder and the RL multi-process tests; ~17 s idle
def test_sharded_sampler_matches_single_device():
  """Mesh data=2 x tensor=2 on 4 virtual CPU devices (own process: the device count is fixed at start)."""
  import subprocess
  import sys
  r = subprocess.run([sys.executable, "-m", "tests.generate.sharded_generate"], capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr[-2000:]


def test_logprobs_are_those_of_the_sampled_distribution():
  """temperature / top-k / top-p: log-probs under the renormalised distribution the token came from; at
  temperature 1 without filters exactly the model's log_softmax (the RL contract); greedy: log_softmax."""
  from keye_jax.generate import sample_token
  logits = jax.random.normal(jax.random.key(0), (6, 50)) * 3
  sample = jax.jit(sample_token, static_argnames="greedy")
  raw = np.asarray(jax.nn.log_softmax(logits, -1))
  rows = np.arange(6)
  tok, lp = sample(logits, jax.random.key(1), 1.0, 0, 1.0, greedy=False)
  np.testing.assert_array_equal(np.asarray(lp), raw[rows, np.asarray(tok)])
  tok, lp = sample(logits, jax.random.key(1), 0.0, 0, 1.0, greedy=True)
  np.testing.assert_array_equal(np.asarray(lp), raw[rows, np.asarray(tok)])
  tok, lp = sample(logits, jax.random.key(2), 0.5, 5, 0.9, greedy=False)
  x = np.asarray(logits, np.float64) / 0.5
  for r in range(6):
    order = np.argsort(-x[r])[:5]
    p = np.exp(x[r, order] - x[r, order].max())
    p /= p.sum()
    kept = order[:int(np.sum(np.cumsum(p) - p < 0.9))]
    z = np.log(np.exp(x[r, kept] - x[r, kept].max()).sum()) + x[r, kept].max()
    assert int(tok[r]) in kept
    np.testing.assert_allclose(float(lp[r]), x[r, int(tok[r])] - z, rtol=1e-5, atol=1e-5)


def test_set_weights_changes_outputs_without_recompiling(pair):
  t, _, model = pair
  sampler = Sampler(model, stop_token_ids=(), length_buckets=(16,), new_token_buckets=(8,))
  prompts = [Prompt(p) for p in _prompts(np.random.default_rng(7), [6, 9], t.vocab_size)]
  params = SamplingParams(max_new_tokens=8)
  before = sampler.generate(prompts, params)
  other = KeyeVL(model.cfg, rngs=nnx.Rngs(11))
  sampler.set_weights(other)
  after = sampler.generate(prompts, params)
  assert [g.tokens for g in after] != [g.tokens for g in before]
  assert [g.tokens for g in after] == [g.tokens for g in Sampler(other, stop_token_ids=(), length_buckets=(16,),
                                                                 new_token_buckets=(8,)).generate(prompts, params)]
  sampler.set_weights(nnx.state(model))
  assert [g.tokens for g in sampler.generate(prompts, params)] == [g.tokens for g in before]
  assert sampler.trace_counts["prefill"] == 1 and sampler.trace_counts["decode"] == 1, sampler.trace_counts
  with pytest.raises(ValueError, match="set_weights"):
    sampler.set_weights(KeyeVL(KeyeConfig(text=tiny_text_config(vocab_size=t.vocab_size * 2), vision=None),
                               rngs=nnx.Rngs(0)))
