"""`keye rl CONFIG [key.sub=value ...]`: GSPO reinforcement learning (train/rl/loop.py), or an iterative
SFT/RL/RFT schedule when CONFIG has `phases:` (train/schedule.py)."""

from __future__ import annotations


def add_parser(sub) -> None:
  r = sub.add_parser("rl", help="GSPO reinforcement learning from a checkpoint or run dir (or an SFT/RL/RFT schedule)")
  r.add_argument("config")
  r.add_argument("overrides", nargs="*", metavar="key.sub=value")
  r.set_defaults(fn=run)


def run(args) -> int:
  from keye_jax.cli import _emit
  from train.rl import loop
  result = loop.run(args.config, args.overrides)
  _emit(result)
  return 0
