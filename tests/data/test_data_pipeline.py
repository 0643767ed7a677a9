"""The Grain pipeline end to end with a stand-in encoder: all three source kinds, exactly-once epochs,
determinism, save/restore (by hand, through Orbax, and with worker processes), mixtures, global arrays."""

import collections
import json
import os

import grain
import numpy as np
import pytest

from tests.data.fakes import FakeTokenizer, fake_encode, segments, write_manifest
from train.data.config import DataConfig, SourceConfig
from train.data.pipeline import make_iterator
from train.data.records import pack_record


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The same 40 records as a JSONL manifest, an ArrayRecord file and a prepared TFDS dataset."""
  root = str(tmp_path_factory.mktemp("pipeline"))
  manifest = write_manifest(root, 40)
  other = write_manifest(root, 30, seed=1, tag="other")
  with open(manifest) as f:
    records = [json.loads(line) for line in f]
  blobs = [pack_record(r, root) for r in records]
  from array_record.python import array_record_module
  w = array_record_module.ArrayRecordWriter(os.path.join(root, "data.array_record"), "group_size:1")
  for b in blobs:
    w.write(b)
  w.close()
  from train.data.tfds_export import write_tfds
  tfds_dir = write_tfds({"train": blobs}, os.path.join(root, "tfds"), name="pipeline_test")
  expected = [fake_encode(r["messages"], None, base_dir=root) for r in records]
  return dict(root=root, manifest=manifest, other=other, array_record=os.path.join(root, "data.array_record"),
              tfds=tfds_dir, expected=expected)


def iterator(sources, **kw):
  cfg = DataConfig(sources=tuple(SourceConfig(path=p) if isinstance(p, str) else p for p in sources),
                   **{"seq_len": 256, "num_patches": 128, "batch_size": 2, **kw})
  return make_iterator(cfg, FakeTokenizer(), encode=fake_encode, process_index=0, process_count=1)


def same(a, b):
  return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


@pytest.mark.parametrize("kind", ["manifest", "array_record", "tfds"])
def test_epoch_has_every_example_exactly_once(data, kind):
  it = iterator([data[kind]], num_epochs=1)
  batches = list(it)
  got = collections.Counter(s for b in batches for s in segments(b))
  want = collections.Counter((0, tuple(e["input_ids"].tolist()), round(float(e["pixel_values"].sum()), 3))
                             for e in data["expected"])
  assert got == want
  st = it.stats()
  assert st["sources"][0]["ok"] == 40 and st["examples"] == 40 and not st["sources"][0]["bad"]
  by_ids = {tuple(e["input_ids"].tolist()): e for e in data["expected"]}
  for b in batches:
    for r in range(2):  # loss exactly on each example's targets (never prompts); own positions
      seg = b["segment_ids"][r]
      for k in range(1, seg.max() + 1):
        e = by_ids[tuple(b["input_ids"][r][seg == k].tolist())]
        np.testing.assert_array_equal(b["loss_mask"][r][seg == k][1:], e["loss_mask"][1:])
        np.testing.assert_array_equal(b["position_ids"][:, r][:, seg == k], e["position_ids"])
    assert b["input_ids"].shape == (2, 256) and b["position_ids"].shape == (3, 2, 256)
    assert b["pixel_values"].shape == (2, 128, 588) and b["merge_index"].shape == (2, 32, 4)
    assert not b["loss_mask"][b["segment_ids"] == 0].any()


def test_same_seed_same_batches_other_seed_other_batches(data):
  a = [next(it) for it in [iterator([data["manifest"]], seed=3)] for _ in range(4)]
  b = [next(it) for it in [iterator([data["manifest"]], seed=3)] for _ in range(4)]
  c = [next(it) for it in [iterator([data["manifest"]], seed=4)] for _ in range(4)]
  assert same(a, b) and not same(a, c)


def test_restore_continues_identically_through_orbax(data, tmp_path):
  import orbax.checkpoint as ocp
  it = iterator([data["manifest"]], packing_bins=4)  # infinite, several epochs
  for _ in range(5):
    next(it)
  assert it.get_state()["bins"]  # open rows must survive the checkpoint
  mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("data",))
  mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  after = [next(it) for _ in range(25)]  # crosses epoch boundaries
  restored = iterator([data["manifest"]], packing_bins=4)
  mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert same(after, [next(restored) for _ in range(25)])
  assert restored.stats()["examples"] == it.stats()["examples"]
  mngr.close()


def test_worker_processes_give_the_same_stream_and_restore(data):
  reference = iterator([data["manifest"]], num_epochs=2)
  want = list(reference)
  it = iterator([data["manifest"]], num_epochs=2, workers=2)
  head = [next(it) for _ in range(3)]
  state = it.get_state()
  it.close()
  again = iterator([data["manifest"]], num_epochs=2, workers=2)
  again.set_state(state)
  tail = list(again)
  again.close()
  assert same(want, head + tail)


def test_mixture_follows_weights_and_tags_sources(data):
  sources = [SourceConfig(path=data["manifest"], weight=3.0, name="a"),
             SourceConfig(path=data["other"], weight=1.0, name="b")]
  it = iterator(sources)
  segs = [s for _ in range(20) for s in segments(next(it))]
  counts = collections.Counter(src for src, _, _ in segs)
  assert 2.0 < counts[0] / counts[1] < 4.5, counts
  for src, ids, _ in segs:  # the text says which manifest an example came from
    text = bytes(i - 12 for i in ids if i >= 12).decode(errors="replace")
    assert ("question" in text) == (src == 0) and ("other" in text) == (src == 1)
  names = [s["name"] for s in it.stats()["sources"]]
  assert names == ["a", "b"]


def test_global_arrays_on_a_mesh(data):
  import jax
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  cfg = DataConfig(sources=(SourceConfig(path=data["manifest"]),), seq_len=256, num_patches=128, batch_size=2)
  numpy_batch = next(make_iterator(cfg, FakeTokenizer(), encode=fake_encode, process_index=0, process_count=1))
  batch = next(make_iterator(cfg, FakeTokenizer(), mesh, encode=fake_encode))
  for k, v in numpy_batch.items():
    assert isinstance(batch[k], jax.Array) and batch[k].shape == v.shape
    np.testing.assert_array_equal(np.asarray(batch[k]), v)
  assert batch["position_ids"].sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"))
