"""`run(config_path, overrides)`: what `keye train CONFIG` runs: one stage YAML, or a schedule YAML that
lists stage YAMLs run in order, each starting from the previous stage's checkpoint, optionally with the
demo dataset built first and a benchmark scored before and after.

  stages: [stage1.yaml, stage2.yaml, stage3.yaml, stage4.yaml]   # relative to this file
  run_dir: ../../runs/demo           # stage i runs in RUN_DIR/<stage file name>
  demo_data: ../../runs/demo/data    # written (demo dataset + demo tokenizer in data/tokenizer) if missing
  eval: {benchmark: demo, data: ../../runs/demo/data/test.jsonl}

Paths in this file resolve against it, command-line ones against the current directory. Command-line
overrides apply to every stage, except `run_dir=DIR`, which moves the whole schedule (each stage still
gets its own DIR/<stage name>). A stage already finished (its run dir holds the final step) is skipped
without touching its checkpoints or metrics, so a schedule interrupted anywhere resumes where it stopped.
RUN_DIR/schedule.json names the stage run dirs in order: `keye generate RUN_DIR` reads the last stage's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from keye_jax import checkpoint_io
from keye_jax.config import ConfigError, from_dict, parse_override, path_field, read_yaml, resolve_path
from train.config import TrainConfig, load_train_config
from train.loop import train
from train.metrics import read_metrics


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  benchmark: str = ""
  data: str = path_field()
  max_new_tokens: int = 0  # 0: the benchmark's default


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  stages: tuple[str, ...] = ()
  run_dir: str = path_field("runs/schedule")
  demo_data: str = path_field()  # the demo's dataset directory, built when missing (one-command demo)
  eval: EvalConfig = EvalConfig()


def run(config_path: str, overrides=()) -> dict:
  """Trains per the YAML at `config_path`: a stage returns {"run_dir", "final_step", "final_loss"}, a
  schedule its summary (see `run_schedule`)."""
  if "stages" in read_yaml(config_path):
    return run_schedule(config_path, overrides)
  return train(load_train_config(config_path, overrides))


def ensure_demo_data(path: str) -> None:
  """The demo dataset and the demo tokenizer (in PATH/tokenizer), each written when missing."""
  if not os.path.exists(os.path.join(path, "info.json")):
    from train.data.demo import write_demo_dataset
    print(f"writing the demo dataset to {path} ...", file=sys.stderr, flush=True)
    write_demo_dataset(path)
  if not os.path.exists(os.path.join(path, "tokenizer", "tokenizer.json")):
    from keye_jax.processing.tokenizer import build_demo_tokenizer
    build_demo_tokenizer(os.path.join(path, "tokenizer"))


def load_schedule(path: str, overrides=()) -> tuple[ScheduleConfig, list[TrainConfig]]:
  """The schedule and its stage configs (stage i > 1 starting from stage i-1's run dir)."""
  base = os.path.dirname(os.path.abspath(path))
  try:
    sched = from_dict(ScheduleConfig, read_yaml(path), base_dir=base)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  if not sched.stages:
    raise ConfigError(f"{path}: stages: the schedule lists no stage files")
  stage_overrides = []
  for item in overrides:
    key, raw = parse_override(item)
    if key == "run_dir":
      sched = dataclasses.replace(sched, run_dir=resolve_path(raw, None))
    else:
      stage_overrides.append(item)
  cfgs, prev = [], None
  for rel in sched.stages:
    stage_path = resolve_path(rel, base)
    name = os.path.splitext(os.path.basename(stage_path))[0]
    extra = [f"run_dir={os.path.join(sched.run_dir, name)}"]
    if prev is not None:
      extra.append(f"init_from={prev}")
    cfg = load_train_config(stage_path, [*extra, *stage_overrides])
    cfgs.append(cfg)
    prev = cfg.run_dir
  names = [os.path.basename(c.run_dir) for c in cfgs]
  if len(set(names)) != len(names):
    raise ConfigError(f"{path}: stages: two stage files share a name ({names}); each stage needs its own run dir")
  return sched, cfgs


def _evaluate(cfg: TrainConfig, model, ev: EvalConfig, out_dir: str) -> float:
  from keye_jax.evaluate import run_eval
  from keye_jax.processing.tokenizer import load_tokenizer
  result = run_eval(model, load_tokenizer(cfg.tokenizer), ev.benchmark, ev.data, out_dir,
                    max_new_tokens=ev.max_new_tokens or None)
  return float(result["accuracy"])


def _initial_model(cfg: TrainConfig):
  """The model stage 1 starts from: its init_from checkpoint, or fresh parameters from its seed."""
  from flax import nnx

  from keye_jax.model import KeyeVL
  if not cfg.init_from:
    return KeyeVL(cfg.model, rngs=nnx.Rngs(cfg.seed))
  return checkpoint_io.load_model(cfg.init_from)[1]


def _finite_or_none(x):
  return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def run_schedule(path: str, overrides=()) -> dict:
  t0 = time.time()
  sched, cfgs = load_schedule(path, overrides)
  if sched.demo_data:
    ensure_demo_data(sched.demo_data)
  os.makedirs(sched.run_dir, exist_ok=True)
  with open(os.path.join(sched.run_dir, checkpoint_io.SCHEDULE), "w") as f:
    json.dump({"config": os.path.abspath(path), "stages": [c.run_dir for c in cfgs]}, f, indent=1)
  ev = sched.eval
  before = None
  if ev.benchmark:
    before = _evaluate(cfgs[0], _initial_model(cfgs[0]), ev, os.path.join(sched.run_dir, "eval_before"))
    print(f"accuracy before training: {before:.3f}", file=sys.stderr, flush=True)
  rows = []
  for cfg in cfgs:
    name = os.path.basename(cfg.run_dir)
    print(f"=== {name}: {cfg.steps} steps, trainable {', '.join(cfg.optimizer.trainable)}, "
          f"context {cfg.data.seq_len} ===", file=sys.stderr, flush=True)
    s0 = time.time()
    result = train(cfg)
    if result.get("preempted"):
      return {**result, "seconds": round(time.time() - t0, 1)}
    records = read_metrics(cfg.run_dir)
    first = records[0]["loss"] if records else None
    last = records[-1]["loss"] if records else result["final_loss"]  # also right for a finished stage
    rows.append((name, result["final_step"], _finite_or_none(first), _finite_or_none(last), time.time() - s0))
  after = None
  if ev.benchmark:
    after = _evaluate(cfgs[-1], checkpoint_io.load_model(cfgs[-1].run_dir)[1], ev,
                      os.path.join(sched.run_dir, "eval_after"))
  seconds = round(time.time() - t0, 1)
  print(_table(rows, before, after), file=sys.stderr, flush=True)
  if ev.benchmark:
    return {"accuracy_before": before, "accuracy_after": after, "seconds": seconds, "run_dir": sched.run_dir}
  return {"run_dir": sched.run_dir, "final_step": rows[-1][1], "final_loss": rows[-1][3], "seconds": seconds}


def _table(rows, before, after) -> str:
  fmt = lambda x: f"{x:>11.4f}" if x is not None else f"{'-':>11}"
  lines = ["", f"{'stage':<10} {'steps':>6} {'first loss':>11} {'final loss':>11} {'seconds':>8}"]
  for name, steps, first, last, secs in rows:
    lines.append(f"{name:<10} {steps:>6} {fmt(first)} {fmt(last)} {secs:>8.1f}")
  if before is not None:
    lines.append(f"accuracy before {100 * before:.1f}%  after {100 * after:.1f}%")
  return "\n".join(lines)
