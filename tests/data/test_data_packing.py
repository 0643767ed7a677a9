"""Packing invariants on synthetic examples: every token and patch of kept examples exactly once, in
order; segment ids, positions, loss mask and vision metadata right; safe truncation."""

import numpy as np
import pytest

from train.data.decode import TokenIds
from train.data.packing import BinPacker, build_row, example_size, fit_example, stack_rows

IDS = TokenIds(pad=0, vision_start=3, vision_end=4, image_pad=5, video_pad=6)


def make_example(rng, n_blocks=None, source=0):
  """A contract-shaped example: text, then image spans, then an answer with loss."""
  ids, loss, pos, pix, grids = [], [], [], [], []
  cur = 0

  def text(n, target):
    nonlocal cur
    for _ in range(n):
      ids.append(int(rng.integers(12, 1000)))
      loss.append(target)
      pos.append((cur, cur, cur))
      cur += 1

  text(int(rng.integers(1, 20)), False)
  for _ in range(int(rng.integers(0, 3)) if n_blocks is None else n_blocks):
    gh, gw = 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))
    ids.append(IDS.vision_start)
    loss.append(False)
    pos.append((cur, cur, cur))
    cur += 1
    s = cur
    for r in range(gh // 2):
      for c in range(gw // 2):
        ids.append(IDS.image_pad)
        loss.append(False)
        pos.append((s, s + r, s + c))
    cur = s + max(gh, gw) // 2
    pix.append(rng.normal(size=(gh * gw, 588)).astype(np.float32))
    grids.append((gh, gw))
    ids.append(IDS.vision_end)
    loss.append(False)
    pos.append((cur, cur, cur))
    cur += 1
    text(int(rng.integers(0, 5)), False)
  text(int(rng.integers(1, 30)), True)
  return {"input_ids": np.array(ids, np.int32), "loss_mask": np.array(loss),
          "position_ids": np.array(pos, np.int32).T.copy(),
          "pixel_values": np.concatenate(pix) if pix else np.zeros((0, 588), np.float32),
          "grids_hw": np.array(grids, np.int32).reshape(-1, 2), "_source": source}


def pack_all(examples, S, P, bins, best_fit=True):
  packer = BinPacker(S, P, bins, best_fit)
  rows = []
  for k, ex in enumerate(examples):
    rows += packer.add(k, *example_size(ex))
  return rows + packer.flush()


def check_row(row, examples, keys, S, P):
  """The row holds exactly examples[keys] in order, with correct metadata and padding."""
  seg = row["segment_ids"]
  assert row["input_ids"].shape == (S,) and row["pixel_values"].shape == (P, 588)
  assert list(np.unique(seg[seg > 0])) == list(range(1, len(keys) + 1))
  t = p = 0
  for k, key in enumerate(keys, start=1):
    ex = examples[key]
    n, m = example_size(ex)
    assert np.all(seg[t:t + n] == k)  # contiguous, in order
    np.testing.assert_array_equal(row["input_ids"][t:t + n], ex["input_ids"])
    np.testing.assert_array_equal(row["position_ids"][:, t:t + n], ex["position_ids"])
    np.testing.assert_array_equal(row["loss_mask"][t + 1:t + n], ex["loss_mask"][1:])
    assert not row["loss_mask"][t]
    assert np.all(row["source_ids"][t:t + n] == ex["_source"])
    np.testing.assert_array_equal(row["pixel_values"][p:p + m], ex["pixel_values"])
    t, p = t + n, p + m
  # Padding: no loss, no segment, pad token, zero positions, zero patches.
  assert np.all(seg[t:] == 0) and not row["loss_mask"][t:].any() and np.all(row["input_ids"][t:] == IDS.pad)
  assert np.all(row["position_ids"][:, t:] == 0) and np.all(row["source_ids"][t:] == -1)
  assert np.all(row["pixel_values"][p:] == 0) and np.all(row["patch_segment_ids"][p:] == 0)
  assert np.all(row["patch_segment_ids"][:p] > 0)
  # The k-th pad token takes the k-th valid merged token: counts agree.
  pads = np.isin(row["input_ids"], (IDS.image_pad, IDS.video_pad)).sum()
  assert pads == row["merge_valid"].sum() == p // 4
  # Loss never on prompts: every loss position is a target of its example.
  return t, p


@pytest.mark.parametrize("best_fit", [True, False])
def test_every_token_and_patch_exactly_once(best_fit):
  rng = np.random.default_rng(0)
  S, P = 256, 160
  examples = [make_example(rng, source=i % 3) for i in range(300)]
  rows = pack_all(examples, S, P, bins=8, best_fit=best_fit)
  keys = [k for r in rows for k in r]
  assert sorted(keys) == list(range(len(examples)))  # each exactly once
  used_t = used_p = 0
  for r in rows:
    row = build_row([examples[k] for k in r], S, P, IDS)
    t, p = check_row(row, examples, r, S, P)
    used_t, used_p = used_t + t, used_p + p
  total_t = sum(example_size(e)[0] for e in examples)
  assert used_t == total_t
  # Only the flushed tail is ragged: the text budget is well used.
  assert used_t / (len(rows) * S) > 0.85, used_t / (len(rows) * S)


def test_batch_layout():
  rng = np.random.default_rng(1)
  S, P = 128, 64
  examples = [make_example(rng) for _ in range(3)]
  rows = [build_row(examples[:2], S, P, IDS), build_row(examples[2:], S, P, IDS), build_row([], S, P, IDS)]
  b = stack_rows(rows)
  assert b["input_ids"].shape == (3, S) and b["position_ids"].shape == (3, 3, S)
  assert b["pixel_values"].shape == (3, P, 588) and b["merge_index"].shape == (3, P // 4, 4)
  assert b["patch_pos"].shape == (3, P, 4) and b["merge_valid"].shape == (3, P // 4)
  np.testing.assert_array_equal(b["position_ids"][:, 1], rows[1]["position_ids"])
  assert not b["segment_ids"][2].any() and not b["loss_mask"][2].any()


def test_packer_state_roundtrip_and_budgets():
  rng = np.random.default_rng(2)
  a, b = BinPacker(100, 40, 4), BinPacker(100, 40, 4)
  sizes = [(int(rng.integers(1, 60)), 4 * int(rng.integers(0, 6))) for _ in range(200)]
  out_a, out_b = [], []
  for k, (t, p) in enumerate(sizes):
    out_a += a.add(k, t, p)
    if k == 77:
      b.set_state(a.state())
    if k > 77:
      out_b += b.add(k, t, p)
  assert a.state() == b.state()
  rows = out_a + a.flush()
  for r in rows:
    assert sum(sizes[k][0] for k in r) <= 100 and sum(sizes[k][1] for k in r) <= 40
  assert sorted(k for r in rows for k in r) == list(range(200))
  with pytest.raises(ValueError, match="exceeds a row"):
    a.add(999, 101, 0)


def test_truncation_never_inside_a_vision_span():
  rng = np.random.default_rng(3)
  for _ in range(200):
    ex = make_example(rng, n_blocks=int(rng.integers(1, 4)))
    n, m = example_size(ex)
    S, P = int(rng.integers(5, n + 1)), 4 * int(rng.integers(1, m // 4 + 2))
    out = fit_example(ex, S, P, IDS, "truncate")
    if n <= S and m <= P:
      assert out is ex
      continue
    if out is None:
      continue
    t, p = example_size(out)
    assert t <= S and p <= P and out["loss_mask"].any()
    ids = out["input_ids"]
    assert (ids == IDS.vision_start).sum() == (ids == IDS.vision_end).sum()  # spans whole
    np.testing.assert_array_equal(ids, ex["input_ids"][:t])
    np.testing.assert_array_equal(out["pixel_values"], ex["pixel_values"][:p])
    assert np.isin(ids, (IDS.image_pad,)).sum() * 4 == p == np.prod(out["grids_hw"], 1).sum()
    assert fit_example(ex, S, P, IDS, "drop") is None


def test_truncation_drops_when_no_target_survives():
  rng = np.random.default_rng(4)
  ex = make_example(rng, n_blocks=1)
  first_target = int(np.argmax(ex["loss_mask"]))
  assert fit_example(ex, first_target, 10_000, IDS, "truncate") is None
  assert fit_example(ex, first_target + 1, 10_000, IDS, "truncate") is not None


def test_extra_per_token_fields_are_carried_and_truncated():
  """Fields the packer does not know (RL's advantages and old log-probs, a (n, 2) field) are laid out like
  input_ids: each example's values on its tokens, 0 on padding and on examples without the field."""
  rng = np.random.default_rng(5)
  S, P = 256, 160
  examples = [make_example(rng) for _ in range(3)]
  for i, ex in enumerate(examples[:2]):
    n = len(ex["input_ids"])
    ex["advantages"] = np.full(n, i + 1.5, np.float32)
    ex["old_logprobs"] = -rng.random(n).astype(np.float32)
    ex["pairs"] = rng.integers(0, 9, (n, 2)).astype(np.int16)
  row = build_row(examples, S, P, IDS)
  t = 0
  for ex in examples:
    n = len(ex["input_ids"])
    for f in ("advantages", "old_logprobs", "pairs"):
      want = ex[f] if f in ex else 0
      np.testing.assert_array_equal(row[f][t:t + n], want + np.zeros_like(row[f][t:t + n]))
    t += n
  assert row["advantages"].shape == (S,) and row["advantages"].dtype == np.float32
  assert row["pairs"].shape == (S, 2) and row["pairs"].dtype == np.int16
  assert not row["advantages"][t:].any() and not row["pairs"][t:].any()
  check_row(row, examples, [0, 1, 2], S, P)  # the standard fields as without the extras
  b = stack_rows([row, build_row(examples[:1], S, P, IDS)])
  assert b["old_logprobs"].shape == (2, S) and b["pairs"].shape == (2, S, 2)
  ex = examples[0]
  cut = fit_example(ex, len(ex["input_ids"]) - 1, P, IDS, "truncate")
  assert cut is not None
  for f in ("advantages", "old_logprobs", "pairs", "input_ids", "loss_mask"):
    np.testing.assert_array_equal(cut[f], ex[f][:len(cut["input_ids"])])
  np.testing.assert_array_equal(cut["position_ids"], ex["position_ids"][:, :len(cut["input_ids"])])
