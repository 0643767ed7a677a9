"""Generation with images and videos: a tiny random KeyeVL, the demo tokenizer and demo data.

The vision tower runs once in prefill; decoding continues the 3D positions with rope_delta. The check is
against a full forward of the whole model over prompt + generated tokens (vision scattered, positions
max+1, max+2, ... after the prompt)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from keye_jax.cli.generate import generate_cli
from keye_jax.evaluate import run_eval
from keye_jax.generate import Sampler, SamplingParams, encode_messages
from keye_jax.model import KeyeVL
from keye_jax.processing.vision_layout import vision_layout
from tests.tiny_demo import tiny_demo


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("demo")
  tok, cfg = tiny_demo(root, seed=1)
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  records = [json.loads(x) for x in (root / "data" / "test.jsonl").read_text().splitlines()]
  # One sampler for every test here, all batches of two rows: the compiled programs are shared.
  sampler = Sampler(model, tok, stop_token_ids=(), batch_buckets=(2,))
  return root, tok, model, records, sampler


def _user(record, root):
  from keye_jax.evaluate.demo import _absolute
  return _absolute([m for m in record["messages"] if m["role"] == "user"], str(root / "data"))


def test_vision_generation_equals_full_forward(setup):
  root, tok, model, records, sampler = setup
  picks = [next(r for r in records if r["category"] == c) for c in ("color", "video_event")]
  prompts = [encode_messages(_user(r, root), tok) for r in picks]
  assert all(p.pixel_values is not None for p in prompts)
  got = sampler.generate(prompts, SamplingParams(max_new_tokens=6))
  forward = nnx.jit(lambda m, b: m(b))
  for p, g in zip(prompts, got):
    n, new = len(p.input_ids), np.asarray(g.tokens[:-1])
    ids = np.concatenate([p.input_ids, new])[None]
    after = p.position_ids.max() + 1 + np.arange(len(new))
    pos = np.concatenate([p.position_ids, np.broadcast_to(after, (3, len(new)))], 1)[:, None]
    patches = len(p.pixel_values)
    batch = dict(input_ids=ids, segment_ids=np.ones_like(ids), position_ids=pos,
                 pixel_values=p.pixel_values[None],
                 **{k: v[None] for k, v in vision_layout(p.grids_hw, patches, 2).items()})
    logits = forward(model, {k: jnp.asarray(v) for k, v in batch.items()})
    logp = np.asarray(jax.nn.log_softmax(logits, -1))[0, n - 1:]
    np.testing.assert_array_equal(logp.argmax(-1), g.tokens)
    np.testing.assert_allclose(logp[np.arange(len(g.tokens)), g.tokens], g.logprobs, atol=1e-4)


def test_generate_cli_streams_and_eval_runs_on_demo(setup, tmp_path):
  root, tok, model, records, sampler = setup
  image = next(r for r in records if r["category"] == "shape")
  path = _user(image, root)[0]["content"][0]["image"]
  pieces = []
  out = generate_cli(model, tok, "What shape is this?", images=[path], max_new_tokens=12, temperature=0.7,
                     stream=pieces.append, sampler=sampler)
  assert out["tokens"] >= 1 and "".join(pieces) == out["text"]
  res = run_eval(model, tok, "demo", str(root / "data"), str(tmp_path), batch_size=2, max_new_tokens=6, limit=4,
                 sampler=sampler)
  assert res["benchmark"] == "demo" and res["n"] == 4
  lines = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
  assert len(lines) == 4 and not any(r.get("error") for r in lines)
  # The outputs are the sampler's own greedy generations for the same prompts (the harness adds nothing),
  # and the accuracy is what the predictions say, each score recomputed from its output.
  from keye_jax.evaluate import demo
  from keye_jax.evaluate.scoring import is_correct
  items = demo.load(str(root / "data"))[:4]
  greedy = sampler.generate([encode_messages(it.messages, tok) for it in items], SamplingParams(max_new_tokens=6))
  assert [r["id"] for r in lines] == [it.id for it in items]
  assert [r["output"] for r in lines] == [g.text for g in greedy]
  scores = [float(is_correct(g.text, it.answer, "choice", it.options)) for it, g in zip(items, greedy)]
  assert [r["score"] for r in lines] == scores
  assert res["accuracy"] == pytest.approx(sum(scores) / 4)
