"""Preference-pair records: both forms decode, malformed pairs are counted as bad (never a crash), pairs
too long for a row are dropped and counted, and the reference pass sees every pair exactly once."""

from __future__ import annotations

import json

import pytest

from tests.mpo.conftest import PAIRS, write_pairs
from train.data.config import DataConfig, SourceConfig
from train.data.pipeline import DataError
from train.preference_data import reference_pass_iterator


def _cfg(path, **kw):
  return DataConfig(sources=(SourceConfig(path=str(path), name="pairs"),), seq_len=kw.pop("seq_len", 256),
                    num_patches=64, batch_size=2, **kw)


def test_bad_and_overlong_pairs_are_counted(pairs_dir, tokenizer):
  long = {"id": "long", "prompt": "Tell a story.", "chosen": "once upon a time " * 150, "rejected": "no"}
  bad = [{"id": "b0", "prompt": "x", "chosen": "y"},                       # no rejected
         {"id": "b1", "messages": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"}]
  path = write_pairs(pairs_dir / "mixed.jsonl", [*PAIRS, long, *bad])  # beside pic.png
  with open(path, "a") as f:
    f.write("{not json\n")
  it = reference_pass_iterator(_cfg(path, max_bad_fraction=0.5), tokenizer, process_index=0, process_count=1)
  keys = []
  for batch in it:
    keys += sorted(set(batch["pair_keys"][batch["pair_side"] > 0].tolist()))
  assert sorted(keys) == list(range(len(PAIRS)))  # each good pair once; the long one (key 6) dropped
  st = it.stats()["sources"][0]
  assert (st["seen"], st["ok"], st["dropped"], st["bad"]) == (len(PAIRS) + 4, len(PAIRS) + 1, 1, {"invalid record": 3})

  with pytest.raises(DataError, match="are bad"):  # above the bad fraction: one clear error naming the source
    list(reference_pass_iterator(_cfg(path, max_bad_fraction=0.1), tokenizer, process_index=0, process_count=1))


def test_nothing_fits_is_one_error(pairs_dir, tokenizer):
  it = reference_pass_iterator(_cfg(pairs_dir / "pairs.jsonl", seq_len=16), tokenizer, process_index=0,
                               process_count=1)
  with pytest.raises(DataError, match="no preference pair"):
    next(it)
