"""Step 2: several traces per prompt from the jitted sampler, each with its confidences.

Response-level confidence: the mean log-prob of the generated tokens (the sampler's `Generation.logprobs`,
log-probs of the distribution it sampled from). Step-level: the text is cut into steps at blank lines and
at lines that start a numbered step ("1.", "2)", "Step 3"); a step's confidence is the mean log-prob of
the tokens that end inside it. Steps are taken from the thinking when there is one, else from the answer.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from keye_jax.processing.thinking import split_thinking, thinking_state

_STEP_START = re.compile(r"\n\s*\n|\n(?=\s*(?:\d+[.)]|step\s+\d+)\s)", re.IGNORECASE)


def step_spans(text: str) -> list[tuple[int, int]]:
  """Character ranges of the steps of `text` (non-blank pieces between step boundaries)."""
  spans, start = [], 0
  for m in _STEP_START.finditer(text):
    spans.append((start, m.start()))
    start = m.end()
  spans.append((start, len(text)))
  return [(a, b) for a, b in spans if text[a:b].strip()]


def token_ends(tokens: Sequence[int], decode: Callable[[list[int]], str]) -> list[int]:
  """Character offset in decode(tokens) where each token's text ends (prefix decoding, so byte-level
  pieces that only form a character together are placed where the character completes)."""
  return [len(decode(list(tokens[:k + 1]))) for k in range(len(tokens))]


def confidences(text: str, logprobs: Sequence[float], ends: Sequence[int]) -> tuple[float, list[float], list[str]]:
  """(response confidence, step confidences, step texts). Empty responses have confidence -inf."""
  lp = np.asarray(logprobs, np.float64)
  if lp.size == 0:
    return float("-inf"), [], []
  thinking, _ = split_thinking(text)
  lo = text.find(thinking) if thinking else 0
  body = thinking if thinking else text
  step_conf, steps = [], []
  ends = np.asarray(ends[:lp.size])
  for a, b in step_spans(body):
    a, b = a + lo, b + lo
    sel = (ends > a) & (ends <= b)
    if sel.any():
      step_conf.append(float(lp[sel].mean()))
      steps.append(text[a:b].strip())
  return float(lp.mean()), step_conf, steps


@dataclasses.dataclass
class Sample:
  text: str
  tokens: list[int]
  logprobs: list[float]
  finish_reason: str = "stop"


class SamplerBackend:
  """Traces from the rollout engine (keye_jax.rollout): each prompt's vision and prefill run once for its
  n samples, which share the decode slots with every other prompt's; request i of a call is seeded
  (seed, i), so a prompt's traces depend only on the call's seed and its place in the call."""

  def __init__(self, model, tokenizer, *, vision_kwargs=None, max_new_tokens=256, temperature=0.8, top_k=0,
               top_p=1.0, slots: int = 64):
    from keye_jax.rollout import RolloutEngine
    self.tokenizer = tokenizer
    self.engine = RolloutEngine(model, tokenizer, slots=slots)
    self.vision_kwargs = dict(vision_kwargs or {})
    self.opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    self.stop = set(self.engine.stop_token_ids)

  def _prompt(self, messages, base_dir):
    from keye_jax.generate import Prompt
    from keye_jax.processing.chat import encode_prompt
    ex = encode_prompt(messages, self.tokenizer, base_dir=base_dir, **self.vision_kwargs)
    return Prompt(ex["input_ids"], ex["position_ids"], ex["pixel_values"] if len(ex["grids_hw"]) else None,
                  ex["grids_hw"] if len(ex["grids_hw"]) else None)

  def generate(self, requests: Sequence[tuple[list[dict], str | None]], n: int, seed: int,
               **overrides) -> list[list[Sample]]:
    from keye_jax.generate import SamplingParams
    from keye_jax.rollout import Request
    opts = {**self.opts, **overrides}
    seeds = np.random.SeedSequence(seed).generate_state(len(requests)) >> 1
    reqs = [Request(self._prompt(m, b), SamplingParams(seed=int(s), **opts), n=n)
            for (m, b), s in zip(requests, seeds)]
    out = []
    for group in self.engine.generate(reqs).groups:
      row = []
      for g in group:
        keep = [k for k, t in enumerate(g.tokens) if not (g.finish_reason == "stop" and k == len(g.tokens) - 1
                                                           and t in self.stop)]
        row.append(Sample(g.text, [g.tokens[k] for k in keep], [float(g.logprobs[k]) for k in keep],
                          g.finish_reason))
      out.append(row)
    return out

  def texts(self, message_lists: Sequence[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy answers (prompt rewriting, judging)."""
    got = self.generate([(m, None) for m in message_lists], 1, 0, max_new_tokens=max_new_tokens, temperature=0.0)
    return [row[0].text for row in got]


def trace_record(prompt: dict, k: int, sample: Sample, decode) -> dict:
  """One trace as stored in traces.*.jsonl."""
  conf, step_conf, steps = confidences(sample.text, sample.logprobs, token_ends(sample.tokens, decode))
  thinking, answer = split_thinking(sample.text)
  return {"id": f"{prompt['id']}#{k}", "prompt_id": prompt["id"], "sample": k, "source": prompt["source"],
          "task": prompt["task"], "text": sample.text, "thinking": thinking, "answer": answer,
          "state": thinking_state(sample.text), "tokens": len(sample.tokens), "finish_reason": sample.finish_reason,
          "confidence": conf, "step_confidences": step_conf, "steps": steps}
