"""Pairwise reward model: a judge compares two answers (A / B) and the reward is the win probability.

The judge is a callable `judge(prompts) -> replies` (train/rewards/judge.py: `cmd` for an external
program, or `judge=` for our own reward model run by our sampler). A reply is a probability that A is
better (a number in [0, 1], e.g. from the "A" / "B" token probabilities of a reward model) or a text
verdict ("[[A]]", "[[B]]", "[[tie]]", JSON {"winner": "A"}, "Answer B is better", ...).

Position bias is cancelled by judging both orders: with p1 = P(A better) for (A = response, B = other)
and p2 = P(A better) for (A = other, B = response), the response's win = (p1 + 1 - p2) / 2.
The other answer is the reference (`against: reference`, the record's `answer` field or
`reference_key`) or every sibling sampled for the same prompt (`against: siblings`, the mean win over
them; a lone response gets 0.5). Replies that cannot be parsed count as a tie (`unparsable_score`,
default 0.5) and are counted in `reward.stats["unparsable"]`.

Training the reward model is SFT on `pair_sft_records` (each preference pair rendered as a judging
prompt in both orders, answered with the verdict, with or without a thinking trace).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from keye_jax.evaluate.extract import after_thinking
from train.rewards.judge import Judge, _json_objects, resolve_judge
from train.rewards.registry import register

TEMPLATE = ("You compare two answers to the same request.\n\n[Request]\n{question}\n\n[Answer A]\n{a}\n\n"
            "[Answer B]\n{b}\n\nWhich answer is better overall: correct, faithful to the request and the "
            "image or video, follows its instructions, helpful, safe and clear? Do not let the order or "
            "the length of the answers decide. End with your verdict: [[A]] or [[B]] (or [[tie]]).")

_SIDE = {"a": 1.0, "b": 0.0, "tie": 0.5, "equal": 0.5, "draw": 0.5}


def parse_preference(reply) -> float | None:
  """P(answer A is better) from a judge reply, or None when it gives none."""
  if isinstance(reply, (int, float)) and not isinstance(reply, bool):
    return float(reply) if 0.0 <= reply <= 1.0 else None
  text = after_thinking(str(reply))
  for obj in reversed(_json_objects(text)):
    if not isinstance(obj, Mapping):
      continue
    keyed = {str(k).lower(): v for k, v in obj.items()}
    for key in ("p_a", "prob_a", "probability_a"):
      if isinstance(keyed.get(key), (int, float)) and 0 <= keyed[key] <= 1:
        return float(keyed[key])
    for key in ("winner", "better", "preference", "verdict", "choice"):
      side = str(keyed.get(key, "")).strip().strip("[]").lower()
      side = side.removeprefix("answer ").strip()
      if side in _SIDE:
        return _SIDE[side]
  brackets = re.findall(r"\[\[\s*(A|B|tie)\s*\]\]", text, re.IGNORECASE)
  if brackets:
    return _SIDE[brackets[-1].lower()]
  plain = text.replace("*", "")
  said = re.findall(r"(?:answer|response|assistant)\s+(A|B)\s+is\s+(?:better|preferred|superior)"
                    r"|(?:verdict|winner|better answer|preferred answer|choice)\W{0,6}(?:answer\s+)?(A|B|tie)\b"
                    r"|\b(A|B)\s+is\s+better", plain, re.IGNORECASE)
  if said:
    side = next(s for s in said[-1] if s)
    return _SIDE[side.lower()]
  return None


def pair_prompt(question: str, a: str, b: str, template: str = TEMPLATE) -> str:
  return template.format(question=question, a=a, b=b)


class PairwiseReward:
  """Win probability of each response against the reference or its siblings, both orders judged."""

  def __init__(self, judge: Judge, against: str = "reference", reference_key: str = "answer",
               template: str = TEMPLATE, unparsable_score: float = 0.5, answer_only: bool = True):
    if against not in ("reference", "siblings"):
      raise ValueError(f"pairwise.against: {against!r} is not reference or siblings")
    self.judge, self.against, self.reference_key = judge, against, reference_key
    self.template, self.unparsable_score, self.answer_only = template, float(unparsable_score), answer_only
    self.stats = {"judged": 0, "unparsable": 0}

  def _prefer(self, triples: list[tuple[str, str, str]]) -> list[float]:
    """P(A better) for each (question, A, B)."""
    if not triples:
      return []
    replies = list(self.judge([pair_prompt(q, a, b, self.template) for q, a, b in triples]))
    if len(replies) != len(triples):
      raise ValueError(f"judge returned {len(replies)} replies for {len(triples)} prompts")
    probs = [parse_preference(r) for r in replies]
    self.stats["judged"] += len(probs)
    self.stats["unparsable"] += sum(p is None for p in probs)
    return [self.unparsable_score if p is None else p for p in probs]

  def _wins(self, pairs: list[tuple[str, str, str]]) -> list[float]:
    """Win of `x` over `y` for each (question, x, y), judged in both orders."""
    p = self._prefer([t for q, x, y in pairs for t in ((q, x, y), (q, y, x))])
    return [(p[2 * k] + 1.0 - p[2 * k + 1]) / 2.0 for k in range(len(pairs))]

  def __call__(self, samples: Sequence[Mapping], responses: Sequence[str]) -> np.ndarray:
    if len(samples) != len(responses):
      raise ValueError(f"rewards: {len(samples)} samples but {len(responses)} responses")
    shown = [after_thinking(r) if self.answer_only else r for r in responses]
    questions = [str(s.get("prompt") or "") for s in samples]
    if self.against == "reference":
      refs = []
      for s in samples:
        if s.get(self.reference_key) is None:
          raise ValueError(f"pairwise reward: sample {s.get('id', '?')!r} has no {self.reference_key!r}")
        refs.append(str(s[self.reference_key]))
      return np.asarray(self._wins(list(zip(questions, shown, refs))), np.float32)
    groups: dict = {}
    for i, s in enumerate(samples):
      groups.setdefault(s.get("id", questions[i]), []).append(i)
    pairs = [(i, j) for members in groups.values() for k, i in enumerate(members) for j in members[k + 1:]]
    wins = self._wins([(questions[i], shown[i], shown[j]) for i, j in pairs])
    total, count = np.zeros(len(responses)), np.zeros(len(responses))
    for (i, j), w in zip(pairs, wins):
      total[i] += w
      total[j] += 1.0 - w
      count[i] += 1
      count[j] += 1
    return np.where(count > 0, total / np.maximum(count, 1), 0.5).astype(np.float32)


@register("pairwise")
def pairwise_reward(against: str = "reference", cmd=None, judge: Judge | None = None,
                    reference_key: str = "answer", template: str = TEMPLATE, unparsable_score: float = 0.5,
                    answer_only: bool = True, timeout: float = 120.0):
  """Pairwise reward-model reward (see the module doc)."""
  return PairwiseReward(resolve_judge(cmd, judge, timeout), against, reference_key, template,
                        unparsable_score, answer_only)


def pair_sft_records(pair: Mapping, *, thinking: bool = False, template: str = TEMPLATE) -> list[dict]:
  """SFT records that teach the A/B judge one preference pair, in both orders.

  pair: {"prompt": question text, "chosen": ..., "rejected": ..., optional "images" / "videos" (paths
  shown to the judge before the prompt), optional "rationale" (the thinking trace, with thinking=True)}.
  The assistant turn is the verdict ("[[A]]" / "[[B]]"), after "<think>rationale</think>" with
  thinking, after an empty think block without (the /no_think form)."""
  for key in ("prompt", "chosen", "rejected"):
    if pair.get(key) is None:
      raise ValueError(f"preference pair {pair.get('id', '?')!r}: no {key!r}")
  if thinking and not pair.get("rationale"):
    raise ValueError(f"preference pair {pair.get('id', '?')!r}: thinking=True needs a 'rationale'")
  media = ([{"type": "image", "image": p} for p in pair.get("images") or []]
           + [{"type": "video", "video": v} for v in pair.get("videos") or []])
  out = []
  for verdict, (a, b) in (("A", (pair["chosen"], pair["rejected"])), ("B", (pair["rejected"], pair["chosen"]))):
    text = pair_prompt(pair["prompt"], a, b, template) + (" /think" if thinking else " /no_think")
    answer = (f"<think>\n{pair['rationale']}\n</think>\n\n" if thinking else "<think>\n\n</think>\n\n") + f"[[{verdict}]]"
    out.append({"id": f"{pair.get('id', 'pair')}:{verdict}",
                "messages": [{"role": "user", "content": media + [{"type": "text", "text": text}]},
                             {"role": "assistant", "content": [{"type": "text", "text": answer}]}]})
  return out
