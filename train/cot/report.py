"""The report: pass rate per source, grades, kept traces, and length / confidence histograms (PNG) next
to a JSON summary."""

from __future__ import annotations

import collections
import json
import os

import numpy as np


def summary(prompts: list[dict], assessed: list[dict], kept: list[dict], extra: dict) -> dict:
  by_source = collections.defaultdict(lambda: [0, 0])
  for t in assessed:
    by_source[t["source"]][0] += int(t["answer_ok"])
    by_source[t["source"]][1] += 1
  grades = collections.Counter(t["grade"] for t in assessed)
  return {"prompts": len(prompts), "traces": len(assessed),
          "grades": {g: grades.get(g, 0) for g in "ABC"},
          "pass_rate": {s: ok / n for s, (ok, n) in sorted(by_source.items())},
          "kept": len(kept), **extra}


def _hist(ax, values, title, xlabel):
  # Rounded: values equal but for float noise (e.g. every trace -0.1) are too narrow a range for 20 bins.
  values = [round(v, 6) for v in values if np.isfinite(v)]
  ax.hist(values, bins=max(1, min(20, len(set(values)))), color="#4a7ab8")
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("traces")


def write(out_dir: str, result: dict, assessed: list[dict]) -> dict:
  """Writes report.json, lengths.png and confidence.png into out_dir; returns the summary."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  for name, key, xlabel in (("lengths", "tokens", "generated tokens"), ("confidence", "confidence", "mean log-prob")):
    fig, axes = plt.subplots(1, 2 if key == "confidence" else 1, figsize=(10 if key == "confidence" else 5, 3.5))
    axes = np.atleast_1d(axes)
    _hist(axes[0], [float(t[key]) for t in assessed], f"{name} ({len(assessed)} traces)", xlabel)
    if key == "confidence":
      _hist(axes[1], [c for t in assessed for c in t["step_confidences"]], "step confidence", "mean log-prob per step")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi=80)
    plt.close(fig)
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result
