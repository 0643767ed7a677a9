"""The index space of a run: sources -> seeded shuffle -> epochs -> weighted mix -> this process's shard.

A grain MapDataset: element i of the result is fully determined by (config, process index, i), which
is what lets the packer re-read any example by index after a restore. Decoding is a lazy `map`, so it
runs wherever the element is fetched (in Grain's worker processes during training).

Epochs: each source is shuffled (seed + source number, reshuffled each epoch) and repeated
`num_epochs` times (forever when None). Mixing: `MapDataset.mix` interleaves the sources in proportion
to their weights; with finite epochs the mixture ends when its first source runs out.
Sharding: process i of n takes elements i, i+n, i+2n, ... of the mixture, so together the processes
see every element exactly once.
"""

from __future__ import annotations

import grain

from train.data.config import DataConfig
from train.data.decode import Decoder


class _WithIndex:
  """Attaches the element's index in the final dataset (the key the packer re-reads it by)."""

  def __call__(self, index: int, item: dict) -> dict:
    return {**item, "_index": int(index)}


def build_dataset(cfg: DataConfig, sources: list, decoders: list[Decoder], process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Decoded, mixed, sharded MapDataset; each element an example or a bad-sample marker with `_index`."""
  if not sources:
    raise ValueError("data.sources is empty: nothing to read")
  parts = []
  for i, (source, decode) in enumerate(zip(sources, decoders)):
    if len(source) == 0:
      raise ValueError(f"source {i} ({getattr(source, 'path', source)}) has no records")
    ds = grain.MapDataset.source(source)
    if cfg.shuffle:
      ds = ds.shuffle(seed=cfg.seed + i)
    if cfg.num_epochs is None:
      ds = ds.repeat()
    elif cfg.num_epochs > 1:
      ds = ds.repeat(cfg.num_epochs)
    parts.append(ds.map(decode))
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [s.weight for s in cfg.sources])
  ds = ds[process_index::process_count]
  return ds.map_with_index(_WithIndex())
