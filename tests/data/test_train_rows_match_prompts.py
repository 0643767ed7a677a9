"""A record's pre-training row (Grain Decoder -> fit_example -> build_row) and its generation prompt
(encode_messages -> pack_prompts) give the model the same inputs and the same logits at the answer, for an
image and a multi-frame video record: what training teaches is what generation and evaluation read."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from keye_jax import batch_layout
from keye_jax.generate import encode_messages, pack_prompts
from keye_jax.model import KeyeVL
from tests.tiny_demo import tiny_demo
from train.data.decode import Decoder, is_bad, token_ids
from train.data.packing import build_row, fit_example
from train.data.sources import open_source


def _row_logits(model, row) -> np.ndarray:
  """(seq_len, vocab) logits of one packed training row."""
  batch = {k: jnp.asarray(np.expand_dims(v, batch_layout.batch_axis(k)))
           for k, v in row.items() if k not in ("loss_mask", "source_ids")}
  return np.asarray(model(batch)[0])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("rows")
  tok, cfg = tiny_demo(root, seed=3)
  return root, tok, KeyeVL(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("manifest", ["train_image.jsonl", "train_video.jsonl"])
def test_training_row_and_prompt_agree(setup, manifest):
  root, tok, model = setup
  path = str(root / "data" / manifest)
  lines = open(path).read().splitlines()
  idx = next(i for i, l in enumerate(lines) if json.loads(l)["category"] not in ("caption", "text"))
  record = json.loads(lines[idx])
  ids = token_ids(tok)
  ex = Decoder(tok, 0)(open_source(path)[idx])
  assert not is_bad(ex), ex
  seq_len, num_patches = 1024, 4096
  row = build_row([fit_example(ex, seq_len, num_patches, ids, "truncate")], seq_len, num_patches, ids)
  first = int(np.argmax(row["loss_mask"]))            # the answer's first token
  train_logits = _row_logits(model, row)[first - 1]

  messages = json.loads(json.dumps(record["messages"][:1]))
  for e in messages[0]["content"]:
    if e["type"] in ("image", "video"):
      e[e["type"]] = os.path.join(root / "data", e[e["type"]])
  prompt = encode_messages(messages, tok, thinking=None)
  if manifest == "train_video.jsonl":
    assert len(prompt.grids_hw) > 1                    # several frames
  assert np.array_equal(row["input_ids"][:first], prompt.input_ids)
  assert np.array_equal(row["position_ids"][:, :first], np.asarray(prompt.position_ids))
  np.testing.assert_array_equal(row["pixel_values"][:len(prompt.pixel_values)], prompt.pixel_values)
  packed = pack_prompts([prompt], seq_len=first, batch_size=1, num_patches=len(prompt.pixel_values))
  packed = {k: jnp.asarray(v) for k, v in packed.items() if k not in ("rope_delta", "dummy")}
  np.testing.assert_allclose(np.asarray(model(packed)[0, -1]), train_logits, atol=1e-4)


def test_packed_row_equals_each_example_alone(setup):
  """Images and multi-frame videos packed into one row: every answer's logits are those of its example in
  a row of its own (no attention, vision-layout or position leak between the row's examples)."""
  root, tok, model = setup
  ids = token_ids(tok)
  picked = []
  for manifest in ("train_image.jsonl", "train_video.jsonl"):
    path = str(root / "data" / manifest)
    source, lines = open_source(path), open(path).read().splitlines()
    idx = [i for i, l in enumerate(lines) if json.loads(l)["category"] not in ("caption", "text")][:2]
    picked += [Decoder(tok, 0)(source[i]) for i in idx]
  examples = [picked[2], picked[0], picked[3], picked[1]]     # video, image, video, image
  seq_len, num_patches = 1024, 4096

  def answer_logits(exs):
    row = build_row([fit_example(e, seq_len, num_patches, ids, "truncate") for e in exs], seq_len, num_patches,
                    ids)
    answer = np.nonzero(row["loss_mask"])[0]
    return _row_logits(model, row)[answer - 1]               # (answer tokens, vocab)

  packed = answer_logits(examples)
  alone = np.concatenate([answer_logits([e]) for e in examples])
  assert packed.shape == alone.shape and len(packed) >= len(examples)
  np.testing.assert_allclose(packed, alone, atol=1e-4)
