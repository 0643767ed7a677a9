"""The demo's preference pairs (train/data/demo_pairs.py): every chosen reply passes lm-eval's IFEval checks,
every rejected one fails them (the broken constraint's checker says no, the others yes where one edit
suffices), deterministic given the seed, readable by the MPO pair reader and the reward model's manifest."""

from __future__ import annotations

import collections
import json
import os

import pytest

from keye_jax.evaluate import ifeval
from train.data.demo import END_PHRASE, write_demo_dataset
from train.data.demo_pairs import break_constraint, write_demo_pairs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  d = tmp_path_factory.mktemp("demo_pairs")
  write_demo_dataset(str(d), seed=0, with_tfds=False, scale=0.05)
  return d, write_demo_pairs(str(d))


def _read(path):
  return [json.loads(x) for x in open(path)]


def test_chosen_passes_and_rejected_fails_ifeval(demo):
  d, info = demo
  assert info["skipped"] == {"train": 0, "test": 0}
  broken = collections.Counter()
  for split in ("train", "test"):
    pairs = _read(d / f"{split}_pairs.jsonl")
    assert len(pairs) == info[split] == len(_read(d / f"{split}_instruction.jsonl"))
    for p in pairs:
      ids, kw = p["instruction_id_list"], p["kwargs"]
      good = ifeval.check(p["chosen"], ids, kw, p["prompt"])
      bad = ifeval.check(p["rejected"], ids, kw, p["prompt"])
      assert good["strict"] and good["loose"], p
      assert not bad["strict"], p
      k = ids.index(p["broken"])
      assert not bad["strict_list"][k], p
      assert os.path.isfile(d / p["images"][0]) and p["rationale"]
      broken[p["broken"]] += 1
  assert len(broken) == 7  # every constraint type of the demo is broken somewhere


def test_deterministic_given_the_seed(demo, tmp_path):
  d, _ = demo
  first = (d / "train_pairs.jsonl").read_text()
  write_demo_pairs(str(d), seed=0)
  assert (d / "train_pairs.jsonl").read_text() == first
  write_demo_pairs(str(d), seed=1)
  other = (d / "train_pairs.jsonl").read_text()
  write_demo_pairs(str(d), seed=0)
  assert other != first  # another constraint drawn for some multi-constraint record
  with pytest.raises(FileNotFoundError, match="train_instruction.jsonl: no such file"):
    write_demo_pairs(str(tmp_path))


@pytest.mark.parametrize("name,iid,kwargs,reply", [
    ("lowercase", "change_case:english_lowercase", {}, "the picture shows a red circle in the center."),
    ("no_comma", "punctuation:no_comma", {}, "A red circle in the center and a blue square in the top."),
    ("end", "startend:end_checker", {"end_phrase": END_PHRASE}, f"A red circle in the center. {END_PHRASE}"),
    ("keyword", "keywords:existence", {"keywords": ["scene"]}, "The scene shows a red circle in the center."),
    ("short", "length_constraints:number_words", {"relation": "less than", "num_words": 9},
     "A red circle in the center."),
    ("title", "detectable_format:title", {}, "<<shapes>>\nA red circle in the center."),
    ("quote", "startend:quotation", {}, '"A red circle in the center."'),
])
def test_each_edit_breaks_its_constraint(name, iid, kwargs, reply):
  assert ifeval.check(reply, [iid], [kwargs])["strict"]
  rejected = break_constraint(reply, name, {name}, kwargs)
  verdict = ifeval.check(rejected, [iid], [kwargs])
  assert not verdict["strict"] and not verdict["loose"], rejected


def test_pairs_feed_mpo_and_the_reward_model_manifest(demo, tmp_path):
  from train.preference_data import pair_conversations
  from train.rewards.rm_data import write_rm_manifest
  d, info = demo
  pair = _read(d / "train_pairs.jsonl")[0]
  chosen, rejected = pair_conversations(pair)
  assert chosen[0]["content"][0] == {"type": "image", "image": pair["images"][0]}
  assert chosen[-1]["content"] == pair["chosen"] and rejected[-1]["content"] == pair["rejected"]
  out = write_rm_manifest(str(d / "train_pairs.jsonl"), str(tmp_path / "rm.jsonl"))
  assert out["pairs"] == info["train"] and out["records"] == 4 * info["train"]  # both orders, think and not
  row = _read(tmp_path / "rm.jsonl")[0]
  assert row["messages"][0]["content"][0]["image"] == str(d / pair["images"][0])
