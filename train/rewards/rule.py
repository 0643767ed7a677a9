"""Rule verifiers: is the response's final answer the reference? (1.0 / 0.0)

Built on the evaluation's own judgement of a reply (`keye_jax.evaluate.scoring.is_correct`, on
`keye_jax.evaluate.extract`'s answer extraction and math-verify), so that a reward and the benchmark
score agree on what a response answered.

Kinds:
  "choice"  the option letter (reference: a letter, or one of `options`' texts);
  "number"  the answer's number: by default the evaluation's rule (MMMU's: equal when rounded to two
            decimals); with `rel_tol` (and `abs_tol`) equal within that tolerance instead;
  "text"    the normalised reference phrase appears in the final-answer span (the evaluation's rule);
  "math"    math-verify compares the (boxed) answer with the reference symbolically;
  "exact"   the final-answer span equals the reference, ignoring case, spaces and a final period;
  "boxed"   a \\boxed{} must be present; its content must equal the reference as math (math-verify,
            numbers by the number rule) or as exact text.
  None / "auto"  is_correct's inference: options or a one-letter reference -> choice, LaTeX in the
            reference or a \\boxed{} in the response -> math, a numeric reference -> number, else text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from keye_jax.evaluate import extract, scoring
from train.rewards.registry import per_item, register

KINDS = ("choice", "number", "text", "math", "exact", "boxed")


def infer_kind(reference, options: Sequence[str] | None = None, response: str = "") -> str:
  """The kind a reference implies when the data does not say (is_correct's "auto")."""
  return scoring.infer_kind(reference, response, options)


def _squash(s: str) -> str:
  return re.sub(r"\s+", " ", s).strip().rstrip(".").strip().casefold()


def score_answer(response_text: str, reference, *, kind: str | None = None,
                 options: Sequence[str] | None = None, rel_tol: float | None = None,
                 abs_tol: float = 0.0) -> float:
  """1.0 if `response_text` answers `reference` (see the module doc for `kind`), else 0.0.
  `reference` may be a list of accepted answers."""
  kind = None if kind == "auto" else kind
  if kind is not None and kind not in KINDS:
    raise ValueError(f"unknown answer kind {kind!r} (known: {', '.join(KINDS)})")
  refs = list(reference) if isinstance(reference, (list, tuple)) else [reference]
  if kind == "number" and rel_tol is not None:
    pred = extract.extract_number(response_text)
    golds = [extract.parse_number(str(r)) for r in refs]
    if None in golds:
      raise ValueError(f"number reference {refs[golds.index(None)]!r} is not a number")
    return float(any(extract.numbers_match(pred, g, rel_tol, abs_tol) for g in golds))
  if kind == "exact":
    got = _squash(extract.final_answer(response_text))
    return float(any(got == _squash(str(r)) for r in refs))
  if kind == "boxed":
    boxed = extract.last_boxed(extract.after_thinking(response_text))
    if boxed is None:
      return 0.0
    only_box = f"\\boxed{{{boxed}}}"
    return float(any(_squash(extract.final_answer(only_box)) == _squash(str(r)) for r in refs)
                 or scoring.is_correct(only_box, refs, "math"))
  return float(scoring.is_correct(response_text, reference, kind or "auto", options))


@register("answer")
def answer_reward(kind: str | None = None, rel_tol: float | None = None, abs_tol: float = 0.0,
                  answer_key: str = "answer", kind_key: str = "answer_kind", no_reference: float | None = None):
  """Correctness of the final answer against `sample[answer_key]`; the kind from the config, else the
  sample's `kind_key` field, else inferred. A sample without a reference scores `no_reference` (a mixture
  of tasks, each rewarded by its own reward) or, when that is not set, is an error."""
  def answer(sample: Mapping, response: str) -> float:
    if sample.get(answer_key) is None:
      if no_reference is not None:
        return float(no_reference)
      raise ValueError(f"answer reward: sample {sample.get('id', '?')!r} has no {answer_key!r} field")
    return score_answer(response, sample[answer_key], kind=kind or sample.get(kind_key),
                        options=sample.get("options"), rel_tol=rel_tol, abs_tol=abs_tol)
  return per_item(answer)
