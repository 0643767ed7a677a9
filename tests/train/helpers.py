"""Small configs and subprocess helpers for the trainer tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_MODEL = os.path.join(REPO, "configs", "model", "tiny.yaml")

# A text-only tiny model (fast) and the tiny Keye-VL (vision tower + projector + decoder).
TEXT_MODEL = {"text": {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                       "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "mrope_section": [2, 3, 3]},
              "vision": None, "attention_impl": "xla"}


def write_config(path, run_dir, *, model=None, **fields) -> str:
  cfg = {"model": model if model is not None else TEXT_MODEL,
         "data": {"seq_len": 64, "num_patches": 32, "batch_size": 4},
         "steps": 8, "loss_chunk": 16, "run_dir": str(run_dir),
         "checkpoint": {"every": 1, "keep": 2},
         "optimizer": {"learning_rate": 3e-3, "warmup_steps": 2}}
  for k, v in fields.items():
    if isinstance(v, dict) and isinstance(cfg.get(k), dict):
      cfg[k] = {**cfg[k], **v}
    else:
      cfg[k] = v
  with open(path, "w") as f:
    yaml.safe_dump(cfg, f)
  return str(path)


def env(devices: int = 1) -> dict:
  e = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return e


def train_process(config: str, *overrides, devices: int = 1, extra_env=None) -> subprocess.Popen:
  code = ("import json, sys; from train.stages import run; "
          "print(json.dumps(run(sys.argv[1], sys.argv[2:])))")
  return subprocess.Popen([sys.executable, "-c", code, config, *overrides], cwd=REPO,
                          env={**env(devices), **(extra_env or {})}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def losses(run_dir) -> dict[int, float]:
  from train.metrics import read_metrics
  return {r["step"]: r["loss"] for r in read_metrics(str(run_dir))}


def run_python(code: str, devices: int = 1, timeout: int = 600) -> dict:
  """Runs `code` in a fresh interpreter with `devices` CPU devices; returns the JSON of its last line."""
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(devices), capture_output=True, text=True,
                       timeout=timeout)
  if out.returncode != 0:
    raise AssertionError(out.stderr[-4000:])
  return json.loads(out.stdout.strip().splitlines()[-1])
