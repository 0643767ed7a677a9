"""MIA-Bench (instruction following), scored as the benchmark's own evaluation (apple/ml-mia-bench,
evaluation.ipynb) does: a judge model sees the image and a grading prompt (`judge_prompt`, the official
wording) and replies "score of component 1: x/2, ..., total score: z/10"; an item's score is the judge's
TOTAL score / 10, and the benchmark's is the mean over items. The per-component scores (weights from
`component_weight`) and our rule checks are diagnostics only (results.json "diagnostics").

Data: `instruction_benchmark_all.json` (a list of {"image": URL, "instruction", "type", "num_of_component",
"components", "component_weight" (sums to 10), "component_type"}; images looked up by the URL's file name
anywhere under the data directory, a local path used as is), or the Hub's parquet (lmms-lab/MIA-Bench:
the same columns with the image embedded as {"bytes"}). A missing image is an item error.

Judges (one is required): `--judge-cmd CMD` (the grading prompt on stdin, the item's image paths in
$KEYE_JUDGE_IMAGES separated by os.pathsep, the reply on stdout) or `--judge-ckpt CKPT` (our own sampler on
a checkpoint, image + grading prompt as one user turn). Replies are read leniently (`parse_judge`: markdown
bold, "Total score - 7/10", "7 out of 10", JSON objects). An item the judge could not score (no total and
not every component, a failed judge command) counts as 0 and is counted in results.json "unscored"; the
official notebook silently drops such items and lmms-eval 0.7.3 counts them as 0 without saying so.
Category: the item's type."""

from __future__ import annotations

import json
import os
import re
import subprocess

from keye_jax.evaluate.items import Item, find_files, index_files, read_json, read_parquet_rows, save_media, user

NAME = "mia_bench"
MAX_NEW_TOKENS = 512
NEEDS_JUDGE = True
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
_NUM = r"(\d+|" + "|".join(NUMBERS) + r")"
FIELDS = ("instruction", "components", "component_weight", "component_type")


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
# The judge.

_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")


def judge_prompt(item: Item, response: str) -> str:
  """The official grading prompt (evaluation.ipynb's generate_prompt, its wording kept as is, written for
  any number of components; lmms-eval 0.7.3 appends "EXACT format ... Do not use markdown", which we do
  not: our parser reads markdown instead)."""
  comps, weights = item.extra["components"], [str(w) for w in item.extra["component_weight"]]
  n = len(comps)
  parts = [f"The {_ORDINALS[0]} component is:' {comps[0]}'"]
  parts += [f", and the {_ORDINALS[i]} component is:' {comps[i]}'" for i in range(1, n)]
  # The notebook's own phrasing per component count (sic), generalised past five the way it goes.
  names = {1: "first", 2: "first and second", 3: "first second, and third", 4: "first second, third, and fourth",
           5: "first second, third, fourth and fifth"}.get(n) or "first " + ", ".join(_ORDINALS[1:n])
  worth = f"The {names} component is worth {weights[0]} scores." if n == 1 else \
      f"The {names} component is each worth {', '.join(weights[:-1])} and {weights[-1]} scores."
  return (f"Here is an instruction for a multimodal LLM: ' {item.extra['instruction']} You need to grade if the "
          f"response from the model follows each component of the instruction. {''.join(parts)} The response "
          f"is:' {response}' You need to score the response and be strict. The total score ranges from 0 to 10, "
          f"depending on if the response follows the instruction. {worth} List scores of each component, and "
          f"the total score in one sentence in this format: score of component 1: x/2, score of component 2: "
          f"y/10, total score: z/10. Then explain your reasons.")


_FRACTION = r"(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*(\d+(?:\.\d+)?)"


def _plain(reply: str) -> str:
  """Markdown emphasis, headings and code fences removed ("**Total score**: 7/10" -> "Total score: 7/10")."""
  reply = re.sub(r"```(?:json)?", " ", reply)
  return re.sub(r"[*_#`]+", "", reply)


def _from_json(reply: str, n: int) -> dict | None:
  """{"total": .., "components": [..]} from a JSON object in the reply, or None."""
  for m in re.finditer(r"\{.*\}", reply, re.DOTALL):
    try:
      obj = json.loads(m.group(0))
    except json.JSONDecodeError:
      continue
    if not isinstance(obj, dict):
      continue
    flat = {re.sub(r"[\s_]+", " ", str(k)).strip().lower(): v for k, v in obj.items()}
    total = next((flat[k] for k in ("total score", "total", "score") if k in flat), None)
    comps: list[float | None] = [None] * n
    raw = flat.get("components") or flat.get("component scores")
    if isinstance(raw, list):
      for i, v in enumerate(raw[:n]):
        comps[i] = v.get("score") if isinstance(v, dict) else v
    for k, v in flat.items():
      km = re.fullmatch(r"(?:score of )?component (\d+)(?: score)?", k)
      if km and 0 < int(km.group(1)) <= n:
        comps[int(km.group(1)) - 1] = v
    return {"total": total, "components": comps}
  return None


def _fraction(value, denominator: float | None = None) -> float | None:
  """'7/10' -> 0.7; a bare number over `denominator`; None if unreadable."""
  if value is None or isinstance(value, bool):
    return None
  if isinstance(value, (int, float)):
    return None if not denominator else min(1.0, max(0.0, float(value) / denominator))
  m = re.search(_FRACTION, str(value))
  if m and float(m.group(2)) > 0:
    return min(1.0, max(0.0, float(m.group(1)) / float(m.group(2))))
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*", str(value))
  return _fraction(float(m.group(1)), denominator) if m else None


def parse_judge(reply: str, weights) -> dict:
  """{"total": fraction or None, "components": [fraction or None per component]} from a judge reply:
  "score of component k: x/y" and "total score: z/10", with markdown, "out of", or a JSON object; failing
  a "total", the last "z/10" in the reply."""
  weights = [float(w) for w in weights]
  n = len(weights)
  js = _from_json(reply, n)
  if js is not None and (js["total"] is not None or any(c is not None for c in js["components"])):
    total = _fraction(js["total"], 10.0)
    comps = [_fraction(c, w) for c, w in zip(js["components"], weights)]
    return {"total": total, "components": comps}
  text = _plain(reply)
  comps: list[float | None] = [None] * n
  for k, x, y in re.findall(r"component\s*(\d+)\s*(?:score)?\s*[:=\-]\s*" + _FRACTION, text, re.IGNORECASE):
    i = int(k) - 1
    if 0 <= i < n and float(y) > 0 and comps[i] is None:
      comps[i] = min(1.0, max(0.0, float(x) / float(y)))
  total = None
  m = re.search(r"total\s*(?:score)?\s*(?:is|[:=\-])?\s*" + _FRACTION, text, re.IGNORECASE)
  if m and float(m.group(2)) > 0:
    total = min(1.0, max(0.0, float(m.group(1)) / float(m.group(2))))
  elif not any(c is not None for c in comps):
    tens = re.findall(r"(\d+(?:\.\d+)?)\s*(?:/|out\s+of)\s*10\b", text)
    total = min(1.0, max(0.0, float(tens[-1]) / 10)) if tens else None
  return {"total": total, "components": comps}


def command_judge(cmd: str, timeout: float = 600):
  """A judge that runs a shell command: grading prompt on stdin, image paths in $KEYE_JUDGE_IMAGES."""
  def judge(prompt: str, images: list[str]) -> str:
    env = {**os.environ, "KEYE_JUDGE_IMAGES": os.pathsep.join(images)}
    try:
      done = subprocess.run(cmd, shell=True, input=prompt, capture_output=True, text=True, timeout=timeout,
                            env=env)
    except subprocess.TimeoutExpired:
      raise RuntimeError(f"judge command timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
      raise RuntimeError(f"judge command failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return done.stdout
  return judge


def sampler_judge(sampler, encode, max_new_tokens: int = 512):
  """A judge that is one of our checkpoints: `encode(messages) -> Prompt` and a Sampler over the judge
  model; the image(s) and the grading prompt form one user turn, answered greedily."""
  from keye_jax.generate import SamplingParams
  params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

  def judge(prompt: str, images: list[str]) -> str:
    content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": prompt}]
    return sampler.generate([encode([{"role": "user", "content": content}])], params)[0].text
  return judge


def _images(item: Item) -> list[str]:
  return [e["image"] for m in item.messages for e in m["content"] if e.get("type") == "image"]


def score(item: Item, text: str, judge=None) -> dict:
  """The judge's total score / 10 (see the module doc); components and rule checks as diagnostics."""
  from keye_jax.evaluate.extract import after_thinking
  if judge is None:
    raise ValueError("MIA-Bench is scored by a judge: give --judge-cmd CMD or --judge-ckpt CKPT")
  response = after_thinking(text)
  comps = item.extra["components"]
  out = {"pred": None, "rules": [rule_check(c, response) for c in comps], "components": [None] * len(comps),
         "component_type": list(item.extra.get("component_type") or []), "unscored": False}
  if not response.strip():
    return {**out, "score": 0.0, "judge_reply": "", "note": "empty response"}
  try:
    reply = judge(judge_prompt(item, response), _images(item))
  except RuntimeError as e:
    return {**out, "score": 0.0, "unscored": True, "judge_error": str(e)}
  parsed = parse_judge(reply, item.extra["component_weight"])
  total = parsed["total"]
  weights = [float(w) for w in item.extra["component_weight"]]
  if total is None and parsed["components"] and all(c is not None for c in parsed["components"]):
    total = sum(c * w for c, w in zip(parsed["components"], weights)) / sum(weights)
  return {**out, "components": parsed["components"], "judge_reply": reply, "score": total or 0.0,
          "unscored": total is None}


def diagnostics(records: list[dict]) -> dict:
  """Mean judged component score per component type (the notebook's breakdown), rule-check agreement,
  and how many items the judge could not score."""
  by_type: dict[str, list[float]] = {}
  rules = [0, 0]
  for r in records:
    for t, c, rule in zip(r.get("component_type") or [], r.get("components") or [], r.get("rules") or []):
      if c is not None:
        by_type.setdefault(t, []).append(c)
      if rule is not None and c is not None:
        rules[0] += 1
        rules[1] += (c >= 0.5) == rule
  return {"component_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
          "rule_checked_components": rules[0], "rule_agrees_with_judge": rules[1] / rules[0] if rules[0] else None,
          "unscored": sum(1 for r in records if r.get("unscored"))}


def _rows(data_path: str):
  """(where, record, image source) per item: parquet rows (image bytes) or the official JSON."""
  if data_path.endswith(".parquet") or (os.path.isdir(data_path) and
                                        any(f.endswith(".parquet") for _, _, fs in os.walk(data_path) for f in fs)):
    for f in find_files(data_path, ".parquet"):
      for i, r in enumerate(read_parquet_rows(f)):
        yield f"{f} row {i}", r
    return
  path = data_path if os.path.isfile(data_path) else find_files(data_path, ".json")[0]
  records = read_json(path)
  if not isinstance(records, list):
    raise ValueError(f"{path}: expected a JSON list of MIA-Bench items")
  for i, r in enumerate(records):
    yield f"{path} item {i}", r


def load(data_path: str, media_dir: str | None = None) -> list[Item]:
  root = data_path if os.path.isdir(data_path) else os.path.dirname(os.path.abspath(data_path))
  images = index_files(root, (".jpg", ".jpeg", ".png", ".webp"))
  items = []
  for i, (where, r) in enumerate(_rows(data_path)):
    missing = [k for k in ("image", *FIELDS) if k not in r]
    if missing:
      raise ValueError(f"{where}: missing key {missing[0]!r}")
    src, local, error = r["image"], None, None
    if isinstance(src, dict) and src.get("bytes"):
      local = save_media(src["bytes"], media_dir or os.path.join(root, "media"), f"mia_{i:04d}")
    elif isinstance(src, str):
      local = src if os.path.exists(src) else images.get(src.rstrip("/").split("/")[-1])
    if local is None:
      error = f"{where}: image {str(src)[:200]} not found under {root} (download it first)"
    content = ([{"type": "image", "image": os.path.abspath(local)}] if local else []) + \
        [{"type": "text", "text": r["instruction"]}]
    items.append(Item(f"{i:04d}", user(content), "instruction", categories={"type": r.get("type") or "all"},
                      extra={k: list(r[k]) if k != "instruction" else r[k] for k in FIELDS}, error=error))
  return items
