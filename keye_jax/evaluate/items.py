"""What every benchmark adapter produces: one `Item` per question, in the Keye message format.

An adapter module has `NAME`, `MAX_NEW_TOKENS` and `load(data_path, media_dir) -> list[Item]` (media
that arrive as bytes inside the published files are written once to `media_dir`); it may define
`score(item, text, judge) -> dict` to replace `scoring.score`.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
