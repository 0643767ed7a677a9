"""A schedule: the whole recipe as phases run in order, each from the previous phase's checkpoint
(`keye train SCHEDULE.yaml`, `keye rl SCHEDULE.yaml`).

  run_dir: ../../runs/demo            # every run goes in RUN_DIR/<stage file name or phase name>
  demo_data: ../../runs/demo/data     # the demo dataset and tokenizer, written when missing
  init_from: ""                       # the first phase's starting checkpoint (else its config's)
  eval: {benchmark: demo, data: ../../runs/demo/data/test.jsonl, max_new_tokens: 96}
  phases:
    - {name: pretrain, kind: pretrain, stages: [stage1.yaml, stage2.yaml, stage3.yaml, stage4.yaml]}
    - {name: sft, kind: sft, cot: cot.yaml, config: sft.yaml}   # `keye cot` from the current model first
    - {name: rl, kind: rl, config: rl.yaml}
    - {name: align, kind: rl, config: align.yaml}
    - {kind: rft, config: cot.yaml}   # rejection sampling with the current model; trains nothing

Kinds: `pretrain` chains stage YAMLs (`keye train`); `sft` is `keye train` with an SFT config, trained on
the manifest `keye cot` just wrote (its `cot:` config) or an `rft` phase before it wrote: that manifest
replaces the config's source named `cot` (or all its sources when none is named so); `rl` is `keye rl`
(an rl phase on the same prompts as an earlier one keeps only those whose pass rate there was strictly
in (0, 1)); `rft` is `keye cot` in mode rft. Each phase may add `overrides: [key.sub=value, ...]`. A schedule with only
`stages:` is a single pretrain phase (the pre-training schedules).

With `eval`, the benchmark is scored before the first phase and after every phase that trains; the result
is {"accuracy_before", "accuracy_after", "seconds", "run_dir", "categories": {category: accuracy},
"phases": [{"name", "seconds", "scores": {category: accuracy}, "reward"}]}. Without, {"run_dir",
"final_step", "final_loss", "seconds", "phases"}.

Paths in this file resolve against it, command-line ones against the current directory. Command-line
overrides apply to every trained run, except `run_dir=DIR`, which moves the whole schedule. A finished
run is skipped without touching its checkpoints or metrics and a finished evaluation is reused, so a
schedule interrupted anywhere resumes where it stopped. RUN_DIR/schedule.json names the trained run dirs
in order: `keye generate RUN_DIR` reads the last one's latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time

from keye_jax import checkpoint_io
from keye_jax.config import ConfigError, from_dict, parse_override, path_field, read_yaml, resolve_path

KINDS = ("pretrain", "sft", "rl", "rft")
EVAL_SLOTS = 32  # decode slots of the evaluations between phases
TRAINS = ("pretrain", "sft", "rl")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  benchmark: str = ""
  data: str = path_field()
  max_new_tokens: int = 0  # 0: the benchmark's default


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
  kind: str = ""
  name: str = ""                     # reported name and run dir (default <i>_<kind>)
  config: str = path_field()         # sft / rl / rft: the phase's YAML
  stages: tuple[str, ...] = ()       # pretrain: stage YAMLs, relative to the schedule file
  cot: str = path_field()            # sft: a `keye cot` config run first; its manifest is trained on
  overrides: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ConfigError(f"phases: kind={self.kind!r} is not one of {', '.join(KINDS)}")
    if self.kind == "pretrain" and not self.stages:
      raise ConfigError("phases: a pretrain phase needs `stages`")
    if self.kind != "pretrain" and not self.config:
      raise ConfigError(f"phases: a {self.kind} phase needs `config`")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  phases: tuple[PhaseConfig, ...] = ()
  stages: tuple[str, ...] = ()       # shorthand for phases: [{kind: pretrain, name: pretrain, stages: ...}]
  run_dir: str = path_field("runs/schedule")
  demo_data: str = path_field()      # the demo's dataset directory, built when missing (one-command demo)
  init_from: str = path_field()
  eval: EvalConfig = EvalConfig()


def is_schedule(raw: dict) -> bool:
  return "phases" in raw or "stages" in raw


def load_schedule(path: str, overrides=()) -> tuple[ScheduleConfig, list[str]]:
  """(the schedule with its stage paths made absolute, the overrides left for the trained runs)."""
  base = os.path.dirname(os.path.abspath(path))
  try:
    sched = from_dict(ScheduleConfig, read_yaml(path), base_dir=base)
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from None
  phases = list(sched.phases)
  if sched.stages:
    if phases:
      raise ConfigError(f"{path}: give either `stages` or `phases`, not both")
    phases = [PhaseConfig(kind="pretrain", name="pretrain", stages=sched.stages)]
  if not phases:
    raise ConfigError(f"{path}: the schedule lists no phases")
  phases = [dataclasses.replace(p, name=p.name or f"{i}_{p.kind}", stages=tuple(resolve_path(s, base) for s in p.stages))
            for i, p in enumerate(phases)]
  names = [p.name for p in phases]
  if len(set(names)) != len(names):
    raise ConfigError(f"{path}: phases: two phases share the name in {names}; each needs its own run dir")
  rest = []
  for item in overrides:
    key, raw = parse_override(item)
    if key == "run_dir":
      sched = dataclasses.replace(sched, run_dir=resolve_path(raw, None))
    else:
      rest.append(item)
  return dataclasses.replace(sched, phases=tuple(phases), stages=()), rest


def stage_configs(stage_paths, run_dir: str, init_from: str, overrides) -> list:
  """TrainConfigs of chained stage YAMLs: stage i runs in RUN_DIR/<file name>, from stage i-1's run dir."""
  from train.config import load_train_config
  cfgs, prev = [], init_from
  for stage_path in stage_paths:
    name = os.path.splitext(os.path.basename(stage_path))[0]
    extra = [f"run_dir={os.path.join(run_dir, name)}"] + ([f"init_from={prev}"] if prev else [])
    cfgs.append(load_train_config(stage_path, [*extra, *overrides]))
    prev = cfgs[-1].run_dir
  names = [os.path.basename(c.run_dir) for c in cfgs]
  if len(set(names)) != len(names):
    raise ConfigError(f"stages: two stage files share a name ({names}); each stage needs its own run dir")
  return cfgs


def ensure_demo_data(path: str) -> None:
  """The demo dataset and the demo tokenizer (in PATH/tokenizer), each written when missing. A dataset
  written by an earlier version of the demo (another `version` in info.json) is an error: the demo's run
  dirs beside it were trained on it, so both are removed, not mixed with the new questions."""
  from train.data.demo import DATA_VERSION, write_demo_dataset
  info_path = os.path.join(path, "info.json")
  if not os.path.exists(info_path):
    print(f"writing the demo dataset to {path} ...", file=sys.stderr, flush=True)
    write_demo_dataset(path)
  else:
    with open(info_path) as f:
      version = json.load(f).get("version", 1)
    if version != DATA_VERSION:
      raise ConfigError(f"{path}: written by an earlier version of the demo (dataset version {version}, this "
                        f"one writes {DATA_VERSION}); remove it and the run dirs trained on it (e.g. rm -rf "
                        f"{os.path.dirname(path.rstrip(os.sep))}), then run the demo again")
  if not os.path.exists(os.path.join(path, "tokenizer", "tokenizer.json")):
    from keye_jax.processing.tokenizer import build_demo_tokenizer
    build_demo_tokenizer(os.path.join(path, "tokenizer"))


class _Runner:
  """Runs the phases in order; `start` is the checkpoint (run dir) the next phase starts from."""

  def __init__(self, sched: ScheduleConfig, overrides, path: str):
    self.sched, self.overrides, self.path = sched, list(overrides), path
    self.start, self.manifest, self.last_rl, self.last_rl_sources = sched.init_from, "", "", ()
    self.trained: list[str] = []  # run dirs in order, in RUN_DIR/schedule.json

  def done(self, run_dir: str) -> None:
    """`run_dir` trained: the next phase starts from it, and `keye generate RUN_DIR` reads it."""
    self.start = run_dir
    self.trained.append(run_dir)
    with open(os.path.join(self.sched.run_dir, checkpoint_io.SCHEDULE), "w") as f:
      json.dump({"config": os.path.abspath(self.path), "stages": self.trained}, f, indent=1)

  def phase_dir(self, ph: PhaseConfig) -> str:
    return os.path.join(self.sched.run_dir, ph.name)

  def run(self, ph: PhaseConfig) -> dict:
    """Runs one phase; returns {"runs": [(name, final_step, first_loss, last_loss, seconds)], "reward"}."""
    return getattr(self, ph.kind)(ph)

  def pretrain(self, ph: PhaseConfig) -> dict:
    from train.loop import train
    from train.metrics import read_metrics
    cfgs = stage_configs(ph.stages, self.sched.run_dir, self.start, [*ph.overrides, *self.overrides])
    rows = []
    for cfg in cfgs:
      name = os.path.basename(cfg.run_dir)
      print(f"=== {name}: {cfg.steps} steps, trainable {', '.join(cfg.optimizer.trainable)}, "
            f"context {cfg.data.seq_len} ===", file=sys.stderr, flush=True)
      s0 = time.time()
      result = train(cfg)
      if result.get("preempted"):
        return {"preempted": result}
      records = read_metrics(cfg.run_dir)
      first = records[0]["loss"] if records else None
      last = records[-1]["loss"] if records else result["final_loss"]  # also right for a finished stage
      rows.append((name, result["final_step"], _finite(first), _finite(last), time.time() - s0))
      self.done(cfg.run_dir)
    return {"runs": rows, "reward": None}

  def sft(self, ph: PhaseConfig) -> dict:
    from train.config import load_train_config
    from train.loop import train
    from train.metrics import read_metrics
    if ph.cot:
      self.manifest = self._cot(ph.cot, [], os.path.join(self.sched.run_dir, f"{ph.name}_cot"))
    run_dir = self.phase_dir(ph)
    extra = [f"run_dir={run_dir}"] + ([f"init_from={self.start}"] if self.start else [])
    cfg = load_train_config(ph.config, [*ph.overrides, *extra, *self.overrides])
    if self.manifest:
      cfg = _with_manifest(cfg, self.manifest, ph.config)
      self.manifest = ""
    print(f"=== {ph.name}: SFT, {cfg.steps} steps on {', '.join(s.display_name for s in cfg.data.sources)} ===",
          file=sys.stderr, flush=True)
    s0 = time.time()
    result = train(cfg)
    if result.get("preempted"):
      return {"preempted": result}
    records = read_metrics(run_dir)
    self.done(run_dir)
    return {"runs": [(ph.name, result["final_step"], _finite(records[0]["loss"]) if records else None,
                      _finite(records[-1]["loss"]) if records else None, time.time() - s0)], "reward": None}

  def rl(self, ph: PhaseConfig) -> dict:
    from train.rl.config import load_rl_config
    from train.rl.loop import train_rl
    run_dir = self.phase_dir(ph)
    extra = [f"run_dir={run_dir}"] + ([f"init_from={self.start}"] if self.start else [])
    cfg = load_rl_config(ph.config, [*ph.overrides, *extra, *self.overrides])
    sources = tuple(s.path for s in cfg.data.sources)
    if self.last_rl and sources == self.last_rl_sources:
      # A new round on the same prompts keeps those whose pass rate there was strictly in (0, 1); an RL
      # phase on other prompts (alignment after reasoning RL) starts unfiltered.
      cfg = load_rl_config(ph.config, [*ph.overrides, *extra, f"rl.pass_rates_from={self.last_rl}", *self.overrides])
    print(f"=== {ph.name}: RL, {cfg.steps} steps ===", file=sys.stderr, flush=True)
    s0 = time.time()
    result = train_rl(cfg)
    if result.get("preempted"):
      return {"preempted": result}
    self.last_rl, self.last_rl_sources = run_dir, sources
    self.done(run_dir)
    return {"runs": [(ph.name, result["final_step"], None, None, time.time() - s0)],
            "reward": _finite(result.get("reward_after"))}

  def rft(self, ph: PhaseConfig) -> dict:
    self.manifest = self._cot(ph.config, [*ph.overrides, "mode=rft"], self.phase_dir(ph))
    return {"runs": [], "reward": None}

  def _cot(self, config: str, overrides, out: str) -> str:
    from train.cot.config import load_cot_config
    from train.cot.run import run as run_cot
    if not self.start:
      raise ConfigError(f"{config}: chain-of-thought sampling needs a model: put a trained phase or "
                        "`init_from` before it")
    cfg = load_cot_config(config, [*overrides, f"checkpoint={self.start}", f"out={out}"])
    print(f"=== keye cot ({cfg.mode}) from {self.start} ===", file=sys.stderr, flush=True)
    run_cot(cfg)
    manifest = os.path.join(out, "sft.jsonl")
    if not os.path.exists(manifest):
      raise FileNotFoundError(f"{config}: {manifest} was not written (see {out})")
    return manifest


def _with_manifest(cfg, manifest: str, where: str):
  """`cfg` training on `manifest` in place of its source named `cot` (all its sources when none is)."""
  sources = cfg.data.sources
  if any(s.name == "cot" for s in sources):
    sources = tuple(dataclasses.replace(s, path=manifest) if s.name == "cot" else s for s in sources)
  else:
    sources = (dataclasses.replace(sources[0], path=manifest, name="cot", weight=1.0),)
  print(f"{where}: training on {manifest}", file=sys.stderr, flush=True)
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources))


def _finite(x):
  return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _tokenizer_of(sched: ScheduleConfig, phases) -> str:
  """The tokenizer the evaluation uses: the first stage's or phase config's."""
  from train.config import load_train_config
  first = phases[0]
  path = first.stages[0] if first.kind == "pretrain" else first.config
  return load_train_config(path).tokenizer


def _score(ev: EvalConfig, checkpoint: str | None, tokenizer_dir: str, out_dir: str, initial=None) -> dict:
  """{"accuracy", "categories": {category: accuracy}} of the checkpoint (or `initial`, a model)."""
  from keye_jax.evaluate import run_eval
  from keye_jax.processing.tokenizer import load_tokenizer
  tokenizer = load_tokenizer(tokenizer_dir)
  if checkpoint:
    result = run_eval(None, tokenizer, ev.benchmark, ev.data, out_dir, max_new_tokens=ev.max_new_tokens or None,
                      batch_size=EVAL_SLOTS, checkpoint=checkpoint, load_model=lambda: (checkpoint_io.load_model(checkpoint)[1], tokenizer))
  else:
    result = run_eval(initial, tokenizer, ev.benchmark, ev.data, out_dir, max_new_tokens=ev.max_new_tokens or None,
                      batch_size=EVAL_SLOTS)
  with open(os.path.join(out_dir, "results.json")) as f:
    cats = json.load(f).get("categories", {}).get("category", {})
  return {"accuracy": float(result["accuracy"]), "categories": {c: v["accuracy"] for c, v in cats.items()}}


def _initial_model(sched: ScheduleConfig, phases):
  """The model the first phase starts from: `init_from`, its first config's init_from, or fresh parameters."""
  from flax import nnx

  from keye_jax.model import KeyeVL
  from train.config import load_train_config
  first = phases[0]
  cfg = load_train_config(first.stages[0] if first.kind == "pretrain" else first.config)
  src = sched.init_from or cfg.init_from
  if not src:
    return KeyeVL(cfg.model, rngs=nnx.Rngs(cfg.seed))
  return checkpoint_io.load_model(src)[1]


@contextlib.contextmanager
def _compilation_cache(run_dir: str):
  """Phases compile the same programs again (RL and alignment the same rollout engine and step, every
  evaluation the same sampler, stages of one context the same step): JAX's persistent compilation cache in
  <run_dir>/jax_cache serves the repeats (the demo's alignment phase: 49 s -> 18 s for 3 steps). A cache
  the user set (JAX_COMPILATION_CACHE_DIR) is used instead; ours is unset again afterwards."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  if jax.config.jax_compilation_cache_dir:
    yield
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(run_dir), "jax_cache"))
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def run_schedule(path: str, overrides=()) -> dict:
  t0 = time.time()
  sched, rest = load_schedule(path, overrides)
  if sched.demo_data:
    ensure_demo_data(sched.demo_data)
  os.makedirs(sched.run_dir, exist_ok=True)
  with _compilation_cache(sched.run_dir):
    return _run_phases(sched, rest, path, t0)


def _run_phases(sched, rest, path: str, t0: float) -> dict:
  runner = _Runner(sched, rest, path)
  ev = sched.eval
  tokenizer = _tokenizer_of(sched, sched.phases) if ev.benchmark else ""
  before = None
  if ev.benchmark:
    before = _score(ev, sched.init_from or None, tokenizer, os.path.join(sched.run_dir, "eval_before"),
                    initial=None if sched.init_from else _initial_model(sched, sched.phases))
    print(f"accuracy before training: {before['accuracy']:.3f}", file=sys.stderr, flush=True)
  rows, phases = [], []
  for ph in sched.phases:
    s0 = time.time()
    out = runner.run(ph)
    if "preempted" in out:
      return {**out["preempted"], "seconds": round(time.time() - t0, 1)}
    rows += out["runs"]
    if ph.kind not in TRAINS:
      continue
    entry = {"name": ph.name, "seconds": None, "scores": None, "reward": out["reward"]}
    if ev.benchmark:
      score = _score(ev, runner.start, tokenizer, os.path.join(sched.run_dir, f"eval_{ph.name}"))
      entry["scores"] = score["categories"]
      print(f"accuracy after {ph.name}: {score['accuracy']:.3f}  "
            + "  ".join(f"{c} {100 * a:.1f}%" for c, a in score["categories"].items()), file=sys.stderr, flush=True)
      last = score
    entry["seconds"] = round(time.time() - s0, 1)
    phases.append(entry)
  seconds = round(time.time() - t0, 1)
  print(_table(rows, before, phases), file=sys.stderr, flush=True)
  if ev.benchmark:
    return {"accuracy_before": before["accuracy"], "accuracy_after": last["accuracy"], "seconds": seconds,
            "run_dir": sched.run_dir, "categories": last["categories"], "phases": phases}
  final = [r for r in rows if r[1] is not None]
  return {"run_dir": sched.run_dir, "final_step": final[-1][1] if final else 0,
          "final_loss": final[-1][3] if final else None, "seconds": seconds, "phases": phases}


def _table(rows, before, phases) -> str:
  fmt = lambda x: f"{x:>11.4f}" if x is not None else f"{'-':>11}"
  lines = ["", f"{'run':<10} {'steps':>6} {'first loss':>11} {'final loss':>11} {'seconds':>8}"]
  for name, steps, first, last, secs in rows:
    lines.append(f"{name:<10} {steps:>6} {fmt(first)} {fmt(last)} {secs:>8.1f}")
  if before is not None:
    lines.append(f"accuracy before: {100 * before['accuracy']:.1f}%")
    for p in phases:
      scores = "  ".join(f"{c} {100 * a:.1f}%" for c, a in (p["scores"] or {}).items())
      lines.append(f"after {p['name']:<9} {scores}" + (f"  reward {p['reward']:.3f}" if p["reward"] is not None else ""))
  return "\n".join(lines)
