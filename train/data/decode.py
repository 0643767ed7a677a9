"""Record bytes -> one tokenised example, or a bad-sample marker that says where and why.

Runs in the Grain worker processes. An example is the dict `keye_jax.processing.encode_example` returns
(input_ids (S,), loss_mask (S,), position_ids (3, S), pixel_values (P, 588), grids_hw (n, 2)) plus
`_source` (source number) and `_where` (file and line/record). A bad sample is
{"_bad": reason, "_error": message, "_where": ..., "_source": ...}; the packer counts and skips it, so a
bad file costs one sample, never the run (until the configured bad fraction is exceeded).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile

import numpy as np

from train.data.records import RecordError, materialize, media_refs, unpack_record

PATCH_DIM = 3 * 14 * 14


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The special tokens the pipeline needs, resolved by name from the tokenizer."""

  pad: int
  vision_start: int
  vision_end: int
  image_pad: int
  video_pad: int


def token_ids(tokenizer) -> TokenIds:
  def get(name):
    if hasattr(tokenizer, "token_to_id"):
      i = tokenizer.token_to_id(name)
    else:
      i = tokenizer.convert_tokens_to_ids(name)
    if i is None:
      raise ValueError(f"tokenizer has no token {name}")
    return int(i)

  return TokenIds(pad=get("<|endoftext|>"), vision_start=get("<|vision_start|>"),
                  vision_end=get("<|vision_end|>"), image_pad=get("<|image_pad|>"),
                  video_pad=get("<|video_pad|>"))


def _default_encode(messages, tokenizer, base_dir=None, **kwargs):
  from keye_jax.processing.chat import encode_example
  return encode_example(messages, tokenizer, base_dir=base_dir, **kwargs)


def _reason(e: Exception) -> str:
  if isinstance(e, RecordError):
    return "invalid record"
  chain, cause = [], e
  while cause is not None and len(chain) < 5:
    chain.append(cause)
    cause = cause.__cause__ or cause.__context__
  if any(isinstance(c, FileNotFoundError) for c in chain) or "no such file" in str(e).lower() \
      or "not found" in str(e).lower():
    return "missing media"
  if type(e).__name__ == "MediaError" or any(type(c).__name__ in ("MediaError", "InvalidDataError",
                                                                  "UnidentifiedImageError") for c in chain):
    return "bad media"
  return f"encode error ({type(e).__name__})"


class Decoder:
  """Picklable callable: raw item of a source -> example or bad marker."""

  def __init__(self, tokenizer, source_id: int, encode=None, vision_kwargs: dict | None = None):
    self.tokenizer = tokenizer
    self.source_id = source_id
    self.encode = encode or _default_encode
    self.vision_kwargs = dict(vision_kwargs or {})
    self.ids = token_ids(tokenizer)

  def __call__(self, raw: dict) -> dict:
    where = raw.get("where", "?")
    try:
      example = self._decode(raw)
    except Exception as e:  # every failure of one sample is that sample's problem, reported with its file
      return {"_bad": _reason(e), "_error": f"{type(e).__name__}: {e}", "_where": where,
              "_source": self.source_id}
    if isinstance(example, str):
      return {"_bad": example, "_error": example, "_where": where, "_source": self.source_id}
    example["_source"] = self.source_id
    example["_where"] = where
    return example

  def _decode(self, raw: dict) -> dict | str:
    try:
      record, blobs = unpack_record(raw["data"])
    except json.JSONDecodeError as e:
      raise RecordError(str(e)) from e
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages or not any(
        isinstance(m, dict) and m.get("content") for m in messages):
      return "empty conversation"
    if blobs or any(_get_ref(r).startswith("blob:") for r in media_refs(record)):
      with tempfile.TemporaryDirectory(prefix="keye-record-") as tmp:
        record = materialize(record, blobs, tmp)
        example = self.encode(record["messages"], self.tokenizer, base_dir=tmp, **self.vision_kwargs)
    else:
      example = self.encode(messages, self.tokenizer, base_dir=raw.get("base_dir") or None,
                            **self.vision_kwargs)
    return self._validate(example)

  def _validate(self, ex: dict) -> dict | str:
    """Canonical dtypes and shapes; inconsistencies between text and vision make a bad sample."""
    out = {
        "input_ids": np.asarray(ex["input_ids"], np.int32).reshape(-1),
        "loss_mask": np.asarray(ex["loss_mask"], bool).reshape(-1),
        "position_ids": np.asarray(ex["position_ids"], np.int32),
        "pixel_values": np.asarray(ex.get("pixel_values", np.zeros((0, PATCH_DIM))), np.float32),
        "grids_hw": np.asarray(ex.get("grids_hw", np.zeros((0, 2))), np.int32).reshape(-1, 2),
    }
    s = len(out["input_ids"])
    if s == 0:
      return "empty conversation"
    if out["loss_mask"].shape != (s,) or out["position_ids"].shape != (3, s):
      raise ValueError(f"encoder returned loss_mask {out['loss_mask'].shape} and position_ids "
                       f"{out['position_ids'].shape} for {s} tokens")
    out["pixel_values"] = out["pixel_values"].reshape(-1, PATCH_DIM)
    patches = int(np.prod(out["grids_hw"], axis=1).sum())
    ids = out["input_ids"]
    pads = int(np.sum((ids == self.ids.image_pad) | (ids == self.ids.video_pad)))
    if patches != len(out["pixel_values"]) or pads * 4 != patches or np.any(out["grids_hw"] % 2):
      return "vision token mismatch"
    if not out["loss_mask"].any():
      return "no training target"
    return out


def _get_ref(ref) -> str:
  element, key, i = ref
  return element[key] if i is None else element[key][i]


def is_bad(item: dict) -> bool:
  return "_bad" in item
