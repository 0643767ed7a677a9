"""What every benchmark adapter produces: one `Item` per question, in the Keye message format.

An adapter module has `NAME`, `MAX_NEW_TOKENS` and `load(data_path, media_dir) -> list[Item]` (media
that arrive as bytes inside the published files are written once to `media_dir`); it may define
`score(item, text, judge) -> dict` to replace `scoring.score`, `NEEDS_JUDGE = True`, and
`diagnostics(records) -> dict` for extra entries of results.json. An item whose media cannot be found
carries `error` (it counts as an error and as wrong; the load goes on).
Malformed files are a ValueError naming the file, the line and the key (`read_jsonl`, `read_json`, `need`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from keye_jax.evaluate.extract import LETTERS

CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."


@dataclasses.dataclass
class Item:
  id: str
  messages: list[dict]                      # the user turn(s); media paths absolute
  kind: str                                 # "choice" | "open" | "instruction"
  answer: object = None                     # letter (choice), text/number or list of them (open)
  options: list[str] = dataclasses.field(default_factory=list)
  categories: dict[str, str] = dataclasses.field(default_factory=dict)   # group name -> category
  extra: dict = dataclasses.field(default_factory=dict)
  error: str | None = None                  # why the item cannot be run (missing media); scored as wrong


def user(content: list[dict]) -> list[dict]:
  return [{"role": "user", "content": content}]


def lettered(options, style: str = "{letter}. {text}") -> str:
  """'A. x\\nB. y' (or another style such as '({letter}) {text}'); already-lettered options kept."""
  options = [str(o) for o in options]
  if all(o.startswith(f"{LETTERS[i]}.") for i, o in enumerate(options)):
    return "\n".join(options)
  return "\n".join(style.format(letter=LETTERS[i], text=o) for i, o in enumerate(options))


def save_media(data: bytes, media_dir: str, stem: str, ext: str = ".png") -> str:
  """Writes bytes once (content-addressed, so a resumed run reuses them); returns the absolute path."""
  os.makedirs(media_dir, exist_ok=True)
  digest = hashlib.sha1(data).hexdigest()[:12]
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
  path = os.path.abspath(os.path.join(media_dir, f"{safe}-{digest}{ext}"))
  if not os.path.exists(path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  return path


def index_files(root: str, exts: tuple[str, ...]) -> dict[str, str]:
  """basename -> path for every file under root with one of `exts` (first found wins)."""
  out: dict[str, str] = {}
  for dirpath, _, files in os.walk(root):
    for f in sorted(files):
      if f.lower().endswith(exts):
        out.setdefault(f, os.path.join(dirpath, f))
  return out


def read_parquet_rows(path: str) -> list[dict]:
  import pyarrow.parquet as pq
  return pq.read_table(path).to_pylist()


def find_files(data_path: str, suffix: str) -> list[str]:
  """`data_path` itself if it is such a file, else every such file under it, sorted."""
  if os.path.isfile(data_path):
    return [data_path]
  if not os.path.isdir(data_path):
    raise FileNotFoundError(f"no such file or directory: {data_path}")
  found = sorted(os.path.join(d, f) for d, _, fs in os.walk(data_path) for f in fs if f.endswith(suffix))
  if not found:
    raise FileNotFoundError(f"no *{suffix} files under {data_path}")
  return found


def read_jsonl(path: str) -> list[tuple[int, dict]]:
  """(line number, record) for each non-empty line; bad JSON is a ValueError naming the file and line."""
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {n}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(r, dict):
        raise ValueError(f"{path} line {n}: expected a JSON object, got {type(r).__name__}")
      out.append((n, r))
  return out


def read_json(path: str):
  """A whole-file JSON document; bad JSON is a ValueError naming the file, line and column."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def need(record: dict, key: str, where: str):
  """record[key], or a ValueError naming the key and where the record is ('FILE line N')."""
  if not isinstance(record, dict) or key not in record:
    raise ValueError(f"{where}: missing key {key!r}")
  return record[key]
