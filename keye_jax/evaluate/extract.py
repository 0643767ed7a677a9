"""Answer extraction from free-form model outputs (pure string functions).

Order of trust, for every kind of answer:
  1. only the text after the last `</think>` (a thinking trace mentions every option on the way);
  2. the last `\\boxed{...}` (nested braces allowed);
  3. an explicit phrase: "answer is X", "Answer: X", "option X", "Best option:(X";
  4. a leading letter ("B", "(B) ...", "B. ..."), but not the article in "A cat ...";
  5. the option texts mentioned, the last mention winning; numbers: the last number.
Nothing found gives None, which scores as wrong (no random guess, so runs are reproducible).
"""

from __future__ import annotations

import math
import re

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_EXPLICIT = re.compile(  # the phrase in any case, the letter in capitals ("answer is a cat" is no answer)
    r"(?i:answer\s*(?:is|:)?|option\s*(?:is|:)?|choice\s*(?:is|:)?|best option\s*:?)\s*[:\-]?\s*"
    r"(?:\*\*|\"|')?\s*\(?\s*([A-Z])\s*\)?(?![A-Za-z])")
_LEADING = re.compile(r"^\s*(?:\*\*)?\(?([A-Z])(?:\)|\.|:|,|\*\*|\s*$)")
_BRACKETED = re.compile(r"\(([A-Z])\)")
_LONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?/\d+(?:\.\d+)?(?![\d.])|-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d*\.?\d+(?:[eE][-+]?\d+)?")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def after_thinking(text: str) -> str:
  """The answer part of a thinking-mode output: what follows the last </think> (or all of it)."""
  return text.rsplit("</think>", 1)[-1].replace("<think>", "").strip()


def last_boxed(text: str) -> str | None:
  """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
  start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth = 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j].strip()
  return text[i:].strip()


def _strip_latex(s: str) -> str:
  s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}", r"\1", s)
  return s.replace("$", "").strip()


def final_answer(text: str) -> str:
  """The span that holds the final answer: boxed, else after 'answer is/:', else the whole answer part."""
  text = after_thinking(text)
  boxed = last_boxed(text)
  if boxed is not None:
    return _strip_latex(boxed)
  m = None
  for m in re.finditer(r"(?:final answer|answer)\s*(?:is|:)\s*", text, re.IGNORECASE):
    pass
  if m is not None and text[m.end():].strip():
    return text[m.end():].strip().split("\n")[0].strip().rstrip(".")
  return text.strip()


def _norm(s: str) -> str:
  s = _strip_latex(s).lower()
  s = re.sub(r"[^\w\s%.\-/]", " ", s)
  return re.sub(r"\s+", " ", s).strip().rstrip(".")


def extract_choice(text: str, options: list[str] | None = None, n_options: int | None = None) -> str | None:
  """Option letter chosen by `text`, among the first len(options) (or n_options) letters."""
  n = len(options) if options else (n_options or 26)
  valid = LETTERS[:n]
  text = after_thinking(text)
  boxed = last_boxed(text)
  if boxed is not None:
    got = extract_choice(_strip_latex(boxed), options, n)
    if got is not None:
      return got
  explicit = [m.group(1).upper() for m in _EXPLICIT.finditer(text)]
  explicit = [c for c in explicit if c in valid]
  if explicit:
    return explicit[-1]
  m = _LEADING.match(text)
  if m and m.group(1).upper() in valid and (m.group(1) != "A" or not _article_start(text)):
    return m.group(1).upper()
  bracketed = [c for c in _BRACKETED.findall(text) if c in valid]
  if bracketed:
    return bracketed[-1]
  by_text = _choice_by_text(text, options) if options else None
  if by_text is not None:
    return by_text
  lone = [m.group(1) for m in _LONE.finditer(text)
          if m.group(1) in valid and not _is_word(m.group(1), text[m.end():])]
  if lone:
    return lone[-1]
  if len(text.strip()) == 1 and text.strip().upper() in valid:
    return text.strip().upper()
  return None


def _article_start(text: str) -> bool:
  """'A cat ...' starts with the article, 'A.' / 'A)' / 'A' do not."""
  return re.match(r"^\s*A\s+[a-z]", text) is not None


def _is_word(letter: str, rest: str) -> bool:
  """A lone 'A' or 'I' followed by a lower-case word is the article or the pronoun, not an option."""
  return letter in "AI" and re.match(r"\s+[a-z]", rest) is not None


def _choice_by_text(text: str, options: list[str]) -> str | None:
  """Letter of the option whose text is mentioned last; a longer option shadows one it contains."""
  t = _norm(text)
  spans = []
  for i, opt in enumerate(options):
    o = _norm(str(opt))
    if not o:
      continue
    for m in re.finditer(rf"(?<![\w.]){re.escape(o)}(?![\w])", t):
      spans.append((m.start(), m.end(), i))
  # Drop a mention inside a longer mention ("two" inside "twenty two" never matches by the boundary
  # rule, but "red" inside "dark red" can when both are options).
  kept = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0])
                                      for o in spans)]
  if not kept:
    return None
  return LETTERS[max(kept, key=lambda s: (s[1], s[1] - s[0]))[2]]


def parse_number(s: str) -> float | None:
  """A number written as 1,234.5 / -3 / .5 / 2e-3 / 45% / \\frac{3}{4} / 3/4; None if not a number."""
  s = _strip_latex(s).strip().rstrip(".")
  m = _FRAC.fullmatch(s)
  if m:
    a, b = parse_number(m.group(1)), parse_number(m.group(2))
    return None if a is None or not b else a / b
  s = s.replace(",", "").rstrip("%").strip()
  if re.fullmatch(r"-?\d+(?:\.\d+)?\s*/\s*\d+(?:\.\d+)?", s):
    a, b = (float(x) for x in s.split("/"))
    return a / b if b else None
  try:
    x = float(s)
  except ValueError:
    return None
  return x if math.isfinite(x) else None


def extract_number(text: str) -> float | None:
  """The number a response gives as its answer: boxed / after 'answer is', else its last number."""
  span = final_answer(text)
  whole = parse_number(span)
  if whole is not None:
    return whole
  m = _FRAC.search(span)
  if m:
    return parse_number(m.group(0))
  nums = _NUMBER.findall(span) or _NUMBER.findall(after_thinking(text))
  return parse_number(nums[-1]) if nums else None


def numbers_match(pred: float | None, gold: float, rel: float = 1e-2, abs_tol: float = 1e-6) -> bool:
  """Equal to 1% (MMMU rounds to two decimals; 1% also forgives rounding of the last digit)."""
  return pred is not None and math.isclose(pred, gold, rel_tol=rel, abs_tol=abs_tol)


def match_open(text: str, gold) -> bool:
  """Open-answer correctness: numeric gold compared as numbers, text gold as a normalized phrase
  contained in the final answer. `gold` may be a list of accepted answers."""
  golds = gold if isinstance(gold, (list, tuple)) else [gold]
  span = final_answer(text)
  for g in golds:
    g_num = parse_number(str(g))
    if g_num is not None:
      if numbers_match(extract_number(text), g_num):
        return True
      continue
    ng = _norm(str(g))
    if ng and re.search(rf"(?<![\w]){re.escape(ng)}(?![\w])", _norm(span)):
      return True
  return False
