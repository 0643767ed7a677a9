"""Preference pairs for MPO: pair records -> two tokenised sequences -> both packed into one row.

A pair record (one JSONL line, or a KRC1 container with media inline; the media rules of records.py):
  {"messages": [prompt turns, the last one a user turn], "chosen": REPLY, "rejected": REPLY, "id": ...}
  REPLY: a string, a content list, or an assistant message {"role": "assistant", "content": ...}
or the pairwise reward model's form (train/rewards/pairwise.pair_sft_records reads the same):
  {"prompt": "text", "images": [paths], "videos": [paths], "chosen": "...", "rejected": "..."}

Each side is encoded as the conversation prompt + that reply (train/data/decode.Decoder: the same
tokenisation, media, loss mask and bad-sample handling as SFT), so its targets are the reply's tokens.

Row layout: packing.py's, a pair's chosen and rejected sequences being two adjacent segments of the same
row (each with its own 3D positions from 0 and its own copy of the prompt's media), never split over rows
(so microbatches and batch shards never cut a pair), plus per-token fields
  pair_ids (S,) int32     the pair's number in its row, 1..n; 0 on padding
  pair_side (S,) int32    1 on the chosen sequence, 2 on the rejected one; 0 on padding
  ref_logps (S,) float32  the sequence's reference log-probability (summed over its targets) on its first
                          token, 0 elsewhere (training batches; from the reference pass, train/mpo.py)
  pair_keys (S,) int32    the pair's key on every token (reference-pass batches only)
and per-row fields (B,) float32, the same in every row: `mpo_pairs` and `mpo_chosen_tokens`, the pairs and
chosen-reply target tokens of the whole global batch (what the loss normalises by, so that
microbatching changes nothing).

A pair's key is its record index in its source plus the records of the sources before it (config order):
the reference log-probs are stored by key. A pair too long for one row is dropped and counted
(`dropped`); cutting replies would change what is preferred.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import struct

import grain
import numpy as np

from keye_jax import batch_layout
from train.data.config import DataConfig
from train.data.decode import Decoder, is_bad, token_ids
from train.data.mixture import build_dataset
from train.data.packing import BinPacker, build_row, example_size, stack_rows
from train.data.pipeline import DataError, GlobalBatchIterator, iterate
from train.data.records import MAGIC, RecordError, unpack_record
from train.data.sources import open_source

log = logging.getLogger("train.data")
PAIR_FIELDS = {"pair_ids": np.int32, "pair_side": np.int32, "ref_logps": np.float32}
CHOSEN, REJECTED = 1, 2


def _reply(value, side: str) -> dict:
  if isinstance(value, dict):
    if value.get("role", "assistant") != "assistant" or "content" not in value:
      raise RecordError(f"{side!r}: a message must be an assistant turn with a 'content'")
    return {"role": "assistant", "content": value["content"]}
  if isinstance(value, (str, list)):
    return {"role": "assistant", "content": value}
  raise RecordError(f"{side!r}: expected a string, a content list or an assistant message, "
                    f"got {type(value).__name__}")


def pair_conversations(record: dict) -> tuple[list[dict], list[dict]]:
  """(chosen conversation, rejected conversation) of a pair record (module doc); RecordError if malformed."""
  for side in ("chosen", "rejected"):
    if record.get(side) is None:
      raise RecordError(f"preference pair {record.get('id', '?')!r}: no {side!r}")
  if "messages" in record:
    prompt = record["messages"]
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[-1], dict) \
        or prompt[-1].get("role") != "user":
      raise RecordError("'messages' must be the prompt: a list of turns ending with a user turn")
  elif isinstance(record.get("prompt"), str):
    media = ([{"type": "image", "image": p} for p in record.get("images") or []]
             + [{"type": "video", "video": v} for v in record.get("videos") or []])
    prompt = [{"role": "user", "content": media + [{"type": "text", "text": record["prompt"]}]}]
  else:
    raise RecordError("a preference pair needs 'messages' (the prompt turns) or a 'prompt' string")
  return ([*prompt, _reply(record["chosen"], "chosen")], [*prompt, _reply(record["rejected"], "rejected")])


def _record_bytes(record: dict, blobs: dict[str, bytes]) -> bytes:
  """A record (and its inline media) in the form records.unpack_record reads."""
  if not blobs:
    return json.dumps(record).encode()
  header = json.dumps({"record": record, "blobs": [[n, len(b)] for n, b in blobs.items()]}).encode()
  return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blobs.values()])


class IndexedSource:
  """A source whose items carry their pair key (`offset` + record index)."""

  def __init__(self, source, offset: int):
    self.source, self.offset = source, offset

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    return {**self.source[i], "key": self.offset + int(i)}


class PairDecoder:
  """Picklable: raw pair item -> {"chosen": example, "rejected": example, "_key", "_source", "_where"}, or a
  bad-sample marker (decode.py) when the record or either side does not decode."""

  def __init__(self, tokenizer, source_id: int, encode=None, vision_kwargs: dict | None = None):
    self.decoder = Decoder(tokenizer, source_id, encode=encode, vision_kwargs=vision_kwargs)
    self.source_id = source_id

  def __call__(self, raw: dict) -> dict:
    where = raw.get("where", "?")
    try:
      record, blobs = unpack_record(raw["data"])
      sides = pair_conversations(record)
    except (RecordError, json.JSONDecodeError) as e:
      return {"_bad": "invalid record", "_error": f"{type(e).__name__}: {e}", "_where": where,
              "_source": self.source_id}
    out = {"_key": raw["key"], "_source": self.source_id, "_where": where}
    for side, messages in zip(("chosen", "rejected"), sides):
      ex = self.decoder({**raw, "data": _record_bytes({**record, "messages": messages}, blobs)})
      if is_bad(ex):
        return {**ex, "_error": f"{side}: {ex['_error']}"}
      out[side] = ex
    return out


def pair_size(item: dict) -> tuple[int, int]:
  """(text tokens, vision patches) of both sides together."""
  c, r = example_size(item["chosen"]), example_size(item["rejected"])
  return c[0] + r[0], c[1] + r[1]


def _targets(ex: dict) -> int:
  """Target tokens of an example once packed (build_row clears each example's first loss_mask entry)."""
  return int(np.asarray(ex["loss_mask"])[1:].sum())


def pair_row(pairs: list[dict], cfg: DataConfig, ids, reference: dict | None, with_keys: bool) -> dict:
  """One packed row of pairs (module doc); `reference` maps a key to its (chosen, rejected) log-probs."""
  examples = []
  for j, item in enumerate(pairs, start=1):
    ref = None
    if reference is not None:
      ref = reference.get(item["_key"])
      if ref is None:
        raise DataError(f"pair {item['_where']} (key {item['_key']}) has no reference log-probs; the "
                        "reference pass did not see it (did the data change since it ran?)")
    for side, code in (("chosen", CHOSEN), ("rejected", REJECTED)):
      ex = item[side]
      n = len(ex["input_ids"])
      fields = {"pair_ids": np.full(n, j, np.int32), "pair_side": np.full(n, code, np.int32),
                "ref_logps": np.zeros(n, np.float32)}
      if ref is not None:
        fields["ref_logps"][0] = ref[code - 1]
      if with_keys:
        fields["pair_keys"] = np.full(n, item["_key"], np.int32)
      examples.append({k: v for k, v in ex.items() if not k.startswith("_")} | fields)
  row = build_row(examples, cfg.seq_len, cfg.num_patches, ids)
  want = dict(PAIR_FIELDS, **({"pair_keys": np.int32} if with_keys else {}))
  for k, dtype in want.items():  # an empty row has none of them
    row.setdefault(k, np.zeros(cfg.seq_len, dtype))
  return row


def _new_stats(names):
  return {"sources": [{"name": n, "seen": 0, "ok": 0, "bad": {}, "dropped": 0, "first_errors": []}
                      for n in names], "batches": 0, "pairs": 0}


class PairBatchIterator(grain.DatasetIterator):
  """Packs decoded pairs from `parent` into batches of `local_batch` rows; checkpointable like
  pipeline.PackedBatchIterator (state: the parent's position plus the keys of pairs in open rows, re-read
  from `dataset` on restore; `dataset` None: not restorable, as for the one-pass reference iterator)."""

  def __init__(self, parent, dataset, cfg: DataConfig, ids, local_batch: int, source_names: list[str], *,
               reference: dict | None = None, with_keys: bool = False, process_count: int = 1):
    super().__init__(parent)
    self._dataset, self._cfg, self._ids, self._local_batch = dataset, cfg, ids, local_batch
    self._reference, self._with_keys, self._process_count = reference, with_keys, process_count
    self._packer = BinPacker(cfg.seq_len, cfg.num_patches, cfg.packing_bins, cfg.packing == "best_fit")
    self._ready: list[list] = []
    self._cache: dict = {}
    self._stats = _new_stats(source_names)

  def __next__(self) -> dict:
    b = self._local_batch
    while len(self._ready) < b:
      try:
        item = next(self._parent)
      except StopIteration:
        self._check_bad(final=True)
        self._ready.extend(self._packer.flush())
        break
      self._consume(item)
    if not self._ready and not self._stats["pairs"]:
      seen = {s["name"]: (s["seen"], s["ok"], s["dropped"]) for s in self._stats["sources"]}
      raise DataError(f"the data produced no preference pair: (seen, decoded, dropped as too long) per "
                      f"source: {seen}")
    if not self._ready:
      raise StopIteration
    keys, self._ready = self._ready[:b], self._ready[b:]
    rows = [[self._cache.pop(k) for k in row] for row in keys] + [[]] * (b - len(keys))
    batch = stack_rows([pair_row(r, self._cfg, self._ids, self._reference, self._with_keys) for r in rows])
    totals = np.asarray([sum(len(r) for r in rows),
                         sum(_targets(item["chosen"]) for r in rows for item in r)], np.float64)
    if self._process_count > 1:
      from jax.experimental import multihost_utils
      totals = np.asarray(multihost_utils.process_allgather(totals)).reshape(-1, 2).sum(0)
    batch["mpo_pairs"] = np.full(b, totals[0], np.float32)
    batch["mpo_chosen_tokens"] = np.full(b, totals[1], np.float32)
    self._stats["batches"] += 1
    self._stats["pairs"] += sum(len(r) for r in rows)
    return batch

  def _consume(self, item: dict):
    st = self._stats["sources"][item["_source"]]
    st["seen"] += 1
    if is_bad(item):
      st["bad"][item["_bad"]] = st["bad"].get(item["_bad"], 0) + 1
      if len(st["first_errors"]) < self._cfg.log_first_errors:
        msg = f"{item['_where']}: {item['_bad']}: {item['_error']}"
        st["first_errors"].append(msg)
        log.warning("skipping bad preference pair of source %s: %s", st["name"], msg)
      self._check_bad()
      return
    st["ok"] += 1
    size = pair_size(item)
    if size[0] > self._cfg.seq_len or size[1] > self._cfg.num_patches:
      st["dropped"] += 1
      if st["dropped"] == st["ok"] >= self._cfg.bad_check_min_samples:
        raise DataError(f"source {st['name']}: none of the first {st['ok']} pairs fits a row of "
                        f"data.seq_len={self._cfg.seq_len} tokens and data.num_patches={self._cfg.num_patches} "
                        "patches (both replies with the prompt twice); raise them")
      return
    key = item.get("_index", item["_key"])
    self._cache[key] = item
    self._ready.extend(self._packer.add(key, *size))

  def _check_bad(self, final: bool = False):
    cfg = self._cfg
    for st in self._stats["sources"]:
      bad = sum(st["bad"].values())
      if st["seen"] and (final or st["seen"] >= cfg.bad_check_min_samples) \
          and bad / st["seen"] > cfg.max_bad_fraction:
        first = "\n  ".join(st["first_errors"])
        raise DataError(f"source {st['name']}: {bad} of {st['seen']} preference pairs are bad, more than "
                        f"data.max_bad_fraction={cfg.max_bad_fraction}. First errors:\n  {first}")

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "bins": self._packer.state(),
            "ready": [list(r) for r in self._ready], "stats": copy.deepcopy(self._stats)}

  def set_state(self, state: dict):
    if self._dataset is None:
      raise ValueError("this pair iterator cannot be restored (no dataset to re-read pairs from)")
    self._parent.set_state(state["parent"])
    self._packer.set_state(state["bins"])
    self._ready = [list(r) for r in state["ready"]]
    self._stats = copy.deepcopy(state["stats"])
    self._cache = {}
    for key in [k for b in self._packer.bins for k in b[2]] + [k for r in self._ready for k in r]:
      item = self._dataset[key]
      if is_bad(item) or pair_size(item)[0] > self._cfg.seq_len:
        raise DataError(f"restoring the pair iterator: pair {key} ({item.get('_where')}) no longer decodes to "
                        "what was packed; did the data or config change since the checkpoint?")
      self._cache[key] = item

  def stats(self) -> dict:
    return copy.deepcopy(self._stats)


def _sources(cfg: DataConfig, tokenizer, encode=None):
  """([IndexedSource], [PairDecoder]) in config order, keys continuing from one source to the next."""
  sources, decoders, offset = [], [], 0
  for i, s in enumerate(cfg.sources):
    src = open_source(s)
    sources.append(IndexedSource(src, offset))
    decoders.append(PairDecoder(tokenizer, i, encode=encode, vision_kwargs=cfg.vision))
    offset += len(src)
  return sources, decoders


def _processes(process_index, process_count, batch_size):
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  if batch_size % process_count:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by the {process_count} processes")
  return process_index, process_count


def make_pair_iterator(cfg: DataConfig, tokenizer, reference: dict | None, mesh=None, *, encode=None,
                       process_index: int | None = None, process_count: int | None = None):
  """The training stream of pair batches (the mixture, shuffling and epochs of mixture.build_dataset),
  `ref_logps` filled from `reference` ({key: (chosen, rejected)}; None leaves zeros); global jax.Arrays
  given a mesh. Checkpointable."""
  pi, pc = _processes(process_index, process_count, cfg.batch_size)
  sources, decoders = _sources(cfg, tokenizer, encode)
  ds = build_dataset(cfg, sources, decoders, pi, pc)
  it = PairBatchIterator(iterate(ds, cfg.workers, cfg.worker_buffer_size), ds, cfg, token_ids(tokenizer),
                         cfg.batch_size // pc, [s.display_name for s in cfg.sources], reference=reference,
                         process_count=pc)
  return it if mesh is None else GlobalBatchIterator(it, mesh)


class _Chain(grain.DatasetIterator):
  """The per-source streams one after another (the reference pass never saves its position)."""

  def __init__(self, streams: list):
    super().__init__(streams)
    self._it = itertools.chain.from_iterable(streams)

  def __next__(self):
    return next(self._it)

  def get_state(self):
    raise ValueError("the reference pass iterator has no state")

  def set_state(self, state):
    raise ValueError("the reference pass iterator has no state")


def reference_pass_iterator(cfg: DataConfig, tokenizer, *, encode=None, process_index: int | None = None,
                            process_count: int | None = None) -> PairBatchIterator:
  """Every pair of every source exactly once (no shuffle, no mixing, one epoch), this process taking pairs
  i, i+n, ... of each source; batches carry `pair_keys`. Finite; numpy batches."""
  pi, pc = _processes(process_index, process_count, cfg.batch_size)
  sources, decoders = _sources(cfg, tokenizer, encode)
  streams = [iterate(grain.MapDataset.source(s).map(d)[pi::pc], cfg.workers, cfg.worker_buffer_size)
             for s, d in zip(sources, decoders)]
  return PairBatchIterator(_Chain(streams), None, cfg, token_ids(tokenizer), cfg.batch_size // pc,
                           [s.display_name for s in cfg.sources], with_keys=True, process_count=pc)
