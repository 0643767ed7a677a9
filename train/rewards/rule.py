"""Rule verifiers: is the response's final answer the reference? (1.0 / 0.0)

Built on `keye_jax.evaluate.extract` (the evaluation's own answer extraction: text after the last
</think>, the last \\boxed{}, "answer is X", option letters, numbers), so that a reward and the benchmark
score agree on what a response answered.

Kinds:
  "choice"  the option letter (reference: a letter, or one of `options`' texts);
  "number"  the answer's number within a relative tolerance (default 1%, as the evaluation);
  "text"    the normalised reference phrase appears in the final-answer span (the evaluation's rule);
  "exact"   the final-answer span equals the reference, ignoring case, spaces and a final period;
  "boxed"   a \\boxed{} must be present; its content compared as a number when the reference is one,
            else as exact text.
  None      inferred: options given or a one-letter reference -> choice, a numeric reference -> number,
            otherwise text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from keye_jax.evaluate import extract
from train.rewards.registry import per_item, register

KINDS = ("choice", "number", "text", "exact", "boxed")


def infer_kind(reference, options: Sequence[str] | None = None) -> str:
  """The kind a reference implies when the data does not say."""
  if options:
    return "choice"
  ref = str(reference).strip()
  if len(ref) == 1 and ref in extract.LETTERS:
    return "choice"
  if not isinstance(reference, (list, tuple)) and extract.parse_number(ref) is not None:
    return "number"
  return "text"


def _squash(s: str) -> str:
  return re.sub(r"\s+", " ", s).strip().rstrip(".").strip().casefold()


def _choice_letter(reference, options):
  ref = str(reference).strip()
  if len(ref) == 1 and ref.upper() in extract.LETTERS:
    return ref.upper()
  for i, opt in enumerate(options or []):
    if _squash(str(opt)) == _squash(ref):
      return extract.LETTERS[i]
  m = re.fullmatch(r"\(?([A-Z])\)?[.:]?(?:\s.*)?", ref)  # "(B)", "B. red"
  if m:
    return m.group(1)
  raise ValueError(f"choice reference {reference!r} is neither a letter nor one of the options")


def score_answer(response_text: str, reference, *, kind: str | None = None,
                 options: Sequence[str] | None = None, rel_tol: float = 1e-2,
                 abs_tol: float = 1e-6) -> float:
  """1.0 if `response_text` answers `reference` (see the module doc for `kind`), else 0.0.
  `reference` may be a list of accepted answers."""
  if isinstance(reference, (list, tuple)) and kind != "choice":
    return float(any(score_answer(response_text, r, kind=kind, options=options, rel_tol=rel_tol,
                                  abs_tol=abs_tol) for r in reference))
  kind = kind or infer_kind(reference, options)
  if kind == "choice":
    refs = reference if isinstance(reference, (list, tuple)) else [reference]
    letters = {_choice_letter(r, options) for r in refs}
    pred = extract.extract_choice(response_text, list(options) if options else None)
    return float(pred in letters)
  if kind == "number":
    gold = extract.parse_number(str(reference))
    if gold is None:
      raise ValueError(f"number reference {reference!r} is not a number")
    return float(extract.numbers_match(extract.extract_number(response_text), gold, rel_tol, abs_tol))
  if kind == "text":
    return float(extract.match_open(response_text, reference))
  if kind == "exact":
    return float(_squash(extract.final_answer(response_text)) == _squash(str(reference)))
  if kind == "boxed":
    boxed = extract.last_boxed(extract.after_thinking(response_text))
    if boxed is None:
      return 0.0
    gold = extract.parse_number(str(reference))
    if gold is not None:
      return float(extract.numbers_match(extract.parse_number(boxed), gold, rel_tol, abs_tol))
    return float(_squash(extract.final_answer(f"\\boxed{{{boxed}}}")) == _squash(str(reference)))
  raise ValueError(f"unknown answer kind {kind!r} (known: {', '.join(KINDS)})")


@register("answer")
def answer_reward(kind: str | None = None, rel_tol: float = 1e-2, abs_tol: float = 1e-6,
                  answer_key: str = "answer", kind_key: str = "answer_kind"):
  """Correctness of the final answer against `sample[answer_key]`; the kind from the config, else the
  sample's `kind_key` field, else inferred. A sample without a reference is an error."""
  def answer(sample: Mapping, response: str) -> float:
    if sample.get(answer_key) is None:
      raise ValueError(f"answer reward: sample {sample.get('id', '?')!r} has no {answer_key!r} field")
    return score_answer(response, sample[answer_key], kind=kind or sample.get(kind_key),
                        options=sample.get("options"), rel_tol=rel_tol, abs_tol=abs_tol)
  return per_item(answer)
