"""MMMU validation as published (MMMU/MMMU on the Hub): one `{Subject}/validation-*.parquet` per subject, or
the auto-converted layout `{Subject}/validation/0000.parquet`. Only validation files are read: a file's
split is the first part of its path below the data directory named dev / validation / test (a folder
or a file name's prefix), so dev rows (few-shot examples) are never scored.

Columns used: id ("validation_Art_Theory_12"), question (with "<image k>" references), options (a Python
list written as a string), answer (a letter; for open questions the text or a list-string of accepted
answers), question_type ("multiple-choice" | "open"), image_1..image_7 ({"bytes", "path"} or None).
The images go first in the user turn, in order, then the question; the "<image k>" references stay in the
text. Categories: subject and discipline (MMMU's six groups)."""

from __future__ import annotations

import ast
import os
import re

from keye_jax.evaluate.items import CHOICE_PROMPT, OPEN_PROMPT, Item, find_files, lettered, read_parquet_rows, \
    save_media, user

NAME = "mmmu"
MAX_NEW_TOKENS = 1024

DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                            "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science", "Electronics",
                             "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
_DISCIPLINE_OF = {s: d for d, subs in DISCIPLINES.items() for s in subs}


def discipline_of(subject: str) -> str:
  """'Art_Theory' -> 'Art and Design' (MMMU's six disciplines; 'other' for an unknown subject)."""
  return _DISCIPLINE_OF.get(subject, "other")


def subject_of(item_id: str) -> str:
  """'validation_Art_Theory_12' -> 'Art_Theory'."""
  return "_".join(item_id.split("_")[1:-1])


def parse_list(value) -> list:
  """Options/answers arrive as a list or as a Python list literal in a string."""
  if isinstance(value, (list, tuple)):
    return list(value)
  if isinstance(value, str) and value.strip().startswith("["):
    try:
      return list(ast.literal_eval(value))
    except (ValueError, SyntaxError):
      return [value]
  return [] if value is None else [value]


def _images(row: dict, media_dir: str, stem: str) -> list[dict]:
  out = []
  for k in range(1, 8):
    img = row.get(f"image_{k}")
    if isinstance(img, dict) and img.get("bytes"):
      out.append({"type": "image", "image": save_media(img["bytes"], media_dir, f"{stem}_{k}")})
  return out


def item_from_row(row: dict, media_dir: str, categories: dict | None = None) -> Item:
  rid = str(row["id"])
  subject = subject_of(rid)
  cats = {"subject": subject, "discipline": discipline_of(subject), **(categories or {})}
  if row.get("question_type", "multiple-choice") == "multiple-choice":
    options = [str(o) for o in parse_list(row.get("options"))]
    text = f"{row['question']}\n{lettered(options)}\n{CHOICE_PROMPT}"
    return Item(rid, user(_images(row, media_dir, rid) + [{"type": "text", "text": text}]), "choice",
                str(row["answer"]).strip(), options, cats)
  answer = parse_list(row["answer"]) if str(row["answer"]).strip().startswith("[") else str(row["answer"])
  text = f"{row['question']}\n{OPEN_PROMPT}"
  return Item(rid, user(_images(row, media_dir, rid) + [{"type": "text", "text": text}]), "open", answer, [],
              cats)


SPLITS = ("dev", "validation", "test")


def split_of(path: str, root: str) -> str | None:
  """'dev' / 'validation' / 'test' from the first path part below `root` that names one, else None."""
  for part in os.path.relpath(path, root).split(os.sep):
    m = re.match(r"(dev|validation|test)(?:$|[-_.])", part.lower())
    if m:
      return m.group(1)
  return None


def select_validation(files: list[str], data_path: str) -> list[str]:
  """The validation files; all files when none names a split; a ValueError when others do but none is
  validation."""
  if os.path.isfile(data_path):
    return files
  splits = {f: split_of(f, data_path) for f in files}
  val = [f for f in files if splits[f] == "validation"]
  if val:
    return val
  if any(splits.values()):
    found = sorted({s for s in splits.values() if s})
    raise ValueError(f"no validation split under {data_path} (found {', '.join(found)})")
  return files


def load(data_path: str, media_dir: str) -> list[Item]:
  files = select_validation(find_files(data_path, ".parquet"), data_path)
  items = []
  for f in files:
    for i, r in enumerate(read_parquet_rows(f)):
      try:
        items.append(item_from_row(r, media_dir))
      except KeyError as e:
        raise ValueError(f"{f} row {i}: missing key {e}") from None
  return items
