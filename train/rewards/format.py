"""Format rewards (1.0 obeyed / 0.0 not, except the length penalty): thinking mode, an answer after the
thinking, length, JSON, markdown structure, fenced code.

Which format a prompt asks for comes from its record: `think_mode` ("think", "no_think", "auto"), else
the "/think" or "/no_think" tag in its `prompt` text, else auto; `format` ("json", "markdown", "code")
for the structure rewards, which give `not_asked` (default 0.0, the same for a whole group, so no
advantage) to prompts that do not ask, unless configured with `always: true`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from keye_jax.evaluate.extract import after_thinking
from train.rewards.registry import per_item, register

_THINK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)
_FENCE = re.compile(r"^\s*```([\w+#.-]*)\s*$")


def think_mode(sample: Mapping) -> str:
  """"think", "no_think" or "auto" for a prompt record."""
  mode = sample.get("think_mode")
  if mode:
    if mode not in ("think", "no_think", "auto"):
      raise ValueError(f"sample {sample.get('id', '?')!r}: think_mode {mode!r} is not think, no_think or auto")
    return mode
  prompt = str(sample.get("prompt") or "")
  if re.search(r"/no_think\b", prompt):
    return "no_think"
  if re.search(r"/think\b", prompt):
    return "think"
  return "auto"


def split_thinking(response: str) -> tuple[str | None, str] | None:
  """(thinking or None when there is no think block, answer); None when the tags are malformed
  (a block not at the start, unclosed, nested or repeated)."""
  n_open, n_close = response.count("<think>"), response.count("</think>")
  if n_open == 0 and n_close == 0:
    return None, response.strip()
  if n_open != 1 or n_close != 1:
    return None
  m = _THINK.match(response)
  if m is None:
    return None
  return m.group(1).strip(), m.group(2).strip()


def think_obeyed(response: str, mode: str) -> bool:
  """think: a non-empty think block, then an answer; no_think: no block or an empty one, then an
  answer; auto: either, well formed."""
  parts = split_thinking(response)
  if parts is None:
    return False
  thinking, answer = parts
  if not answer:
    return False
  if mode == "think":
    return bool(thinking)
  if mode == "no_think":
    return not thinking
  return True


@register("think_format")
def think_format_reward():
  """1.0 when the response follows the thinking mode its prompt asked for."""
  return per_item(lambda sample, response: float(think_obeyed(response, think_mode(sample))))


@register("answer_present")
def answer_present_reward():
  """1.0 when a well-formed response has a non-empty answer after its thinking."""
  def answer_present(sample, response):
    parts = split_thinking(response)
    return float(parts is not None and bool(parts[1]))
  return per_item(answer_present)


@register("length_penalty")
def length_penalty_reward(max_length: int, buffer: int = 0, unit: str = "words"):
  """DAPO's overlong shaping: 0 up to max_length - buffer, then falling linearly to -1 at max_length,
  -1 beyond. Lengths in whitespace-separated words or characters (`unit`), the answer and thinking both."""
  if unit not in ("words", "chars"):
    raise ValueError(f"length_penalty.unit: {unit!r} is not words or chars")
  if not 0 <= buffer <= max_length:
    raise ValueError(f"length_penalty: buffer {buffer} must be in [0, max_length={max_length}]")

  def penalty(sample, response):
    n = len(response.split()) if unit == "words" else len(response)
    if n > max_length:
      return -1.0
    if n > max_length - buffer:
      return (max_length - buffer - n) / buffer
    return 0.0
  return per_item(penalty)


def _asked(sample: Mapping, fmt: str, always: bool) -> bool:
  asked = sample.get("format")
  return always or asked == fmt or (isinstance(asked, (list, tuple)) and fmt in asked)


def json_payload(answer: str):
  """The JSON value an answer gives (itself, or the only ```json fenced block in it); raises ValueError."""
  text = answer.strip()
  blocks = re.findall(r"```(?:json)?\s*\n(.*?)\n\s*```", text, re.DOTALL)
  if len(blocks) == 1 and text.startswith("```"):
    text = blocks[0]
  return json.loads(text)


def valid_json(answer: str) -> bool:
  try:
    json_payload(answer)
  except ValueError:
    return False
  return True


def fenced_blocks(text: str) -> list[tuple[str, str]] | None:
  """[(language, code)] of the ``` fenced blocks; None when a fence is left open."""
  blocks, lang, body = [], None, []
  for line in text.splitlines():
    m = _FENCE.match(line)
    if lang is None and m:
      lang, body = m.group(1), []
    elif lang is not None and line.strip() == "```":
      blocks.append((lang, "\n".join(body)))
      lang = None
    elif lang is not None:
      body.append(line)
  return None if lang is not None else blocks


def markdown_structured(text: str) -> bool:
  """A heading, a list or a table, and no fence left open."""
  if fenced_blocks(text) is None:
    return False
  outside = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
  heading = re.search(r"^#{1,6} \S", outside, re.MULTILINE)
  listed = re.search(r"^\s*(?:[-*+]|\d+[.)])\s+\S", outside, re.MULTILINE)
  table = re.search(r"^\s*\|.*\|\s*\n\s*\|[\s:|-]*-[\s:|-]*\|\s*$", outside, re.MULTILINE)
  return bool(heading or listed or table)


def code_fenced(text: str, language: str | None = None) -> bool:
  """At least one non-empty fenced block (in `language` when given), every fence closed."""
  blocks = fenced_blocks(text)
  return bool(blocks) and any(code.strip() and (not language or lang.lower() == language.lower())
                              for lang, code in blocks)


def _structure_reward(fmt: str, check, always: bool, not_asked: float):
  def reward(sample, response):
    if not _asked(sample, fmt, always):
      return not_asked
    return float(check(after_thinking(response), sample))
  return per_item(reward)


@register("json_format")
def json_format_reward(always: bool = False, not_asked: float = 0.0):
  """1.0 when the answer (after thinking) is valid JSON, bare or in one ```json block."""
  return _structure_reward("json", lambda a, s: valid_json(a), always, not_asked)


@register("markdown_format")
def markdown_format_reward(always: bool = False, not_asked: float = 0.0):
  """1.0 when the answer has markdown structure: a heading, list or table, fences closed."""
  return _structure_reward("markdown", lambda a, s: markdown_structured(a), always, not_asked)


@register("code_block")
def code_block_reward(always: bool = False, not_asked: float = 0.0):
  """1.0 when the answer has a closed, non-empty fenced code block (in the record's `code_language`)."""
  return _structure_reward("code", lambda a, s: code_fenced(a, s.get("code_language")), always, not_asked)
