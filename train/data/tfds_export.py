"""Writes container records (records.py) as a prepared TFDS dataset in array_record format, without TF.

The dataset has one feature, `record` (bytes); read it back with `tfds.data_source` or
`SourceConfig(path=<data_dir>/<name>/<version>)` (sources.TfdsSource).
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import numpy as np
import tensorflow_datasets as tfds


class _Records(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder over records already in memory (set `records` before download_and_prepare)."""

  VERSION = tfds.core.Version("1.0.0")
  records: dict[str, list[bytes]] = {}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description="Keye records: a KRC1 container per example (train/data/records.py).",
        features=tfds.features.FeaturesDict({"record": tfds.features.Tensor(shape=(), dtype=np.object_)}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self.records}

  def _generate_examples(self, split):
    for i, data in enumerate(self.records[split]):
      yield i, {"record": data}


def write_tfds(records: dict[str, list[bytes]], data_dir: str, name: str = "keye_demo") -> str:
  """Writes {split: [record bytes]} under data_dir/name/1.0.0 and returns that directory."""
  tfds.disable_progress_bar()
  body = {"records": records, "name": name}
  builder_cls = types.new_class(_snake_to_camel(name), (_Records,), {"skip_registration": True},
                                lambda ns: ns.update(body))
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is for results
    builder.download_and_prepare()
  return os.path.join(data_dir, name, str(_Records.VERSION))


def _snake_to_camel(name: str) -> str:
  return "".join(p.capitalize() for p in name.split("_"))
