"""`keye cot` configuration (YAML + `key.sub=value` overrides, like every other config here)."""

from __future__ import annotations

import dataclasses
from typing import Any

from keye_jax.config import path_field


@dataclasses.dataclass(frozen=True)
class ManifestConfig:
  path: str = path_field()           # a conversation manifest (JSONL; media relative to it)
  name: str = ""                      # source name in reports; defaults to the file name
  kind: str = ""                      # answer kind for every record (choice/number/text/exact/boxed/math); "" = per record or inferred


@dataclasses.dataclass(frozen=True)
class RewriteConfig:
  enabled: bool = False
  prompt: str = ("Rewrite the following question so that it is clear and self-contained. Keep every fact "
                 "and the answer the same. Reply with the question only.\n\nQuestion: {question}")
  max_new_tokens: int = 128


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
  kind: str = "confidence"            # confidence | model | command
  command: str = ""                   # kind=command: a program reading/writing JSON lines (see assess.py)
  checkpoint: str = path_field()      # kind=model: the judge checkpoint (default: the sampling model)
  prompt: str = ("Check the reasoning below step by step. Reply 'correct' if every step is sound, otherwise "
                 "'incorrect'.\n\nQuestion: {question}\nReference answer: {reference}\nReasoning:\n{thinking}")
  max_new_tokens: int = 16
  min_step_confidence: float = -2.5   # kind=confidence: the lowest step mean log-prob a sound trace has


@dataclasses.dataclass(frozen=True)
class CotConfig:
  manifests: tuple[ManifestConfig, ...] = ()
  out: str = path_field("runs/cot")
  checkpoint: str = path_field()      # converted checkpoint or run dir (its latest checkpoint)
  mode: str = "cot"                   # cot (the five steps) | rft (K samples, keep the verified ones)
  max_prompts: int = 0                # 0 = all
  min_task_size: int = 0              # sources with fewer prompts merge into one "merged" task
  rewrite: RewriteConfig = RewriteConfig()
  samples_per_prompt: int = 4         # N traces (rft: K answers)
  temperature: float = 0.8
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 256
  seed: int = 0
  batch_size: int = 8                 # prompts per sampler call (each gives samples_per_prompt rows)
  thinking: str = "think"             # the mode the prompts ask for: think | auto | no_think
  # The mode the model is sampled in ("" = `thinking`). A model that cannot think yet (the demo's
  # pre-trained one) is sampled with no_think: its right answers are B traces the reviewer repairs.
  sample_thinking: str = ""
  judge: JudgeConfig = JudgeConfig()
  borderline_confidence: float = -1.5  # A traces whose lowest step confidence is below go to review too
  reviewer: str = ""                  # a command that reviews the queue: queue lines in, reviewed lines out
                                      # ("" = a person edits review/reviewed.jsonl and reruns)
  upsample: int = 2                   # copies of each score 4-5 trace in the SFT manifest
  min_score: int = 3                  # traces scoring below are left out of the manifest
  vision: dict[str, Any] = dataclasses.field(default_factory=dict)   # encode_prompt keyword arguments (max_pixels, fps, ...)

  def __post_init__(self):
    if self.mode not in ("cot", "rft"):
      raise ValueError(f"mode={self.mode!r}: expected cot or rft")
    for key in ("thinking", "sample_thinking"):
      value = getattr(self, key)
      if value not in ("think", "auto", "no_think") and (key == "thinking" or value):
        raise ValueError(f"{key}={value!r}: expected think, auto or no_think")
    if self.judge.kind not in ("confidence", "model", "command"):
      raise ValueError(f"judge.kind={self.judge.kind!r}: expected confidence, model or command")
    if self.samples_per_prompt < 1 or self.batch_size < 1:
      raise ValueError("samples_per_prompt and batch_size must be >= 1")


def load_cot_config(path: str, overrides=()) -> CotConfig:
  from keye_jax.config import load
  cfg = load(CotConfig, path, overrides)
  if not cfg.manifests:
    raise ValueError(f"{path}: `manifests` lists no conversation manifest")
  return cfg
