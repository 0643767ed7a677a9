"""Is a reply right? One entry point, `is_correct`, shared by the benchmark scoring and the RL rewards, and
`score(item, text)` for the harness.

Kinds:
  "choice"  the option letter `extract.extract_choice` reads equals the reference (a letter, or one of
            `options`' texts);
  "number"  `extract.extract_number` against the numeric reference by MMMU's rule (two decimals);
  "text"    the normalised reference phrase appears in the final-answer span, a numeric reference
            compared as "number" (`extract.match_open`; what MMMU's open questions use);
  "math"    math-verify (HuggingFace) parses the reply's answer (boxed first) and the reference as LaTeX /
            expressions and compares them symbolically; a numeric reference also passes by the number rule;
  "auto"    a one-letter reference (or options given) -> choice; LaTeX in the reference, or a \\boxed{} in
            the reply -> math; a numeric reference -> number; otherwise text.
A reference may be a list of accepted answers (any one counts).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

from keye_jax.evaluate.extract import LETTERS, after_thinking, extract_choice, final_answer, last_boxed, match_open, \
    parse_number
from keye_jax.evaluate.items import Item

KINDS = ("auto", "choice", "number", "text", "math")
_LATEX = re.compile(r"\\[a-zA-Z]+|\^|_\{|\$")


def _squash(s: str) -> str:
  return re.sub(r"\s+", " ", str(s)).strip().rstrip(".").strip().casefold()


def choice_letter(reference, options: Sequence[str] | None = None) -> str:
  """The letter a choice reference names: 'B', '(B)', 'b', or the text of one of `options`."""
  ref = str(reference).strip()
  if len(ref) == 1 and ref.upper() in LETTERS:
    return ref.upper()
  for i, opt in enumerate(options or []):
    if _squash(opt) == _squash(ref):
      return LETTERS[i]
  m = re.fullmatch(r"\(?([A-Z])\)?[.:]?(?:\s.*)?", ref)
  if m:
    return m.group(1)
  raise ValueError(f"choice reference {reference!r} is neither a letter nor one of the options")


def _math_verify(text: str, reference: str) -> bool:
  from math_verify import parse, verify
  # math-verify's timeouts use SIGALRM, which only the main thread may set (reward workers are threads).
  timeout = 5 if threading.current_thread() is threading.main_thread() else None
  ref = str(reference).strip()
  gold = parse(ref if "$" in ref or "\\boxed" in ref else f"${ref}$", parsing_timeout=timeout)
  if not gold:
    gold = parse(ref, parsing_timeout=timeout)
  answer = after_thinking(text)
  boxed = last_boxed(answer)
  pred = parse(f"\\boxed{{{boxed}}}" if boxed is not None else answer, parsing_timeout=timeout)
  return bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=timeout)


def infer_kind(reference, text: str = "", options: Sequence[str] | None = None) -> str:
  """The kind "auto" resolves to for this reference (see the module doc)."""
  refs = reference if isinstance(reference, (list, tuple)) else [reference]
  first = str(refs[0]).strip() if refs else ""
  if options or (len(first) == 1 and first.upper() in LETTERS and first.isalpha()):
    return "choice"
  if any(_LATEX.search(str(r)) for r in refs) or "\\boxed" in text:
    return "math"
  if all(parse_number(str(r)) is not None for r in refs):
    return "number"
  return "text"


def is_correct(prediction_text: str, reference, kind: str = "auto", options: Sequence[str] | None = None) -> bool:
  """Whether the reply `prediction_text` answers `reference` (see the module doc for the kinds)."""
  if kind not in KINDS:
    raise ValueError(f"unknown answer kind {kind!r}; known: {KINDS}")
  if kind == "auto":
    kind = infer_kind(reference, prediction_text, options)
  refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
  if kind == "choice":
    pred = extract_choice(prediction_text, list(options) if options else None)
    return pred is not None and any(pred == choice_letter(r, options) for r in refs)
  if kind == "math":
    if not after_thinking(prediction_text):
      return False
    return any(_math_verify(prediction_text, r) or (parse_number(str(r)) is not None and
                                                    match_open(prediction_text, r)) for r in refs)
  if kind == "number":
    bad = [r for r in refs if parse_number(str(r)) is None]
    if bad:
      raise ValueError(f"number reference {bad[0]!r} is not a number")
  return match_open(prediction_text, refs)


def score(item: Item, text: str, judge=None) -> dict:
  """{"pred": extracted answer, "score": 1.0 / 0.0}. Choice: the letter; open: the final-answer span;
  ifeval: prompt-level strict (loose and per-instruction results alongside)."""
  if item.kind == "choice":
    pred = extract_choice(text, item.options or None)
    return {"pred": pred, "score": float(is_correct(text, item.answer, "choice", item.options or None))}
  if item.kind == "open":
    # MMMU's rule (numbers to two decimals, else the phrase), not math-verify: the score stays the official one.
    return {"pred": final_answer(text), "score": float(is_correct(text, item.answer, "text"))}
  if item.kind == "ifeval":
    from keye_jax.evaluate import ifeval
    r = ifeval.check(after_thinking(text), item.extra["instruction_id_list"], item.extra["kwargs"],
                     prompt=item.extra.get("prompt", ""))
    return {"pred": None, "score": float(r["strict"]), **r}
  raise ValueError(f"item {item.id}: no default scoring for kind {item.kind!r}")
