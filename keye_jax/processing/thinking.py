"""Thinking modes: how a user turn asks for one, and how a response splits into thinking and answer.

Three modes, written as Qwen3 and Keye-VL 1.5 write them (a suffix on the last user turn):
  "think"     the user turn ends in `/think`: the answer comes after `<think>reasoning</think>`;
  "no_think"  the user turn ends in `/no_think`: an empty think block `<think>\\n\\n</think>\\n\\n`, then
              the answer (the generation prompt already holds the empty block);
  "auto"      no suffix: the model decides, opening `<think>` itself or answering at once.

A response (what the sampler returns) is one of
  `<think>R</think>A`                 thought: thinking R, answer A;
  `<think>\\n\\n</think>\\n\\nA`          an empty think block: no thinking, answer A;
  `A`                                 answered at once (auto mode): no thinking, answer A;
  `<think>R` (never closed)           cut off while thinking: thinking R, no answer;
  `R</think>A`                        the prompt opened the block (a template that prefills `<think>\\n`).
"""

from __future__ import annotations

THINK = "<think>"
END_THINK = "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
MODES = ("think", "no_think", "auto")


def mode_of(text: str) -> str:
  """The mode a user turn's text asks for: a trailing `/no_think` or `/think` (spaces before it or not)."""
  t = text.rstrip()
  if t.endswith("/no_think"):
    return "no_think"
  if t.endswith("/think"):
    return "think"
  return "auto"


def split_thinking(text: str) -> tuple[str, str]:
  """(thinking, answer) of a response; both stripped. The answer is what follows the last `</think>`;
  an unclosed `<think>` means everything after it is thinking and there is no answer yet."""
  if END_THINK in text:
    head, _, tail = text.rpartition(END_THINK)
    return head.replace(THINK, "").strip(), tail.replace(THINK, "").strip()
  if THINK in text:
    head, _, tail = text.partition(THINK)
    if not head.strip():
      return tail.replace(THINK, "").strip(), ""
  return "", text.replace(THINK, "").strip()


def thinking_state(text: str) -> str:
  """"thought" (a non-empty closed think block), "empty" (a closed empty one), "none" (no think block)
  or "unclosed" (`<think>` opened and never closed)."""
  if END_THINK in text:
    return "thought" if split_thinking(text)[0] else "empty"
  if text.lstrip().startswith(THINK):
    return "unclosed"
  return "none"


def qwen3_parts(content: str) -> tuple[str | None, str]:
  """(reasoning, content) exactly as Qwen3's chat template cuts an assistant message: with a `</think>`,
  reasoning = the text before the first one, after the last `<think>` before it, newlines trimmed at
  its edges; content = the text after the last `</think>`, leading newlines removed. Without one:
  (None, content)."""
  if END_THINK not in content:
    return None, content
  reasoning = content.split(END_THINK)[0].rstrip("\n").split(THINK)[-1].lstrip("\n")
  return reasoning, content.split(END_THINK)[-1].lstrip("\n")


def with_think_block(reasoning: str, content: str) -> str:
  """An assistant message in Qwen3's think format: `<think>\\nR\\n</think>\\n\\nA` (R may be empty)."""
  return f"{THINK}\n{reasoning.strip(chr(10))}\n{END_THINK}\n\n{content.lstrip(chr(10))}"
