"""The MPO training step on packed preference pairs: its loss is train.losses.preference.mpo_loss (tested
against TRL's DPOTrainer) of sequence log-probs from a plain full-logits forward of each sequence alone;
packed rows, one pair per row and two microbatches all give that same number."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keye_jax import batch_layout
from keye_jax.config import from_dict
from keye_jax.sharding import make_mesh
from tests.mpo.conftest import PAIRS
from tests.train.helpers import TINY_MODEL
from train.config import TrainConfig
from train.data.decode import token_ids
from train.data.packing import build_row, stack_rows
from train.data.sources import ManifestSource
from train.losses.preference import mpo_loss
from train.model_state import ModelShape, init_params
from train.mpo import mpo_loss_fn
from train.preference_data import IndexedSource, PairDecoder, make_pair_iterator, pair_row
from train.step import init_state, make_step

N = len(PAIRS)


@pytest.fixture(scope="module")
def setup(pairs_dir, tokenizer_dir, tokenizer):
  cfg = from_dict(TrainConfig, {
    "model": TINY_MODEL, "tokenizer": tokenizer_dir, "loss": "mpo", "loss_chunk": 64, "grad_accum": 2,
    "mpo": {"beta": 0.5, "dpo_weight": 0.8, "bco_weight": 0.3, "sft_weight": 1.0, "label_smoothing": 0.1},
    "data": {"sources": [{"path": str(pairs_dir / "pairs.jsonl")}], "seq_len": 256, "num_patches": 64,
             "batch_size": 4, "shuffle": False, "num_epochs": 1},
    "mesh": {"data": 1, "fsdp": 1, "tensor": 1, "context": 1}})
  mesh = make_mesh(cfg.mesh)
  shape = ModelShape.of(cfg.model)
  params = init_params(shape, 0, shape.shardings(mesh))
  rng = np.random.default_rng(0)
  reference = {k: tuple(-rng.uniform(2.0, 40.0, 2)) for k in range(N)}
  source = IndexedSource(ManifestSource(str(pairs_dir / "pairs.jsonl")), 0)
  decode = PairDecoder(tokenizer, 0)
  items = [decode(source[i]) for i in range(N)]
  assert all("_bad" not in it for it in items)
  return cfg, mesh, shape, params, reference, items


def _plain_logps(forward, ex, cfg, ids):
  """Summed log-probs of the targets of one sequence alone, from its full (S, V) logits."""
  row = build_row([ex], cfg.data.seq_len, cfg.data.num_patches, ids)
  logits = forward(jax.tree.map(jnp.asarray, stack_rows([row])))[0]
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
  s = np.arange(cfg.data.seq_len - 1)
  mask = row["loss_mask"][1:]
  return float(logp[s, row["input_ids"][1:]][mask].sum()), int(mask.sum())


@pytest.fixture(scope="module")
def expected(setup, tokenizer):
  cfg, mesh, shape, params, reference, items = setup
  logits = jax.jit(lambda p, b: shape.build(p)(b))
  forward = lambda b: logits(params, b)  # noqa: E731
  ids = token_ids(tokenizer)
  out = np.array([[*_plain_logps(forward, it["chosen"], cfg, ids), *_plain_logps(forward, it["rejected"], cfg, ids)]
                  for it in items])
  ref = np.array([reference[it["_key"]] for it in items])
  m = cfg.mpo
  loss, metrics = mpo_loss(jnp.asarray(out[:, 0]), jnp.asarray(out[:, 2]), jnp.asarray(ref[:, 0]),
                           jnp.asarray(ref[:, 1]), jnp.asarray(out[:, 1]), beta=m.beta, weights=m.weights,
                           label_smoothing=m.label_smoothing)
  return float(loss), {k: float(v) for k, v in metrics.items()}


def test_step_loss_is_mpo_loss_of_a_plain_forward(setup, expected, tokenizer):
  """Packed rows (several pairs a row), two microbatches: one step's loss and terms are mpo_loss's."""
  cfg, mesh, shape, params, reference, items = setup
  batch = next(make_pair_iterator(cfg.data, tokenizer, reference, process_index=0, process_count=1))
  assert batch["mpo_pairs"][0] == N and batch["pair_ids"].max() > 1  # all pairs, packed
  for r in range(batch["pair_ids"].shape[0]):  # both sides of a pair are adjacent segments of one row
    seg, pid, side = batch["segment_ids"][r], batch["pair_ids"][r], batch["pair_side"][r]
    for j in range(1, pid.max() + 1):
      assert sorted(set(side[pid == j])) == [1, 2]
      c, rj = np.unique(seg[(pid == j) & (side == 1)]), np.unique(seg[(pid == j) & (side == 2)])
      assert len(c) == len(rj) == 1 and rj[0] == c[0] + 1
  fns = make_step(cfg, shape, mesh, 1, list(batch), loss_fn=mpo_loss_fn(cfg))
  state = init_state(fns, 0, jax.tree.map(jnp.copy, params))
  _, m = fns.step(state, batch_layout.to_global(batch, mesh))
  loss, terms = expected
  np.testing.assert_allclose(float(m["loss"]), loss, rtol=2e-5)
  for k in ("loss_dpo", "loss_bco", "loss_sft", "reward_chosen", "reward_rejected", "reward_margin"):
    np.testing.assert_allclose(float(m[k]), terms[k], rtol=2e-5, atol=2e-5, err_msg=k)
  assert float(m["pairs"]) == N


def test_one_pair_per_row_gives_the_same_loss(setup, expected, tokenizer):
  """Unpacked (each row one pair, empty rows padding the batch): the same loss, from the loss function."""
  cfg, mesh, shape, params, reference, items = setup
  ids = token_ids(tokenizer)
  rows = [pair_row([it], cfg.data, ids, reference, False) for it in items] + [pair_row([], cfg.data, ids, None, False)] * 2
  batch = stack_rows(rows)
  chosen_tokens = sum(int(it["chosen"]["loss_mask"][1:].sum()) for it in items)
  batch["mpo_pairs"] = np.full(len(rows), N, np.float32)
  batch["mpo_chosen_tokens"] = np.full(len(rows), chosen_tokens, np.float32)
  loss_fn = mpo_loss_fn(dataclasses.replace(cfg, grad_accum=1))
  with jax.set_mesh(mesh):
    total, denom, _ = jax.jit(lambda p, b: loss_fn(shape.build(p), b))(params, jax.tree.map(jnp.asarray, batch))
  assert float(denom) == N
  np.testing.assert_allclose(float(total) / float(denom), expected[0], rtol=2e-5)
