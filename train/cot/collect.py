"""Step 1: prompts with reference answers from conversation manifests.

A manifest record (train/data/records.py) gives a prompt when it has a reference answer: its `answer`
field, or else the final assistant turn's answer (the text after any think block). The prompt is the
conversation up to the last user turn; its text loses any mode suffix (the run adds the mode it samples in).
Records without a usable answer or with missing media are skipped and counted, never fatal.

Small tasks (sources with fewer than `min_task_size` prompts) merge into one task named "merged", so that
per-task sampling budgets and reports are not dominated by a long tail of tiny sources.
"""

from __future__ import annotations

import collections
import os

from keye_jax.evaluate.items import read_jsonl
from keye_jax.processing.chat import canonical_messages
from keye_jax.processing.thinking import split_thinking
from train.data.records import media_refs

_SUFFIXES = ("/no_think", "/think")


def strip_mode(text: str) -> str:
  t = text.rstrip()
  for s in _SUFFIXES:
    if t.endswith(s):
      return t[:-len(s)].rstrip()
  return text


def with_mode(messages: list[dict], mode: str) -> list[dict]:
  """A copy of `messages` whose last user turn ends in the suffix of `mode` (none for auto)."""
  suffix = {"think": " /think", "no_think": " /no_think", "auto": ""}[mode]
  out = [dict(m) for m in messages]
  for m in reversed(out):
    if m["role"] != "user":
      continue
    if isinstance(m["content"], str):
      m["content"] = strip_mode(m["content"]) + suffix
    else:
      content = [dict(e) for e in m["content"]]
      texts = [e for e in content if e.get("type", "text") == "text" and "text" in e]
      if texts:
        texts[-1]["text"] = strip_mode(texts[-1]["text"]) + suffix
      elif suffix:
        content.append({"type": "text", "text": suffix.strip()})
      m["content"] = content
    break
  return out


def question_text(messages: list[dict]) -> str:
  """The text of the last user turn (media left out), without a mode suffix."""
  for m in reversed(messages):
    if m["role"] == "user":
      c = m["content"]
      text = c if isinstance(c, str) else " ".join(e.get("text", "") for e in c if e.get("type", "text") == "text")
      return strip_mode(text).strip()
  return ""


def _prompt_of(record: dict, base_dir: str, source: str, kind: str, line: int):
  """(prompt dict, None) or (None, skip reason)."""
  messages = record.get("messages")
  if not isinstance(messages, list) or not messages:
    return None, "no_messages"
  try:
    messages = canonical_messages(messages)
  except ValueError:
    return None, "bad_messages"
  last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
  if last_user < 0:
    return None, "no_user_turn"
  answer = record.get("answer")
  if answer is None and last_user + 1 < len(messages) and messages[-1]["role"] == "assistant":
    answer = split_thinking(messages[-1]["content"])[1]
  if answer is None or (isinstance(answer, str) and not answer.strip()) or answer == []:
    return None, "empty_answer"
  for element, key, i in media_refs({"messages": messages[:last_user + 1]}):
    value = element[key] if i is None else element[key][i]
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    if not value.startswith(("http://", "https://", "data:")) and not os.path.exists(path):
      return None, "missing_media"
  pid = str(record.get("id", f"{source}:{line}"))
  return {"id": f"{source}/{pid}", "source": source, "messages": messages[:last_user + 1], "answer": answer,
          "options": record.get("options"), "kind": kind or record.get("answer_kind") or None,
          "base_dir": base_dir, "question": question_text(messages[:last_user + 1]),
          **({"solution": record["solution"]} if record.get("solution") else {})}, None


def collect(manifests, *, min_task_size: int = 0, max_prompts: int = 0) -> tuple[list[dict], dict]:
  """(prompts, skipped {reason: count}) from `manifests` (ManifestConfig-like: path, name, kind)."""
  prompts, skipped = [], collections.Counter()
  for m in manifests:
    if not os.path.exists(m.path):
      raise FileNotFoundError(f"{m.path}: no such manifest")
    source = m.name or os.path.splitext(os.path.basename(m.path))[0]
    base_dir = os.path.dirname(os.path.abspath(m.path))
    for line_no, record in read_jsonl(m.path):
      prompt, reason = _prompt_of(record, base_dir, source, m.kind, line_no)
      if prompt is None:
        skipped[reason] += 1
      else:
        prompts.append(prompt)
  sizes = collections.Counter(p["source"] for p in prompts)
  for p in prompts:
    p["task"] = "merged" if sizes[p["source"]] < min_task_size else p["source"]
  if max_prompts:
    prompts = prompts[:max_prompts]
  return prompts, dict(skipped)


def rewrite(prompts: list[dict], generate_text, template: str) -> list[dict]:
  """Prompts whose question text a model rewrote (`generate_text(list of message lists) -> list of texts`);
  an empty rewrite keeps the original. The original question stays in `original_question`."""
  if not prompts:
    return prompts
  asks = [[{"role": "user", "content": template.format(question=p["question"]) + " /no_think"}] for p in prompts]
  out = []
  for p, new in zip(prompts, generate_text(asks)):
    new = split_thinking(new)[1].strip()
    if not new:
      out.append(p)
      continue
    messages = [dict(m) for m in p["messages"]]
    last = messages[-1]
    if isinstance(last["content"], str):
      last["content"] = new
    else:
      media = [e for e in last["content"] if e.get("type", "text") != "text"]
      last["content"] = media + [{"type": "text", "text": new}]
    out.append({**p, "messages": messages, "question": new, "original_question": p["question"]})
  return out
