"""Bad samples are skipped and counted per source with file and reason; too many fail the run clearly."""

import json
import logging
import os

import pytest

from tests.data.fakes import FakeTokenizer, fake_encode, write_manifest
from train.data.check import check_source
from train.data.config import DataConfig, SourceConfig
from train.data.pipeline import DataError, make_iterator


@pytest.fixture
def mixed(tmp_path):
  """A manifest of 20 good records plus 2 missing images, 2 corrupt images, 1 empty conversation,
  1 line of invalid JSON and 1 record without any assistant target."""
  root = str(tmp_path)
  path = write_manifest(root, 20)
  with open(os.path.join(root, "img", "corrupt.png"), "wb") as f:
    f.write(b"\x89PNG not really an image")

  def rec(content, answer="ok"):
    return json.dumps({"messages": [{"role": "user", "content": content},
                                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})

  bad = [rec([{"type": "image", "image": "img/missing.png"}]),
         rec([{"type": "image", "image": "img/gone.png"}, {"type": "text", "text": "q"}]),
         rec([{"type": "image", "image": "img/corrupt.png"}]),
         rec([{"type": "text", "text": "q"}, {"type": "image", "image": "img/corrupt.png"}]),
         json.dumps({"messages": []}),
         '{"messages": [this is not json',
         json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "no answer"}]}]})]
  with open(path, "a") as f:
    f.write("\n".join(bad) + "\n")
  return path


REASONS = {"missing media": 2, "bad media": 2, "empty conversation": 1, "invalid record": 1,
           "no training target": 1}


def test_check_source_counts_bad_samples_with_reasons(mixed):
  reports = []
  out = check_source(mixed, FakeTokenizer(), encode=fake_encode, report=lambda *r: reports.append(r))
  assert out == {"total": 27, "ok": 20, "bad": dict(sorted(REASONS.items()))}
  wheres = [w for w, _, _ in reports]
  assert all(w.startswith(mixed + ":") for w in wheres)  # file and line of each bad sample
  assert f"{mixed}:21" in wheres and any("missing.png" in e for _, _, e in reports)


def test_pipeline_skips_and_counts_bad_samples(mixed, caplog):
  cfg = DataConfig(sources=(SourceConfig(path=mixed, name="mixed"),), seq_len=256, num_patches=128,
                   batch_size=2, num_epochs=1, max_bad_fraction=0.5, log_first_errors=2)
  it = make_iterator(cfg, FakeTokenizer(), encode=fake_encode, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING, logger="train.data"):
    batches = list(it)
  st = it.stats()["sources"][0]
  assert (st["seen"], st["ok"], st["bad"]) == (27, 20, REASONS)
  assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == 20
  assert len(st["first_errors"]) == 2 and len([r for r in caplog.records if "bad sample" in r.message]) == 2
  assert mixed in caplog.records[0].message


def test_too_many_bad_samples_is_a_clear_failure(mixed):
  cfg = DataConfig(sources=(SourceConfig(path=mixed, name="mixed"),), seq_len=256, num_patches=128,
                   batch_size=2, num_epochs=None, max_bad_fraction=0.1, bad_check_min_samples=20)
  it = make_iterator(cfg, FakeTokenizer(), encode=fake_encode, process_index=0, process_count=1)
  with pytest.raises(DataError, match=r"source mixed: \d+ of \d+ samples are bad .*max_bad_fraction=0.1"):
    for _ in range(100):
      next(it)


def test_unreadable_source_names_the_path(tmp_path):
  from train.data.sources import SourceError
  with pytest.raises(SourceError, match="nothing.jsonl: manifest not found"):
    check_source(str(tmp_path / "nothing.jsonl"), FakeTokenizer(), encode=fake_encode)
  with pytest.raises(SourceError, match="cannot tell the source kind"):
    check_source(str(tmp_path), FakeTokenizer(), encode=fake_encode)


def test_nothing_fits_is_a_clear_failure(tmp_path):
  path = write_manifest(str(tmp_path), 12, sizes=(84,), text_only_every=0)
  for epochs, min_samples, match in ((1, 100, "produced no example"),
                                     (None, 10, "none of the first 10 examples fits a row")):
    cfg = DataConfig(sources=(SourceConfig(path=path),), seq_len=256, num_patches=16, batch_size=2,
                     num_epochs=epochs, bad_check_min_samples=min_samples, overlong="drop")
    it = make_iterator(cfg, FakeTokenizer(), encode=fake_encode, process_index=0, process_count=1)
    with pytest.raises(DataError, match=match):
      next(it)
