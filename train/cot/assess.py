"""Step 3: two-level assessment. The final answer by rule verifiers (train.rewards.rule.score_answer, built
on keye_jax.evaluate's extractors; math answers by HuggingFace's math-verify), the steps by a judge:

  confidence  steps are sound when every step's confidence is at least `min_step_confidence`;
  model       a checkpoint run by our sampler with a judging prompt; "correct" (and not "incorrect") = sound;
  command     an external program (a leading `python` is the interpreter keye runs under): one JSON object
              per line on stdin
              {"id", "question", "reference", "thinking", "answer"}, one per line on stdout {"id", "steps_ok"}.

Grades: A (keep) answer right and steps sound; B (fixable) exactly one of the two fails, or the trace was
cut off while thinking with sound steps; C (discard) both fail, or the response is empty.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from train.rewards.rule import score_answer


def verify(response: str, prompt: dict) -> bool:
  """Does the response's final answer match the prompt's reference?"""
  kind = prompt.get("kind")
  if kind == "math":
    from math_verify import parse, verify as mv_verify
    from keye_jax.processing.thinking import split_thinking
    answer = split_thinking(response)[1]
    ref = prompt["answer"] if isinstance(prompt["answer"], list) else [prompt["answer"]]
    got = parse(answer)
    return bool(got) and any(mv_verify(parse(str(r) if "$" in str(r) else f"${r}$"), got) for r in ref)
  return score_answer(response, prompt["answer"], kind=kind, options=prompt.get("options")) > 0.5


def judge_confidence(traces, prompts, min_step_confidence: float) -> list[bool]:
  return [bool(t["step_confidences"]) and min(t["step_confidences"]) >= min_step_confidence for t in traces]


def judge_model(traces, prompts, texts_fn, template: str, max_new_tokens: int) -> list[bool]:
  asks = [[{"role": "user", "content": template.format(question=prompts[t["prompt_id"]]["question"],
                                                       reference=prompts[t["prompt_id"]]["answer"],
                                                       thinking=t["thinking"] or t["text"]) + " /no_think"}]
          for t in traces]
  out = []
  for reply in texts_fn(asks, max_new_tokens) if asks else []:
    r = reply.lower()
    out.append("correct" in r and "incorrect" not in r)
  return out


def run_command(command: str, lines: list[str], role: str) -> str:
  """Runs `command` with `lines` (JSON) on stdin; its stdout. A leading `python` is the interpreter keye runs
  under, with this project importable."""
  argv = shlex.split(command)
  if argv and argv[0] in ("python", "python3"):
    argv[0] = sys.executable
  proc = subprocess.run(argv, input="\n".join(lines) + "\n", capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{role} command {command!r} exited with {proc.returncode}: {proc.stderr.strip()[-300:]}")
  return proc.stdout


def judge_command(traces, prompts, command: str) -> list[bool]:
  lines = [json.dumps({"id": t["id"], "question": prompts[t["prompt_id"]]["question"],
                       "reference": prompts[t["prompt_id"]]["answer"], "thinking": t["thinking"], "answer": t["answer"]})
           for t in traces]
  stdout = run_command(command, lines, "judge")
  verdicts = {}
  for n, line in enumerate(stdout.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
      verdicts[obj["id"]] = bool(obj["steps_ok"])
    except (json.JSONDecodeError, KeyError, TypeError):
      raise ValueError(f"judge command {command!r}, output line {n}: expected {{\"id\", \"steps_ok\"}}, "
                       f"got {line[:120]!r}") from None
  missing = [t["id"] for t in traces if t["id"] not in verdicts]
  if missing:
    raise ValueError(f"judge command {command!r} gave no verdict for {len(missing)} traces (first: {missing[0]})")
  return [verdicts[t["id"]] for t in traces]


def grade(trace: dict, answer_ok: bool, steps_ok: bool, want_thinking: bool = False) -> tuple[str, str]:
  """(grade, reason). With `want_thinking` (a /think manifest), a trace that did not think is no example
  of thinking however right its answer: at best B, for the reviewer to write the reasoning."""
  if not trace["text"].strip():
    return "C", "empty response"
  if trace["state"] == "unclosed" or not trace["answer"]:
    return ("B", "no final answer, steps sound") if steps_ok else ("C", "no final answer")
  if want_thinking and trace["state"] != "thought":
    return ("B", "answer verified, no reasoning") if answer_ok else ("C", "answer wrong, no reasoning")
  if answer_ok and steps_ok:
    return "A", "answer verified, steps sound"
  if answer_ok:
    return "B", "answer verified, steps doubtful"
  if steps_ok:
    return "B", "steps sound, answer wrong"
  return "C", "answer wrong, steps doubtful"


def assess(traces: list[dict], prompts: dict, judge_cfg, texts_fn=None, borderline: float = -1.5,
           want_thinking: bool = False) -> list[dict]:
  """Each trace with `answer_ok`, `steps_ok`, `grade`, `reason`, `borderline` added."""
  answer_ok = []
  for t in traces:
    try:
      answer_ok.append(verify(t["text"], prompts[t["prompt_id"]]))
    except ValueError:                      # a reference the verifier cannot read: never kept
      answer_ok.append(False)
  if judge_cfg.kind == "command":
    steps_ok = judge_command(traces, prompts, judge_cfg.command) if traces else []
  elif judge_cfg.kind == "model":
    if texts_fn is None:
      raise ValueError("judge.kind=model needs a model (set `checkpoint` or judge.checkpoint)")
    steps_ok = judge_model(traces, prompts, texts_fn, judge_cfg.prompt, judge_cfg.max_new_tokens)
  else:
    steps_ok = judge_confidence(traces, prompts, judge_cfg.min_step_confidence)
  out = []
  for t, a, s in zip(traces, answer_ok, steps_ok):
    g, reason = grade(t, a, s, want_thinking)
    low = min(t["step_confidences"], default=float("-inf"))
    out.append({**t, "answer_ok": bool(a), "steps_ok": bool(s), "grade": g, "reason": reason,
                "borderline": g == "A" and low < borderline})
  return out
