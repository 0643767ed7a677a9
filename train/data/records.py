"""The record format shared by every source kind.

A record is one conversation in the Keye/Qwen message format plus optional metadata:

  {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0.png"},
                                             {"type": "text", "text": "What colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
   "id": "...", "category": "...", "answer": "B", "options": [...]}      # metadata is optional

In a JSONL manifest, media paths are relative to the manifest. In ArrayRecord and TFDS records the media
bytes travel inline, in a small container:

  b"KRC1" | uint32 little-endian header length | JSON header | blob 0 | blob 1 | ...
  header = {"record": <record with media values "blob:NAME">, "blobs": [[NAME, size], ...]}

A media value is a path string, or (videos given as frames) a list of path strings.
"""

from __future__ import annotations

import json
import os
import struct

MAGIC = b"KRC1"
MEDIA_KEYS = ("image", "video")
_BLOB = "blob:"


class RecordError(ValueError):
  """A record cannot be parsed; the message says why."""


def media_refs(record: dict) -> list[tuple[dict, str, int | None]]:
  """Every media reference of a record as (element, key, list index or None), in order."""
  refs = []
  messages = record.get("messages")
  if not isinstance(messages, list):
    return refs
  for message in messages:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
      continue
    for element in content:
      if not isinstance(element, dict):
        continue
      for key in MEDIA_KEYS:
        value = element.get(key)
        if isinstance(value, str):
          refs.append((element, key, None))
        elif isinstance(value, list):
          refs.extend((element, key, i) for i, v in enumerate(value) if isinstance(v, str))
  return refs


def _get(element, key, i):
  return element[key] if i is None else element[key][i]


def _set(element, key, i, value):
  if i is None:
    element[key] = value
  else:
    element[key][i] = value


def pack_record(record: dict, base_dir: str) -> bytes:
  """Container bytes with every local media file of `record` (paths relative to `base_dir`) inline."""
  record = json.loads(json.dumps(record))  # deep copy
  names, blobs = [], []
  for element, key, i in media_refs(record):
    path = _get(element, key, i)
    if "://" in path or path.startswith("data:"):
      continue  # URLs stay as they are
    full = path if os.path.isabs(path) else os.path.join(base_dir, path)
    with open(full, "rb") as f:
      blobs.append(f.read())
    name = f"{len(names)}_{os.path.basename(path)}"
    names.append(name)
    _set(element, key, i, _BLOB + name)
  header = json.dumps({"record": record, "blobs": [[n, len(b)] for n, b in zip(names, blobs)]}).encode()
  return b"".join([MAGIC, struct.pack("<I", len(header)), header, *blobs])


def unpack_record(data: bytes) -> tuple[dict, dict[str, bytes]]:
  """(record, {blob name: bytes}) from container bytes, or from plain JSON bytes (no blobs)."""
  data = bytes(data)
  if not data.startswith(MAGIC):
    try:
      record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(f"not a KRC1 container nor JSON: {e}") from e
    if not isinstance(record, dict):
      raise RecordError(f"a record must be a JSON object, got {type(record).__name__}")
    return record, {}
  if len(data) < 8:
    raise RecordError("truncated container header")
  (n,) = struct.unpack("<I", data[4:8])
  try:
    header = json.loads(data[8:8 + n])
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RecordError(f"container header is not JSON: {e}") from e
  blobs, offset = {}, 8 + n
  for name, size in header["blobs"]:
    if offset + size > len(data):
      raise RecordError(f"blob {name} runs past the end of the record")
    blobs[name] = data[offset:offset + size]
    offset += size
  return header["record"], blobs


def materialize(record: dict, blobs: dict[str, bytes], out_dir: str) -> dict:
  """Writes the blobs into `out_dir` and returns the record with media paths relative to it."""
  record = json.loads(json.dumps(record))
  for element, key, i in media_refs(record):
    value = _get(element, key, i)
    if not value.startswith(_BLOB):
      continue
    name = value[len(_BLOB):]
    if name not in blobs:
      raise RecordError(f"media {value!r} is referenced but not stored in the record")
    safe = os.path.basename(name)
    with open(os.path.join(out_dir, safe), "wb") as f:
      f.write(blobs[name])
    _set(element, key, i, safe)
  return record
