"""The synthetic demo benchmark (train/data/demo.py): `test.jsonl` of four-option questions.

Record: {"id", "category", "messages": [user, assistant], "answer": "B", "options": [...]}; media paths
are relative to the manifest. The user turn is asked as is (a " /think" suffix selects thinking mode)."""

from __future__ import annotations

import copy
import json
import os

from keye_jax.evaluate.items import Item

NAME = "demo"
MAX_NEW_TOKENS = 128


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


def load(data_path: str, media_dir: str | None = None) -> list[Item]:
  path = os.path.join(data_path, "test.jsonl") if os.path.isdir(data_path) else data_path
  root = os.path.dirname(os.path.abspath(path))
  items = []
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      r = json.loads(line)
      turns = [m for m in r["messages"] if m["role"] != "assistant"]
      items.append(Item(id=str(r["id"]), messages=_absolute(turns, root), kind="choice", answer=r["answer"],
                        options=list(r.get("options") or []),
                        categories={"category": r.get("category", "all")}))
  return items
