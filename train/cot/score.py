"""Step 5: a 1-5 quality score per kept trace, upsampling of 4-5, and the SFT manifest.

Score (rule-based; a reviewer's score wins): 1 base + 1 answer verified + 1 steps sound + 1 response
confidence above the median of the kept traces + 1 every step at least as confident as the borderline
threshold (i.e. not borderline); a trace that was cut off (`finish_reason` "length") loses a point.
The manifest is the pipeline's conversation format: the prompt (asked with `/think`) and the trace as the
assistant turn, with provenance (prompt id, sample index, confidences, grade, score, reviewed).
"""

from __future__ import annotations

import json
import os

import numpy as np

from keye_jax.processing.thinking import with_think_block
from train.cot.collect import with_mode


def quality_scores(kept: list[dict], borderline: float) -> list[int]:
  if not kept:
    return []
  median = float(np.median([t["confidence"] for t in kept]))
  scores = []
  for t in kept:
    if t.get("review_score"):
      scores.append(int(t["review_score"]))
      continue
    s = 1 + int(t["answer_ok"]) + int(t["steps_ok"]) + int(t["confidence"] >= median)
    s += int(min(t["step_confidences"], default=float("-inf")) >= borderline)
    s -= int(t.get("finish_reason") == "length")
    scores.append(max(1, min(5, s)))
  return scores


def _relative_media(messages: list[dict], base_dir: str, out_dir: str) -> list[dict]:
  """Media paths rewritten relative to the output manifest's directory."""
  out = []
  for m in messages:
    c = m["content"]
    if isinstance(c, list):
      c = [dict(e) for e in c]
      for e in c:
        for key in ("image", "video"):
          v = e.get(key)
          if isinstance(v, str) and not v.startswith(("http://", "https://", "data:")):
            e[key] = os.path.relpath(v if os.path.isabs(v) else os.path.join(base_dir, v), out_dir)
          elif isinstance(v, list):
            e[key] = [os.path.relpath(x if os.path.isabs(x) else os.path.join(base_dir, x), out_dir) for x in v]
    out.append({**m, "content": c})
  return out


def sft_record(trace: dict, prompt: dict, score: int, out_dir: str, mode: str = "think") -> dict:
  messages = _relative_media(with_mode(prompt["messages"], mode), prompt["base_dir"], out_dir)
  text = with_think_block(trace["thinking"], trace["answer"]) if trace["state"] != "none" else trace["answer"]
  return {"id": trace["id"], "messages": messages + [{"role": "assistant", "content": text}],
          "answer": prompt["answer"], "options": prompt.get("options"), "category": prompt["task"],
          "provenance": {"prompt_id": trace["prompt_id"], "sample": trace["sample"], "source": trace["source"],
                         "confidence": trace["confidence"], "step_confidences": trace["step_confidences"],
                         "grade": trace["grade"], "score": score, "reviewed": bool(trace.get("reviewed"))}}


def write_manifest(kept: list[dict], scores: list[int], prompts: dict, path: str, *, upsample: int,
                   min_score: int, mode: str = "think") -> int:
  """Writes the SFT manifest atomically; returns the number of records (upsampled copies included)."""
  out_dir = os.path.dirname(os.path.abspath(path))
  n, seen = 0, set()
  with open(path + ".tmp", "w") as f:
    for t, s in zip(kept, scores):
      if s < min_score or (t["prompt_id"], t["text"]) in seen:
        continue                             # reviewers repair several samples into one text: keep it once
      seen.add((t["prompt_id"], t["text"]))
      rec = sft_record(t, prompts[t["prompt_id"]], s, out_dir, mode)
      for copy in range(upsample if s >= 4 else 1):
        f.write(json.dumps({**rec, "id": rec["id"] if copy == 0 else f"{rec['id']}~{copy}"}) + "\n")
        n += 1
  os.replace(path + ".tmp", path)
  return n
