"""Random-access sources (len + getitem), each item the raw bytes of one record (see records.py).

  ManifestSource   a JSONL manifest: one JSON record per line, media paths relative to the manifest
  ArraySource      ArrayRecord file(s) of container records with media inline
  TfdsSource       a prepared TFDS dataset (array_record format) read with tfds.data_source, no TensorFlow;
                   each example's `record` feature holds container bytes

An item is {"data": bytes, "base_dir": str, "where": str}: `where` names the file and line/record for
error messages. Sources are picklable so that Grain can ship them to worker processes.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from train.data.config import SourceConfig


class SourceError(ValueError):
  """A source cannot be opened; the message names the path and the reason."""


class ManifestSource:
  """A JSONL manifest, indexed by byte offsets of its non-empty lines (read lazily)."""

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    if not os.path.isfile(self.path):
      raise SourceError(f"{path}: manifest not found")
    offsets, lines, pos = [], [], 0
    with open(self.path, "rb") as f:
      for number, line in enumerate(f, start=1):
        if line.strip():
          offsets.append(pos)
          lines.append(number)
        pos += len(line)
    self._offsets = np.asarray(offsets, np.int64)
    self._lines = np.asarray(lines, np.int64)

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, i: int) -> dict:
    with open(self.path, "rb") as f:
      f.seek(int(self._offsets[i]))
      data = f.readline()
    return {"data": data, "base_dir": os.path.dirname(self.path), "where": f"{self.path}:{self._lines[i]}"}


class ArraySource:
  """One or more ArrayRecord files (a file, a glob, or a directory of *.array_record* files)."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isdir(path):
      files = sorted(glob.glob(os.path.join(path, "*.array_record*")))
    else:
      files = sorted(glob.glob(path))
    if not files:
      raise SourceError(f"{path}: no ArrayRecord files found")
    self.files = [os.path.abspath(f) for f in files]
    import grain
    self._source = grain.sources.ArrayRecordDataSource(self.files)
    self._ends = np.cumsum([_array_record_len(f) for f in self.files])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    k = int(np.searchsorted(self._ends, i, side="right"))
    start = int(self._ends[k - 1]) if k else 0
    return {"data": self._source[i], "base_dir": "", "where": f"{self.files[k]}#{i - start}"}


def _array_record_len(path: str) -> int:
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


class TfdsSource:
  """A prepared TFDS dataset: `path` is a dataset directory (with dataset_info.json) or a dataset name
  found in `data_dir`."""

  def __init__(self, path: str, split: str = "train", data_dir: str = ""):
    self.path, self.split, self.data_dir = path, split, data_dir
    self._source = _open_tfds(path, split, data_dir)

  def __getstate__(self):
    return {"path": self.path, "split": self.split, "data_dir": self.data_dir}

  def __setstate__(self, state):
    self.__init__(**state)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    item = self._source[i]
    if not isinstance(item, dict) or "record" not in item:
      raise SourceError(f"{self.path}[{self.split}]: examples need a `record` bytes feature")
    return {"data": item["record"], "base_dir": "", "where": f"{self.path}[{self.split}]#{i}"}


def _open_tfds(path: str, split: str, data_dir: str):
  import tensorflow_datasets as tfds
  try:
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
      return tfds.builder_from_directory(path).as_data_source(split=split)
    return tfds.data_source(path, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # TFDS raises many types (not found, bad split, wrong file format)
    raise SourceError(f"{path}: cannot open TFDS split {split!r}: {type(e).__name__}: {e}") from e


def infer_kind(path: str) -> str:
  if path.endswith(".jsonl"):
    return "jsonl"
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return "tfds"
  if ".array_record" in os.path.basename(path) or glob.glob(os.path.join(path, "*.array_record*")):
    return "array_record"
  if os.path.isdir(path) and glob.glob(os.path.join(path, "*", "dataset_info.json")):
    raise SourceError(f"{path}: looks like a TFDS data_dir; give the version directory or kind: tfds")
  raise SourceError(f"{path}: cannot tell the source kind (expected *.jsonl, ArrayRecord files or a "
                    "TFDS dataset directory); set `kind`")


def open_source(source: SourceConfig | str):
  """Opens a source from its config or from a path (kind inferred; `TFDS_DIR:SPLIT` picks a TFDS split)."""
  if isinstance(source, SourceConfig):
    cfg = source
  else:
    path, _, split = str(source).rpartition(":")
    if path and not os.path.exists(str(source)) and os.path.isfile(os.path.join(path, "dataset_info.json")):
      cfg = SourceConfig(path=path, kind="tfds", split=split)
    else:
      cfg = SourceConfig(path=str(source))
  kind = infer_kind(cfg.path) if cfg.kind == "auto" else cfg.kind
  if kind == "jsonl":
    return ManifestSource(cfg.path)
  if kind == "array_record":
    return ArraySource(cfg.path)
  return TfdsSource(cfg.path, cfg.split, cfg.data_dir)
