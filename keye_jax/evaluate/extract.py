"""Answer extraction from free-form model outputs (pure string functions).

Order of trust for an option letter:
  1. only the text after the last `</think>`; an unclosed `<think>` (the output ran out while thinking) is
     no answer at all, never its reasoning text;
  2. the last `\\boxed{...}` (nested braces allowed);
  3. a stated answer: "answer is X", "Answer: X", "X is correct" (the last one wins; a lower-case letter
     only where it stands alone: "answer: b", not "answer is a cat");
  4. a leading letter ("B", "(B) ...", "B. ..."), but not the article in "A cat ...";
  5. "option X" / "choice X" / "Best option: (X" phrases (the last one); a bracketed "(X)";
  6. the option texts mentioned, the last mention winning; a lone capital letter.
So "The answer is (B), since option D contradicts..." is B: what the reply states as its answer outranks
an option it merely discusses. The references differ on purpose: lmms-eval 0.7.3's MMMU parser
(parse_multi_choice_response, as MMMU's own) takes the LAST bracketed or lone letter, so D there, and picks
a random letter when it finds none; VLMEvalKit's can_infer_option gives up when two letters appear (then
asks an LLM judge, or scores it wrong without one), and rejects any reply of more than three words that
contains "A" ("A is correct, B is not." -> nothing).

Numbers: the stated answer (boxed, "answer is", else the tail after the last "is" / "=" / "so" ... of the
last sentence that has one), its FIRST number, read with "x 10^k" / "e-k" exponents and with units
ignored ("45 cm^2" is 45, not 2; "5 m/s after 10 s" is 5).
Nothing found gives None, which scores as wrong (no random guess, unlike MMMU's and lmms-eval's parsers,
so runs are reproducible).
"""

from __future__ import annotations

import math
import re

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

_ANSWER_PHRASE = r"(?i:(?:final\s+)?answer\s*(?:is|:|=)|answer\s+should\s+be|answer\s+would\s+be)"
# A stated answer: the phrase, optional markup, then the letter (any case; checked by `_standalone`).
_STATED = re.compile(_ANSWER_PHRASE + r"\s*[:\-]?\s*(?:\*\*|\"|'|`)?\s*(\(?)\s*([A-Za-z])\s*(\)?)")
# "A is correct", "(C) is the right answer".
_IS_CORRECT = re.compile(r"(?<![A-Za-z'])\(?([A-Z])\)?\s+is\s+(?:the\s+)?(?:correct|right|true|best)\b")
_OPTION = re.compile(r"(?i:option|choice|best\s+option)\s*(?:is|:)?\s*[:\-]?\s*(?:\*\*|\"|')?\s*\(?\s*([A-Z])"
                     r"\s*\)?(?![A-Za-z])")
_LEADING = re.compile(r"^\s*(?:\*\*)?\(?([A-Z])(?:\)|\.|:|,|\*\*|\s*$)")
_BRACKETED = re.compile(r"\(([A-Z])\)")
_LONE = re.compile(r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
# A number: a fraction a/b, digits with thousands commas, or a plain decimal with an optional exponent
# ("2e-3", "3.2 x 10^5", "3.2 \\times 10^{-3}", "3.2×10⁵" is not handled). A number right after "^" is an
# exponent (of a unit, "cm^2"), never an answer.
_EXP = r"(?:\s*(?:x|X|×|\*|\\times|\\cdot)\s*10\s*\^\s*\{?\s*([-+−]?\d+)\s*\}?|[eE]([-+]?\d+))?"
_NUM = re.compile(r"(?<![\^\w.])(?<!\^\{)(?<!\^\s)"
                  r"(-|−)?(\d+(?:\.\d+)?\s*/\s*\d+(?:\.\d+)?(?![\d.])|\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d*\.?\d+)"
                  + _EXP)
# Where a sentence states its result: the text after the last of these is the answer.
_INDICATOR = re.compile(r"(?i)(?:\bis\b|\bare\b|\bwas\b|\bequals?\b|=|≈|\\approx|\bso\b|\bthus\b|\btherefore\b|"
                        r"\bhence\b|\bgives?\b|\babout\b|\bapproximately\b|\bbe\b|:)")


def after_thinking(text: str) -> str:
  """The answer part of a thinking-mode output: what follows the last </think>. An unclosed <think> (no
  </think> after the last <think>) has no answer part: ''."""
  last_open, last_close = text.rfind("<think>"), text.rfind("</think>")
  if last_open > last_close:
    return ""
  return text[last_close + len("</think>"):].strip() if last_close >= 0 else text.strip()


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


def _stated_tail(text: str) -> str | None:
  """What follows the last 'answer is' / 'Answer:' (to the end of that line), or None."""
  m = None
  for m in re.finditer(_ANSWER_PHRASE, text):
    pass
  if m is None:
    return None
  tail = re.sub(r"^[\s:]*(?:-\s+)?", "", text[m.end():])  # "answer: -4.5" keeps its sign, "answer - 4.5" not
  return tail.split("\n")[0].strip().rstrip(".").strip() or None


def final_answer(text: str) -> str:
  """The span that holds the final answer: boxed, else after 'answer is/:', else the whole answer part."""
  text = after_thinking(text)
  boxed = last_boxed(text)
  if boxed is not None:
    return _strip_latex(boxed)
  tail = _stated_tail(text)
  return tail if tail is not None else text.strip()


def _norm(s: str) -> str:
  s = _strip_latex(s).lower()
  s = re.sub(r"[^\w\s%.\-/]", " ", s)
  return re.sub(r"\s+", " ", s).strip().rstrip(".")


def _standalone(m: re.Match, text: str) -> bool:
  """A lower-case letter after 'answer:' counts only bracketed or alone ('answer: b.'), not as a word."""
  letter = m.group(2)
  if letter.isupper():
    return re.match(r"[A-Za-z']", text[m.end(2):m.end(2) + 1] or " ") is None
  if m.group(1) and m.group(3):
    return True
  return re.match(r"\s*(?:[.,;!)\]*`'\"]+\s*)?(?:$|\n)", text[m.end(2):]) is not None


def extract_choice(text: str, options: list[str] | None = None, n_options: int | None = None) -> str | None:
  """Option letter chosen by `text`, among the first len(options) (or n_options) letters."""
  n = len(options) if options else (n_options or 26)
  valid = LETTERS[:n]
  text = after_thinking(text)
  if not text:
    return None
  boxed = last_boxed(text)
  if boxed is not None:
    got = extract_choice(_strip_latex(boxed), options, n)
    if got is not None:
      return got
  stated = [(m.start(), m.group(2).upper()) for m in _STATED.finditer(text) if _standalone(m, text)]
  stated += [(m.start(), m.group(1)) for m in _IS_CORRECT.finditer(text)]
  stated = [c for _, c in sorted(stated) if c in valid]
  if stated:
    return stated[-1]
  m = _LEADING.match(text)
  if m and m.group(1).upper() in valid and (m.group(1) != "A" or not _article_start(text)):
    return m.group(1).upper()
  named = [c for c in (m.group(1) for m in _OPTION.finditer(text)) if c in valid]
  if named:
    return named[-1]
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


def _value(m: re.Match) -> float | None:
  """The float of one `_NUM` match (sign, mantissa or fraction, optional power of ten)."""
  body = m.group(2).replace(",", "")
  if "/" in body:
    a, b = (float(x) for x in body.split("/"))
    x = a / b if b else None
  else:
    x = float(body)
  if x is None:
    return None
  exp = m.group(3) or m.group(4)
  if exp is not None:
    x *= 10.0 ** int(exp.replace("−", "-"))
  x = -x if m.group(1) else x
  return x if math.isfinite(x) else None


def _numbers(s: str) -> list[float]:
  s = _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", _strip_latex(s))
  return [v for v in (_value(m) for m in _NUM.finditer(s)) if v is not None]


def parse_number(s: str) -> float | None:
  """A string that IS a number: 1,234.5 / -3 / .5 / 2e-3 / 3.2 x 10^5 / 45% / \\frac{3}{4} / 3/4; else None."""
  s = _strip_latex(str(s)).strip().rstrip(".").rstrip("%").strip()
  m = _FRAC.fullmatch(s)
  if m:
    a, b = parse_number(m.group(1)), parse_number(m.group(2))
    return None if a is None or not b else a / b
  m = _NUM.fullmatch(s)
  if m is None:
    return None
  return _value(m)


def _result_tail(text: str) -> str:
  """The tail of the last sentence that states a result ("The area is 45 cm^2" -> "45 cm^2")."""
  sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])|\n+", text.strip()) if s.strip()]
  for s in reversed(sentences):
    if not _numbers(s):
      continue
    tails = [s[m.end():] for m in _INDICATOR.finditer(s) if _numbers(s[m.end():])]
    return tails[-1] if tails else s
  return text


def extract_number(text: str) -> float | None:
  """The number a response states as its answer (see the module doc); None if it states none."""
  text = after_thinking(text)
  boxed = last_boxed(text)
  span = _strip_latex(boxed) if boxed is not None else _stated_tail(text)
  if span is not None:
    nums = _numbers(span)
    if nums:
      return nums[0]
  nums = _numbers(_result_tail(text))
  return nums[0] if nums else None


def numbers_match(pred: float | None, gold: float, rel: float | None = None, abs_tol: float = 0.0) -> bool:
  """MMMU's official rule by default (eval_utils.py normalize_str/eval_open): both rounded to two decimals
  and equal, so 3.14159 matches 3.14 and 101 never matches 100. lmms-eval 0.7.3 uses the same rule for
  MMMU; a relative tolerance `rel` (e.g. 1e-2) can be asked for instead."""
  if pred is None:
    return False
  if rel is not None:
    return math.isclose(pred, gold, rel_tol=rel, abs_tol=abs_tol)
  return round(pred, 2) == round(gold, 2)


def match_open(text: str, gold, rel: float | None = None) -> bool:
  """Open-answer correctness: numeric gold compared as numbers (`numbers_match`), text gold as a normalized
  phrase contained in the final answer. `gold` may be a list of accepted answers."""
  golds = gold if isinstance(gold, (list, tuple)) else [gold]
  span = final_answer(text)
  pred_num = None
  for g in golds:
    g_num = parse_number(str(g))
    if g_num is not None:
      pred_num = extract_number(text) if pred_num is None else pred_num
      if numbers_match(pred_num, g_num, rel):
        return True
      continue
    ng = _norm(str(g))
    if ng and re.search(rf"(?<![\w]){re.escape(ng)}(?![\w])", _norm(span)):
      return True
  return False
