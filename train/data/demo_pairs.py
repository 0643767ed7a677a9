"""Preference pairs for the demo: each instruction record's obeying reply against one that breaks a constraint.

`write_demo_pairs(out_dir, seed)` reads out_dir/{train,test}_instruction.jsonl (train/data/demo.py) and
writes out_dir/{train,test}_pairs.jsonl, one pair per instruction record, in the prompt form that
train/preference_data.py (MPO) and train/rewards/rm_data.py (the pairwise reward model's SFT manifest) read:

  {"id", "prompt": the user text, "images": [path relative to out_dir], "chosen": the record's reply,
   "rejected": the reply with one constraint broken, "rationale": why one answer is worse (order-free),
   "instruction_id_list", "kwargs": the record's constraints, "broken": the id of the broken one}

The broken constraint is drawn per record (deterministic given the seed) among those whose edit makes the
reply fail both lm-eval's strict and loose IFEval checks while every other instruction still passes
strict (a hard negative: one fault); failing that, any edit failing strict. Edits: a capital letter where
lowercase was asked, a comma where none was allowed, the end phrase / keyword / title / quotation marks
removed, a filler sentence past the word limit. The chosen reply is checked to pass strict; a record
whose reply does not, or which no edit breaks, is skipped and counted.
"""

from __future__ import annotations

import json
import os
import random
import re

from keye_jax.evaluate import ifeval
from train.data.demo import END_PHRASE, INSTRUCTIONS

NAMES = {iid: name for name, (iid, _) in INSTRUCTIONS.items()}
TITLE = "<<shapes>>\n"
FILLER = "Nothing else is drawn on the dark background."
RATIONALE = {
    "lowercase": "The request asks for lowercase letters only. One answer has a capital letter; the other "
                 "follows every instruction.",
    "no_comma": "The request forbids commas. One answer uses a comma; the other follows every instruction.",
    "end": f"The request asks to end with the phrase \"{END_PHRASE}\". One answer does not; the other "
           "follows every instruction.",
    "keyword": "The request asks to include the word {word}. One answer leaves it out; the other follows "
               "every instruction.",
    "short": "The request asks for less than {limit} words. One answer is too long; the other follows every "
             "instruction.",
    "title": "The request asks for a title in double angular brackets. One answer has none; the other "
             "follows every instruction.",
    "quote": "The request asks to wrap the answer in double quotation marks. One answer is not wrapped; the "
             "other follows every instruction.",
}


def _text(content) -> str:
  if isinstance(content, str):
    return content
  return "".join(e.get("text", "") for e in content if e.get("type") == "text")


def _split(reply: str, names: set[str]) -> tuple[bool, bool, str, bool]:
  """(quoted, titled, body, ended) of a demo reply built from the constraint `names` (demo.py's order)."""
  quoted = "quote" in names and len(reply) > 1 and reply[0] == reply[-1] == '"'
  body = reply[1:-1] if quoted else reply
  titled = "title" in names and body.startswith(TITLE)
  body = body[len(TITLE):] if titled else body
  ended = "end" in names and body.endswith(" " + END_PHRASE)
  body = body[:-len(END_PHRASE) - 1] if ended else body
  return quoted, titled, body, ended


def break_constraint(reply: str, name: str, names: set[str], kwargs: dict) -> str:
  """`reply` edited so that it breaks constraint `name` (a key of demo.INSTRUCTIONS), the others kept."""
  quoted, titled, body, ended = _split(reply, names)
  if name == "lowercase":
    body = body[:1].upper() + body[1:]
  elif name == "no_comma":
    body = body.replace(" and ", ", and ", 1) if " and " in body else body.replace(" in ", ", in ", 1)
  elif name == "end":
    ended = False
  elif name == "keyword":
    for word in kwargs["keywords"]:
      body = re.sub(re.escape(word), "view", body, flags=re.IGNORECASE)
  elif name == "short":
    filler = FILLER.lower() if "lowercase" in names else FILLER
    while len(body.split()) < kwargs["num_words"]:
      body = f"{body} {filler}"
  elif name == "title":
    titled = False
  elif name == "quote":
    quoted = False
  else:
    raise ValueError(f"no edit breaks constraint {name!r}")
  out = (TITLE if titled else "") + body + (" " + END_PHRASE if ended else "")
  return f'"{out}"' if quoted else out


def make_pair(record: dict, rng: random.Random) -> dict | None:
  """The pair of one demo instruction record (module doc), or None when its reply fails strict IFEval or no
  edit breaks a constraint."""
  ids, kwargs = list(record["instruction_id_list"]), [dict(k or {}) for k in record["kwargs"]]
  user = next(m for m in record["messages"] if m["role"] == "user")
  prompt = _text(user["content"])
  reply = _text(next(m for m in record["messages"] if m["role"] == "assistant")["content"])
  if not ifeval.check(reply, ids, kwargs, prompt)["strict"]:
    return None
  names = {NAMES[i] for i in ids}
  order = list(range(len(ids)))
  rng.shuffle(order)
  fallback = None
  for k in order:
    rejected = break_constraint(reply, NAMES[ids[k]], names, kwargs[k])
    verdict = ifeval.check(rejected, ids, kwargs, prompt)
    if verdict["strict"]:
      continue
    one_fault = [j for j, ok in enumerate(verdict["strict_list"]) if not ok] == [k]
    if one_fault and not verdict["loose"]:
      fallback = (k, rejected)
      break
    fallback = fallback or (k, rejected)
  if fallback is None:
    return None
  k, rejected = fallback
  images = [e["image"] for e in user["content"] if isinstance(e, dict) and e.get("type") == "image"]
  rationale = RATIONALE[NAMES[ids[k]]].format(word=", ".join(kwargs[k].get("keywords", [])),
                                              limit=kwargs[k].get("num_words"))
  return {"id": record["id"], "prompt": prompt, "images": images, "chosen": reply, "rejected": rejected,
          "rationale": rationale, "instruction_id_list": ids, "kwargs": kwargs, "broken": ids[k]}


def write_demo_pairs(out_dir: str, seed: int = 0) -> dict:
  """Writes out_dir/{train,test}_pairs.jsonl (module doc); returns {"train": N, "test": N, "skipped":
  {split: n}, "path": out_dir}."""
  out_dir = os.path.abspath(out_dir)
  out = {"skipped": {}, "path": out_dir}
  for split in ("train", "test"):
    src = os.path.join(out_dir, f"{split}_instruction.jsonl")
    if not os.path.isfile(src):
      raise FileNotFoundError(f"{src}: no such file (write the demo dataset first: train/data/demo.py)")
    rng = random.Random(f"demo_pairs:{seed}:{split}")
    pairs, skipped = [], 0
    with open(src) as f:
      for number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
          pair = make_pair(record, rng)
        except (KeyError, StopIteration, TypeError, json.JSONDecodeError) as e:
          raise ValueError(f"{src}:{number}: not a demo instruction record ({type(e).__name__}: {e})") from None
        if pair is None:
          skipped += 1
        else:
          pairs.append(pair)
    dst = os.path.join(out_dir, f"{split}_pairs.jsonl")
    with open(dst + ".tmp", "w") as f:
      f.writelines(json.dumps(p) + "\n" for p in pairs)
    os.replace(dst + ".tmp", dst)
    out[split], out["skipped"][split] = len(pairs), skipped
  return out
