"""Retrieval-grounded reward: is the answer supported by the context given with the prompt?

The record carries the retrieved passages as `context` (a string, or a list of strings joined as
numbered passages). A judge (see train/rewards/judge.py: `cmd` or `judge`) scores how well every claim
of the answer is supported by that context; unsupported claims lower the score even when they are true.
A record without context is an error (the reward has nothing to ground against).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from train.rewards.judge import _INSTRUCTION, JudgeReward, resolve_judge
from train.rewards.registry import register

TEMPLATE = ("You are checking whether an answer is grounded in the given context.\n\n[Context]\n{context}\n\n"
            "[Question]\n{question}\n\n[Answer]\n{answer}\n\n"
            "Is every factual claim of the answer supported by the context? Claims the context does not "
            "support count against the answer even when they may be true; an answer that says the "
            "context does not contain the information, when it does not, is grounded. " + _INSTRUCTION)


def _with_context(sample: Mapping) -> Mapping:
  ctx = sample.get("context")
  if isinstance(ctx, (list, tuple)):
    sample = {**sample, "context": "\n\n".join(f"[{i}] {p}" for i, p in enumerate(ctx, 1))}
  return sample


class GroundedReward(JudgeReward):
  def __call__(self, samples: Sequence[Mapping], responses: Sequence[str]):
    return super().__call__([_with_context(s) for s in samples], responses)


@register("grounded")
def grounded_reward(cmd=None, judge=None, scale: float = 10.0, unparsable_score: float = 0.0,
                    timeout: float = 120.0):
  """The judge's score in [0, 1] of the answer's support by the record's `context`."""
  return GroundedReward(resolve_judge(cmd, judge, timeout), TEMPLATE, scale, unparsable_score,
                        needs=("context",))
