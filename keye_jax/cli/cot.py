"""`keye cot CONFIG [key.sub=value ...]`: the five-step chain-of-thought construction (train/cot/), or
rejection sampling with `mode=rft`. Progress and ETA on stderr; the result as the last stdout line:
{"prompts", "traces", "grades": {"A", "B", "C"}, "out"}."""

from __future__ import annotations


def add_parser(sub) -> None:
  c = sub.add_parser("cot", help="chain-of-thought construction: prompts -> traces -> assessment -> review -> "
                                 "scored SFT manifest (mode=rft: rejection sampling)")
  c.add_argument("config")
  c.add_argument("overrides", nargs="*", metavar="key.sub=value")
  c.set_defaults(fn=run)


def run(args) -> int:
  from keye_jax.cli import _emit
  from train.cot.config import load_cot_config
  from train.cot.run import run as run_cot
  result = run_cot(load_cot_config(args.config, args.overrides))
  _emit({k: result[k] for k in ("prompts", "traces", "grades", "out")}
        | {k: v for k, v in result.items() if k not in ("prompts", "traces", "grades", "out")})
  return 0
