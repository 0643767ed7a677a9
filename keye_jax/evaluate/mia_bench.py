"""MIA-Bench (instruction following) as published: `instruction_benchmark_all.json`, a list of
{"image": URL, "instruction", "type", "num_of_component", "components", "component_weight" (sums to 10),
"component_type"}. Images are looked up by the URL's file name anywhere under the data directory
(download them first); a local path in "image" is used as is.

Scoring, per component: a rule check where the component states something checkable (sentence, line,
word or list-item counts; forbidden words or letters), else the external judge's grade (a command given
`--judge-cmd`, reading the grading prompt on stdin and answering "component k: x/y" per component), else
the component is not scored. An item's score is the weighted share of its scored components; items with
none are left out of the accuracy (the results report the coverage). Category: the item's type."""

from __future__ import annotations

import json
import os
import re
import subprocess

from keye_jax.evaluate.items import Item, find_files, index_files, user

NAME = "mia_bench"
MAX_NEW_TOKENS = 512
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
_NUM = r"(\d+|" + "|".join(NUMBERS) + r")"


def _int(word: str) -> int:
  return int(word) if word.isdigit() else NUMBERS[word]


# --------------------------------------------------------------------------------------------------
# Counting the response.

def count_sentences(text: str) -> int:
  text = re.sub(r"\b(?:Mr|Mrs|Ms|Dr|St|vs|e\.g|i\.e|etc)\.", "", text.strip())
  return len([s for s in re.split(r"(?<=[.!?])[\"')\]]*\s+|\n+", text) if re.search(r"\w", s)])


def count_lines(text: str) -> int:
  return len([ln for ln in text.strip().splitlines() if ln.strip()])


def count_words(text: str) -> int:
  return len(re.findall(r"[A-Za-z0-9'’-]+", text))


def count_bullets(text: str) -> int:
  return len([ln for ln in text.splitlines() if re.match(r"\s*(?:[-*•]|\d+[.)])\s+\S", ln)])


def _compare(n: int, qualifier: str, target: int) -> bool:
  if re.search(r"no more than|at most|up to|maximum|or fewer|or less|within|under|fewer than|less than",
               qualifier):
    return n < target if re.search(r"under|fewer than|less than", qualifier) else n <= target
  if re.search(r"at least|minimum|or more|more than", qualifier):
    return n > target if "more than" in qualifier and "no more" not in qualifier else n >= target
  return n == target


def rule_check(component: str, response: str) -> bool | None:
  """True/False when the component states a checkable constraint, None otherwise."""
  c = component.lower()
  m = re.search(rf"((?:no more than|at most|up to|at least|exactly|within|under|fewer than|less than)?\s*(?:a\s+)?)"
                rf"{_NUM}[\s-](sentences?|lines?|words?|paragraphs?|item|bullet)", c)
  if m:
    qualifier, target, unit = m.group(1), _int(m.group(2)), m.group(3)
    if unit.startswith("sentence"):
      n = count_sentences(response)
    elif unit.startswith("line"):
      n = count_lines(response)
    elif unit.startswith("word"):
      if "each" in c or "per" in c:
        return None  # per-sentence word counts are the judge's job
      n = count_words(response)
    elif unit.startswith("paragraph"):
      n = len([p for p in re.split(r"\n\s*\n", response.strip()) if p.strip()])
    else:
      n = count_bullets(response)
    return _compare(n, qualifier, target)
  if re.search(r"\bin one sentence\b|\busing one (?:complete )?sentence\b|\ba single sentence\b", c):
    return count_sentences(response) == 1
  m = re.search(r"without (?:using|mentioning|including) the letter ['\"‘“]?([a-z])['\"’”]?", c)
  if m:
    return m.group(1) not in response.lower()
  m = re.search(r"without (?:using|mentioning|including|saying) (?:the )?words?\s+(.+)", component, re.IGNORECASE)
  if m:
    words = re.findall(r"[\"“'‘]([^\"”'’]+)[\"”'’]", m.group(1))
    if words:
      return not any(re.search(rf"\b{re.escape(w.lower())}\b", response.lower()) for w in words)
  return None


# --------------------------------------------------------------------------------------------------
# The external judge.

def judge_prompt(item: Item, response: str) -> str:
  comps = "\n".join(f"component {i + 1} (worth {w}): {c}" for i, (c, w) in
                    enumerate(zip(item.extra["components"], item.extra["component_weight"])))
  ex = ", ".join(f"score of component {i + 1}: x{i + 1}/{w}" for i, w in enumerate(item.extra["component_weight"]))
  return (f"Grade strictly how well a multimodal model's response follows an instruction.\n"
          f"Instruction: {item.extra['instruction']}\nThe instruction has these components:\n{comps}\n"
          f"Response:\n{response}\n\nReply on one line in exactly this format, numbers only, no markdown: "
          f"{ex}, total score: z/10. Then explain.")


def parse_judge(reply: str, n: int) -> list[float | None]:
  """Per-component fractions in [0, 1] from 'component k: x/y'; None where the judge gave none."""
  out: list[float | None] = [None] * n
  for k, x, y in re.findall(r"component\s+(\d+)\s*:\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", reply, re.IGNORECASE):
    i = int(k) - 1
    if 0 <= i < n and float(y) > 0:
      out[i] = min(1.0, max(0.0, float(x) / float(y)))
  return out


def command_judge(cmd: str, timeout: float = 600):
  """A judge that runs a shell command: grading prompt on stdin, grade on stdout."""
  def judge(prompt: str) -> str:
    done = subprocess.run(cmd, shell=True, input=prompt, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
      raise RuntimeError(f"judge command failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout
  return judge


def score(item: Item, text: str, judge=None) -> dict:
  from keye_jax.evaluate.extract import after_thinking
  response = after_thinking(text)
  comps, weights = item.extra["components"], item.extra["component_weight"]
  rules = [rule_check(c, response) for c in comps]
  judged = parse_judge(judge(judge_prompt(item, response)), len(comps)) if judge is not None else [None] * len(comps)
  parts = [float(r) if r is not None else j for r, j in zip(rules, judged)]
  known = [(w, p) for w, p in zip(weights, parts) if p is not None]
  total = sum(w for w, _ in known)
  return {"pred": None, "components": parts, "rule_checked": sum(r is not None for r in rules),
          "score": (sum(w * p for w, p in known) / total) if total else None}


def load(data_path: str, media_dir: str | None = None) -> list[Item]:
  path = data_path if os.path.isfile(data_path) else find_files(data_path, ".json")[0]
  root = os.path.dirname(os.path.abspath(path))
  images = index_files(root, (".jpg", ".jpeg", ".png", ".webp"))
  with open(path) as f:
    records = json.load(f)
  items = []
  for i, r in enumerate(records):
    src = r["image"]
    local = src if os.path.exists(src) else images.get(src.rstrip("/").split("/")[-1])
    if local is None:
      raise FileNotFoundError(f"MIA-Bench item {i}: image {src} not found under {root} (download it first)")
    items.append(Item(f"{i:04d}", user([{"type": "image", "image": os.path.abspath(local)},
                                        {"type": "text", "text": r["instruction"]}]), "instruction",
                      categories={"type": r.get("type", "all")},
                      extra={k: r[k] for k in ("instruction", "components", "component_weight", "component_type")}))
  return items
