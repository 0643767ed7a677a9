"""A schedule: several stage YAMLs run in order, each starting from the previous stage's checkpoint,
optionally with the demo dataset built first and a benchmark scored before and after.

  stages: [stage1.yaml, stage2.yaml, stage3.yaml, stage4.yaml]   # relative to this file
  run_dir: runs/demo                 # stage i runs in RUN_DIR/<stage file name>
  demo_data: runs/demo/data          # written with train.data.demo (and the demo tokenizer) if missing
  eval: {benchmark: demo, data: runs/demo/data/test.jsonl}

Command-line overrides apply to every stage. A stage already finished (its run dir holds the final
step) is skipped, so a schedule interrupted anywhere resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from keye_jax.config import ConfigError, _read_yaml, from_dict
from train.config import TrainConfig, load_train_config


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  benchmark: str = ""
  data: str = ""
  max_new_tokens: int = 0  # 0: the benchmark's default


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  stages: tuple[str, ...] = ()
  run_dir: str = "runs/schedule"
  demo_data: str = ""
  eval: EvalConfig = EvalConfig()


def _stage_configs(path: str, sched: ScheduleConfig, overrides) -> list[TrainConfig]:
  base = os.path.dirname(os.path.abspath(path))
  cfgs, prev = [], None
  for rel in sched.stages:
    stage_path = rel if os.path.isabs(rel) else os.path.join(base, rel)
    name = os.path.splitext(os.path.basename(stage_path))[0]
    extra = [f"run_dir={os.path.join(sched.run_dir, name)}"]
    if prev is not None:
      extra.append(f"init_from={prev}")
    cfg = load_train_config(stage_path, [*extra, *overrides])
    cfgs.append(cfg)
    prev = cfg.run_dir
  return cfgs


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
  from train.merge import is_run_dir, load_run_model
  if not cfg.init_from:
    return KeyeVL(cfg.model, rngs=nnx.Rngs(cfg.seed))
  if is_run_dir(cfg.init_from):
    return load_run_model(cfg.init_from)[1]
  from checkpoints_convert import load_model
  return load_model(cfg.init_from)[1]


def run_schedule(path: str, overrides=()) -> dict:
  t0 = time.time()
  try:
    sched = from_dict(ScheduleConfig, _read_yaml(path), base_dir=os.path.dirname(os.path.abspath(path)))
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from e
  if sched.demo_data and not os.path.exists(os.path.join(sched.demo_data, "info.json")):
    from train.data.demo import write_demo_dataset
    print(f"writing the demo dataset to {sched.demo_data} ...", file=sys.stderr, flush=True)
    write_demo_dataset(sched.demo_data)
  if sched.demo_data and not os.path.exists(os.path.join(sched.demo_data, "tokenizer", "tokenizer.json")):
    from keye_jax.processing.tokenizer import build_demo_tokenizer
    build_demo_tokenizer(os.path.join(sched.demo_data, "tokenizer"))
  cfgs = _stage_configs(path, sched, overrides)
  ev = sched.eval
  before = None
  if ev.benchmark:
    before = _evaluate(cfgs[0], _initial_model(cfgs[0]), ev, os.path.join(sched.run_dir, "eval_before"))
    print(f"accuracy before training: {before:.3f}", file=sys.stderr, flush=True)
  from train.loop import train
  from train.metrics import read_metrics
  rows = []
  for cfg in cfgs:
    name = os.path.basename(cfg.run_dir)
    print(f"=== {name}: {cfg.steps} steps, trainable {', '.join(cfg.optimizer.trainable)}, "
          f"context {cfg.data.seq_len} ===", file=sys.stderr, flush=True)
    s0 = time.time()
    result = train(cfg)
    records = read_metrics(cfg.run_dir)
    first = records[0]["loss"] if records else float("nan")
    last = records[-1]["loss"] if records else result["final_loss"]  # also right for a resumed, finished stage
    rows.append((name, result["final_step"], first, last, time.time() - s0))
  after = None
  if ev.benchmark:
    from train.merge import load_run_model
    after = _evaluate(cfgs[-1], load_run_model(cfgs[-1].run_dir)[1], ev, os.path.join(sched.run_dir, "eval_after"))
  seconds = time.time() - t0
  print(_table(rows, before, after), file=sys.stderr, flush=True)
  out = {"run_dir": os.path.abspath(sched.run_dir), "final_step": rows[-1][1], "final_loss": rows[-1][3],
         "seconds": round(seconds, 1)}
  if ev.benchmark:
    out = {"accuracy_before": before, "accuracy_after": after, "seconds": round(seconds, 1),
           "run_dir": os.path.abspath(sched.run_dir)}
  return out


def _table(rows, before, after) -> str:
  lines = ["", f"{'stage':<10} {'steps':>6} {'first loss':>11} {'final loss':>11} {'seconds':>8}"]
  for name, steps, first, last, secs in rows:
    lines.append(f"{name:<10} {steps:>6} {first:>11.4f} {last:>11.4f} {secs:>8.1f}")
  if before is not None:
    lines.append(f"accuracy before {100 * before:.1f}%  after {100 * after:.1f}%")
  return "\n".join(lines)
