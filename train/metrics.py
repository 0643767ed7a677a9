"""Progress and metrics: analytic FLOPs and MFU, console lines, RUN_DIR/metrics.jsonl, TensorBoard events.

MFU is reported only where the peak is known: a TPU (its published bf16 peak) or a configured
`peak_tflops`. On a CPU there is no trustworthy peak (a matmul timed during training shares the cores with
the data workers and other processes), so runs there report none; benchmarks/bench_train.py measures it
separately. FLOPs count the real (non-padding) tokens and patches of each step.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from keye_jax.config import KeyeConfig

# Peak dense bf16 TFLOP/s per chip.
TPU_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5 lite": 197.0, "v5p": 459.0, "v5": 459.0, "v6e": 918.0,
                   "v6 lite": 918.0}


def text_flops_per_step(cfg: KeyeConfig, batch: int, seq_len: int, causal_len: float | None = None) -> float:
  """Training FLOPs (forward + backward = 3x forward) of the decoder and lm_head for `batch` rows of
  `seq_len` tokens; attention over `causal_len` keys per query on average (default seq_len/2)."""
  t = cfg.text
  d, hd = t.hidden_size, t.head_dim
  per_layer = 2 * d * (t.num_heads * hd + 2 * t.num_kv_heads * hd) + 2 * t.num_heads * hd * d \
      + 2 * 3 * d * t.intermediate_size
  attn = 2 * 2 * t.num_heads * hd * (seq_len / 2 if causal_len is None else causal_len)
  tokens = batch * seq_len
  return 3.0 * tokens * (t.num_layers * (per_layer + attn) + 2 * d * t.vocab_size)


def vision_flops_per_step(cfg: KeyeConfig, batch: int, num_patches: int, block_len: float = 1024.0) -> float:
  """Training FLOPs of the vision tower and projector for `batch` rows of `num_patches` patches, attention
  over blocks of `block_len` patches (a ~450x450 image)."""
  v = cfg.vision
  if v is None:
    return 0.0
  d = v.hidden_size
  patch_in = v.num_channels * v.patch_size ** 2
  per_layer = 2 * 4 * d * d + 2 * 2 * d * v.intermediate_size + 2 * 2 * d * block_len
  proj = (2 * 4 * d * 4 * d + 2 * 4 * d * cfg.text.hidden_size) / 4  # per patch (4 patches -> 1 token)
  return 3.0 * batch * num_patches * (2 * patch_in * d + v.num_layers * per_layer + proj)


def flops_per_step(cfg: KeyeConfig, batch: int, seq_len: int, num_patches: int) -> float:
  return text_flops_per_step(cfg, batch, seq_len) + vision_flops_per_step(cfg, batch, num_patches)


def peak_flops_per_device(device, configured_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: configured, else the TPU table; None when unknown (CPU, GPU)."""
  if configured_tflops > 0:
    return configured_tflops * 1e12
  if getattr(device, "platform", "") != "tpu":
    return None
  kind = getattr(device, "device_kind", "").lower()
  for name, tf in sorted(TPU_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
    if name in kind:
      return tf * 1e12
  return None


def truncate_metrics(path: str, step: int) -> int:
  """Drops the records after `step` from a metrics.jsonl (written after the checkpoint a run resumes
  from, e.g. before a kill -9); returns how many were dropped."""
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        keep.append(line)
    except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the kill
      pass
  if len(keep) != len(lines):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)
  return len(lines) - len(keep)


class MetricsWriter:
  """Writes one JSON object per logged step and TensorBoard scalars (primary process only), and prints
  a progress line to stderr. `resume_step`: records after it are dropped first (they are retrained)."""

  def __init__(self, run_dir: str, total_steps: int, primary: bool = True, resume_step: int = 0):
    self.primary, self.total = primary, total_steps
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._tb = None
    self._start, self._start_step = time.time(), None
    if primary:
      os.makedirs(run_dir, exist_ok=True)
      from tensorboard.summary.writer.event_file_writer import EventFileWriter
      truncate_metrics(self.path, resume_step)
      self._tb = EventFileWriter(os.path.join(run_dir, "tensorboard"))
      self._file = open(self.path, "a")

  def write(self, record: dict):
    record = {k: v for k, v in record.items() if v is not None}
    step = int(record["step"])
    if self._start_step is None:
      self._start, self._start_step = time.time(), step - 1
    if not self.primary:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    self._scalars(step, {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"})
    done = step - self._start_step
    eta = (time.time() - self._start) / max(done, 1) * (self.total - step)
    mfu = f"  mfu {100 * record['mfu']:.1f}%" if record.get("mfu") else ""
    print(f"step {step}/{self.total}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
          f"{record['tokens_per_second']:.0f} tok/s{mfu}  eta {_fmt(eta)}", file=sys.stderr, flush=True)

  def _scalars(self, step: int, values: dict):
    from tensorboard.compat.proto import event_pb2, summary_pb2
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in values.items() if np.isfinite(v)])
    self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

  def close(self):
    if self.primary:
      self._tb.flush()
      self._tb.close()
      self._file.close()


def _fmt(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def read_metrics(run_dir: str) -> list[dict]:
  """The records of RUN_DIR/metrics.jsonl; after a resume, the latest record of each step."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  by_step = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        by_step[r["step"]] = r
  return [by_step[s] for s in sorted(by_step)]
