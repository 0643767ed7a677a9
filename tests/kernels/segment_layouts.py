"""Packed segment-id rows for attention tests: (S,) int32, ids increasing from 1, 0 = padding."""

import numpy as np


def from_lengths(lengths, total: int) -> np.ndarray:
  """Segments of the given lengths in order, then padding up to `total`."""
  ids = np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])
  assert len(ids) <= total
  return np.concatenate([ids, np.zeros(total - len(ids), np.int32)])


def many_short(total: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  lengths, used = [], 0
  while True:
    n = int(rng.integers(1, 21))
    if used + n > total - 5:
      break
    lengths.append(n)
    used += n
  return from_lengths(lengths, total)


def one_long(total: int) -> np.ndarray:
  return from_lengths([total], total)


def padding_at_end(total: int) -> np.ndarray:
  return from_lengths([total * 3 // 8, total * 3 // 8], total)


def crossing_block_edges(total: int, block: int) -> np.ndarray:
  """Boundaries one token either side of block edges, and a segment spanning two edges."""
  lengths = [block - 1, 2, 2 * block - 1, block // 2]
  return from_lengths(lengths, total)


def single_tokens(total: int) -> np.ndarray:
  lengths = [1] * 9 + [total // 4] + [1] * 7 + [total // 8] + [1] * 3
  return from_lengths(lengths, total)


LAYOUTS = {
    "many_short": lambda s, blk: many_short(s),
    "one_long": lambda s, blk: one_long(s),
    "padding_at_end": lambda s, blk: padding_at_end(s),
    "crossing_block_edges": lambda s, blk: crossing_block_edges(s, blk),
    "single_tokens": lambda s, blk: single_tokens(s),
}
