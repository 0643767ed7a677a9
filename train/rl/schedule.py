"""The iterative post-training loop: SFT -> RL -> RFT -> SFT -> RL, each phase from the previous one's
checkpoint (`keye rl SCHEDULE.yaml`).

  run_dir: runs/iterate                  # phase i runs in RUN_DIR/<i>_<kind>
  init_from: runs/keye-8b/stage4         # the first phase's starting checkpoint (optional)
  phases:
    - {kind: sft, config: sft.yaml}      # `keye train` with an SFT config
    - {kind: rl, config: rl.yaml}        # `keye rl`
    - {kind: rft, config: rft.yaml}      # `keye cot` in mode rft: sample the current model, keep verified answers
    - {kind: sft, config: sft.yaml}      # after an rft phase: trains on its manifest (out/sft.jsonl)
    - {kind: rl, config: rl.yaml}        # after an earlier rl phase: keeps its prompts with pass rate in (0, 1)
    # each phase may add `overrides: [key.sub=value, ...]`

Each trained phase starts from the last trained phase's run dir (an rft phase samples it and trains
nothing). A phase already finished is skipped on a rerun (every phase resumes from its own checkpoints),
so an interrupted schedule continues where it stopped. Command-line overrides apply to every sft and rl
phase. Returns {"run_dir", "phases": [{"name", "kind", "run_dir", "seconds", "result"}], "seconds"}.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from keye_jax.config import ConfigError, from_dict, path_field, read_yaml

KINDS = ("sft", "rl", "rft")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  kind: str = ""
  config: str = path_field()
  name: str = ""  # default <i>_<kind>
  overrides: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"phases: kind={self.kind!r} is not one of {', '.join(KINDS)}")
    if not self.config:
      raise ConfigError(f"phases: a {self.kind} phase needs `config`")


@dataclasses.dataclass(frozen=True)
class IterationConfig:
  phases: tuple[PhaseConfig, ...] = ()
  run_dir: str = path_field("runs/iterate")
  init_from: str = path_field()


def load_schedule(path: str) -> IterationConfig:
  try:
    cfg = from_dict(IterationConfig, read_yaml(path), base_dir=os.path.dirname(os.path.abspath(path)))
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  if not cfg.phases:
    raise ConfigError(f"{path}: `phases` is empty")
  return cfg


def run_schedule(path: str, overrides=()) -> dict:
  sched = load_schedule(path)
  t0 = time.time()
  start, last_rl, rft_manifest = sched.init_from, "", ""
  rows = []
  for i, ph in enumerate(sched.phases):
    name = ph.name or f"{i}_{ph.kind}"
    run_dir = os.path.join(os.path.abspath(sched.run_dir), name)
    print(f"=== phase {name} ({ph.kind}, {os.path.basename(ph.config)}) from {start or 'its config'} ===",
          file=sys.stderr, flush=True)
    s0 = time.time()
    extra = [f"run_dir={run_dir}"] + ([f"init_from={start}"] if start else [])
    if ph.kind == "sft":
      from train.loop import train
      from train.config import load_train_config
      if rft_manifest:
        extra.append(f"data.sources=[{{path: {rft_manifest}, name: rft}}]")
      result = train(load_train_config(ph.config, [*ph.overrides, *extra, *overrides]))
      start, rft_manifest = run_dir, ""
    elif ph.kind == "rl":
      from train.rl.config import load_rl_config
      from train.rl.loop import train_rl
      if last_rl:
        extra.append(f"rl.pass_rates_from={last_rl}")
      result = train_rl(load_rl_config(ph.config, [*ph.overrides, *extra, *overrides]))
      start, last_rl = run_dir, run_dir
    else:
      result = _rft(ph, start, run_dir)
      rft_manifest = result["manifest"]
    rows.append({"name": name, "kind": ph.kind, "run_dir": run_dir, "seconds": round(time.time() - s0, 1),
                 "result": result})
  return {"run_dir": os.path.abspath(sched.run_dir), "phases": rows, "seconds": round(time.time() - t0, 1)}


def _rft(ph: PhaseConfig, start: str, out: str) -> dict:
  """Rejection sampling with the current model (train/cot in mode rft); its manifest feeds the next SFT."""
  try:
    from train.cot.config import load_cot_config
    from train.cot.run import run as run_cot
  except ImportError as e:
    raise ValueError(f"phase kind rft needs train/cot (rejection sampling), which is not available: {e}") from None
  if not start:
    raise ValueError("an rft phase needs a model to sample: put a trained phase or `init_from` before it")
  cfg = load_cot_config(ph.config, [*ph.overrides, "mode=rft", f"checkpoint={start}", f"out={out}"])
  result = run_cot(cfg)
  manifest = os.path.join(out, "sft.jsonl")
  if not os.path.exists(manifest):
    raise FileNotFoundError(f"rft phase: {manifest} was not written (see {out})")
  return {**result, "manifest": manifest}
