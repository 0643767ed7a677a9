"""`make_iterator`: the resumable stream of packed batches a training run consumes.

  sources -> mixture.build_dataset (shuffle, epochs, mix, shard by process, lazy decode)
          -> to_iter_dataset -> mp_prefetch (decoding in `workers` processes)
          -> PackedBatchIterator (count/skip bad samples, fit, pack, build rows, batch)
          -> GlobalBatchIterator (only with a mesh: global jax.Arrays sharded over ("data", "fsdp"))

Each process yields batch_size // process_count rows per step (its slice of the global batch). Every
array is numpy (B, ...) except position_ids (3, B, S) (keye_jax/batch_layout.py); see packing.py for the
row layout.

Saving and restoring the iterator with Orbax, next to the model (each process writes its own
`process_<i>-of-<n>.json`; the state is small JSON: Grain's read position plus the keys of the examples
sitting in open rows, which are re-read and re-decoded on restore):

  import grain, orbax.checkpoint as ocp
  it = make_iterator(cfg.data, tokenizer, mesh)
  mngr = ocp.CheckpointManager(run_dir / "checkpoints")
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                          data=grain.checkpoint.CheckpointSave(it)))
  # after a restart: same config, same process count
  it = make_iterator(cfg.data, tokenizer, mesh)
  mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                             data=grain.checkpoint.CheckpointRestore(it)))
  # `it` now yields exactly the batches the original would have yielded after `step`.

`it.get_state()` / `it.set_state(state)` do the same by hand; `it.stats()` reports counts per source
(seen, ok, bad by reason, truncated, dropped) and packing efficiency; `it.close()` stops the workers.
"""

from __future__ import annotations

import copy
import logging

import grain
import numpy as np

from keye_jax import batch_layout
from train.data.config import DataConfig
from train.data.decode import Decoder, TokenIds, is_bad, token_ids
from train.data.mixture import build_dataset
from train.data.packing import BinPacker, build_row, example_size, fit_example, stack_rows
from train.data.sources import open_source

log = logging.getLogger("train.data")


class DataError(RuntimeError):
  """The data cannot feed the run (too many bad samples, nothing usable); the message says which source."""


def _new_stats(names: list[str]) -> dict:
  return {"sources": [{"name": n, "seen": 0, "ok": 0, "bad": {}, "truncated": 0, "dropped": 0,
                       "first_errors": []} for n in names],
          "batches": 0, "rows": 0, "examples": 0, "text_tokens": 0, "patches": 0}


class PackedBatchIterator(grain.DatasetIterator):
  """Packs decoded examples from `parent` into batches of `local_batch` rows; checkpointable.

  `dataset` is the MapDataset `parent` iterates over: examples held in open rows are re-read from it by
  index on restore, so the state stays small.
  """

  def __init__(self, parent: grain.DatasetIterator, dataset: grain.MapDataset, cfg: DataConfig,
               ids: TokenIds, local_batch: int, source_names: list[str]):
    super().__init__(parent)
    self._dataset, self._cfg, self._ids, self._local_batch = dataset, cfg, ids, local_batch
    self._packer = BinPacker(cfg.seq_len, cfg.num_patches, cfg.packing_bins, cfg.packing == "best_fit")
    self._ready: list[list] = []  # complete rows (lists of example keys), oldest first
    self._cache: dict[int, dict] = {}  # key -> fitted example, for every key in open or ready rows
    self._stats = _new_stats(source_names)

  # -- iteration ------------------------------------------------------------------------------------

  def __next__(self) -> dict[str, np.ndarray]:
    b = self._local_batch
    while len(self._ready) < b:
      try:
        item = next(self._parent)
      except StopIteration:
        self._check_bad_fractions(final=True)
        self._ready.extend(self._packer.flush())
        if not self._stats["examples"] and not self._ready:
          seen = {s["name"]: (s["seen"], s["ok"], s["dropped"]) for s in self._stats["sources"]}
          raise DataError(f"the data produced no example: (seen, decoded, dropped as too long) per source: "
                          f"{seen}") from None
        break
      self._consume(item)
    if not self._ready:
      raise StopIteration
    keys, self._ready = self._ready[:b], self._ready[b:]
    cfg = self._cfg
    rows = [build_row([self._cache.pop(k) for k in row], cfg.seq_len, cfg.num_patches, self._ids)
            for row in keys]
    # A finite stream's last batch is completed with empty rows (all padding) rather than dropped.
    rows += [build_row([], cfg.seq_len, cfg.num_patches, self._ids) for _ in range(b - len(rows))]
    batch = stack_rows(rows)
    st = self._stats
    st["batches"] += 1
    st["rows"] += b
    st["examples"] += sum(len(r) for r in keys)
    st["text_tokens"] += int((batch["segment_ids"] > 0).sum())
    st["patches"] += int((batch["patch_segment_ids"] > 0).sum())
    return batch

  def _consume(self, item: dict):
    st = self._stats["sources"][item["_source"]]
    st["seen"] += 1
    if is_bad(item):
      reason = item["_bad"]
      st["bad"][reason] = st["bad"].get(reason, 0) + 1
      if len(st["first_errors"]) < self._cfg.log_first_errors:
        msg = f"{item['_where']}: {reason}: {item['_error']}"
        st["first_errors"].append(msg)
        log.warning("skipping bad sample of source %s: %s", st["name"], msg)
      self._check_bad_fractions()
      return
    st["ok"] += 1
    ex = self._fit(item)
    if ex is None:
      st["dropped"] += 1
      if st["dropped"] == st["ok"] >= self._cfg.bad_check_min_samples:
        raise DataError(f"source {st['name']}: none of the first {st['ok']} examples fits a row of "
                        f"data.seq_len={self._cfg.seq_len} tokens and data.num_patches={self._cfg.num_patches} "
                        f"patches (data.overlong={self._cfg.overlong}); raise them or cap the media size")
      return
    st["truncated"] += int(bool(ex.get("_truncated")))
    key = item["_index"]
    self._cache[key] = ex
    self._ready.extend(self._packer.add(key, *example_size(ex)))

  def _fit(self, ex: dict) -> dict | None:
    return fit_example(ex, self._cfg.seq_len, self._cfg.num_patches, self._ids, self._cfg.overlong)

  def _check_bad_fractions(self, final: bool = False):
    cfg = self._cfg
    for st in self._stats["sources"]:
      bad = sum(st["bad"].values())
      if not st["seen"] or (st["seen"] < cfg.bad_check_min_samples and not final):
        continue
      if bad / st["seen"] > cfg.max_bad_fraction:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(st["bad"].items()))
        first = "\n  ".join(st["first_errors"])
        raise DataError(f"source {st['name']}: {bad} of {st['seen']} samples are bad ({reasons}), more than "
                        f"data.max_bad_fraction={cfg.max_bad_fraction}. First errors:\n  {first}\n"
                        f"Run `keye data check` on the source to list them all.")

  # -- state ----------------------------------------------------------------------------------------

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "bins": self._packer.state(),
            "ready": [list(r) for r in self._ready], "stats": copy.deepcopy(self._stats)}

  def set_state(self, state: dict):
    self._parent.set_state(state["parent"])
    self._packer.set_state(state["bins"])
    self._ready = [list(r) for r in state["ready"]]
    self._stats = copy.deepcopy(state["stats"])
    self._cache = {}
    for key in [k for b in self._packer.bins for k in b[2]] + [k for r in self._ready for k in r]:
      item = self._dataset[key]
      ex = None if is_bad(item) else self._fit(item)
      if ex is None:
        raise DataError(f"restoring the data iterator: example {key} ({item.get('_where')}) no longer decodes "
                        "to what was packed; did the data or config change since the checkpoint?")
      self._cache[key] = ex
    for t, p, keys in self._packer.bins:
      if (t, p) != tuple(map(sum, zip((0, 0), *(example_size(self._cache[k]) for k in keys)))):
        raise DataError("restoring the data iterator: the re-read examples no longer have the packed sizes; "
                        "did the data or config (seq_len, num_patches, vision) change since the checkpoint?")

  def stats(self) -> dict:
    """Counts so far, plus packing efficiency (share of real text tokens / patches in emitted rows)."""
    st = copy.deepcopy(self._stats)
    rows = max(st["rows"], 1)
    st["text_efficiency"] = st["text_tokens"] / (rows * self._cfg.seq_len)
    st["vision_efficiency"] = st["patches"] / (rows * self._cfg.num_patches)
    return st


class GlobalBatchIterator(grain.DatasetIterator):
  """Turns each process's numpy batch into global jax.Arrays sharded over the mesh's batch axes
  (batch_layout.to_global). The parent is any Grain iterator of numpy batches: the packed pipeline, or
  train/synthetic.py's batches."""

  def __init__(self, parent: grain.DatasetIterator, mesh):
    super().__init__(parent)
    self._mesh = mesh

  def __next__(self):
    return batch_layout.to_global(next(self._parent), self._mesh)

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict):
    self._parent.set_state(state)

  def stats(self) -> dict:
    return self._parent.stats() if hasattr(self._parent, "stats") else {}


def make_dataset(cfg: DataConfig, tokenizer, *, encode=None, process_index: int = 0, process_count: int = 1):
  """(decoded sharded MapDataset, source names, token ids) for `cfg`; see mixture.build_dataset."""
  sources = [open_source(s) for s in cfg.sources]
  decoders = [Decoder(tokenizer, i, encode=encode, vision_kwargs=cfg.vision) for i in range(len(sources))]
  ds = build_dataset(cfg, sources, decoders, process_index, process_count)
  return ds, [s.display_name for s in cfg.sources], token_ids(tokenizer)


def make_iterator(cfg: DataConfig, tokenizer, mesh=None, *, encode=None, process_index: int | None = None,
                  process_count: int | None = None):
  """The iterator of packed batches for this process (numpy dicts; global jax.Arrays given a mesh).

  `encode(messages, tokenizer, base_dir=None, **cfg.vision)` defaults to
  keye_jax.processing.chat.encode_example. Process index/count default to jax's.
  """
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} processes")
  ds, names, ids = make_dataset(cfg, tokenizer, encode=encode, process_index=process_index,
                                process_count=process_count)
  it = PackedBatchIterator(iterate(ds, cfg.workers, cfg.worker_buffer_size), ds, cfg, ids,
                           cfg.batch_size // process_count, names)
  return it if mesh is None else GlobalBatchIterator(it, mesh)


def iterate(ds: grain.MapDataset, workers: int, worker_buffer_size: int = 4):
  """`ds` as a checkpointable iterator, its maps (decoding) run in `workers` processes (0: in this one).
  Every stream of decoded examples goes through here: training, preference pairs, RL prompts, data check."""
  stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=1 if workers else 2, prefetch_buffer_size=16))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain reads absl flags; our entry points do not parse any
      flags.FLAGS.mark_as_parsed()
    stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                             per_worker_buffer_size=worker_buffer_size))
  return iter(stream)
