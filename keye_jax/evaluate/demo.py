"""The synthetic demo benchmark (train/data/demo.py): `test.jsonl` of four-option questions, counting
questions answered by a number, and instruction-following prompts.

Record: {"id", "category", "messages": [user, assistant], "answer": "B", "options": [...]} (a record without
options, e.g. {"answer": "2"}, is an open question scored by the number rule); media paths
are relative to the manifest. The user turn is asked as is (a " /think" suffix selects thinking mode).
A record with IFEval-style `instruction_id_list` + `kwargs` is an instruction-following item, scored by
lm-eval's IFEval checkers (prompt-level strict; loose alongside; keye_jax/evaluate/ifeval.py)."""

from __future__ import annotations

import copy
import os

from keye_jax.evaluate.items import Item, need, read_jsonl

NAME = "demo"
MAX_NEW_TOKENS = 128
# The demo's video questions (what happened, when) are scored as one `video` category.
CATEGORY = {"video_event": "video", "video_time": "video", "long_video": "video"}


def _absolute(messages: list[dict], root: str) -> list[dict]:
  messages = copy.deepcopy(messages)
  for m in messages:
    for el in m.get("content", []) if isinstance(m.get("content"), list) else []:
      for key in ("image", "video"):
        v = el.get(key)
        if isinstance(v, str) and not os.path.isabs(v) and "://" not in v and not v.startswith("data:"):
          el[key] = os.path.join(root, v)
        elif isinstance(v, list):
          el[key] = [p if os.path.isabs(p) else os.path.join(root, p) for p in v]
  return messages


def _text(content) -> str:
  if isinstance(content, str):
    return content
  return "".join(e.get("text", "") for e in content or [] if isinstance(e, dict))


def load(data_path: str, media_dir: str | None = None) -> list[Item]:
  path = os.path.join(data_path, "test.jsonl") if os.path.isdir(data_path) else data_path
  root = os.path.dirname(os.path.abspath(path))
  items = []
  for n, r in read_jsonl(path):
    where = f"{path} line {n}"
    turns = [m for m in need(r, "messages", where) if m.get("role") != "assistant"]
    cats = {"category": CATEGORY.get(r.get("category", "all"), r.get("category", "all"))}
    if "instruction_id_list" in r:
      prompt = "".join(_text(m.get("content")) for m in turns)
      items.append(Item(id=str(need(r, "id", where)), messages=_absolute(turns, root), kind="ifeval",
                        categories=cats, extra={"instruction_id_list": list(r["instruction_id_list"]),
                                                "kwargs": list(need(r, "kwargs", where)), "prompt": prompt}))
      continue
    # Four-option questions are scored by their letter; reasoning questions (no options) by the number.
    options = list(r.get("options") or [])
    items.append(Item(id=str(need(r, "id", where)), messages=_absolute(turns, root),
                      kind="choice" if options else "open", answer=need(r, "answer", where), options=options,
                      categories=cats))
  return items
