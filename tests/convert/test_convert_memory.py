"""Peak memory of `keye convert to-orbax` stays under 2x the largest tensor + 1 GiB (streamed per group)."""

import json
import subprocess
import sys

import pytest


def _run(tmp_path, vocab):
  r = subprocess.run([sys.executable, "-c",
                      f"from tests.convert.convert_memory import main; main({str(tmp_path)!r}, vocab={vocab})"],
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  m = json.loads(r.stdout.strip().splitlines()[-1])
  assert m["peak_rss_bytes"] < 2 * m["largest_tensor_bytes"] + (1 << 30), m
  return m


def test_peak_memory_small(tmp_path):
  _run(tmp_path, vocab=16384)       # 256 MiB tensors, ~0.6 GB checkpoint


@pytest.mark.slow
def test_peak_memory_multi_gb(tmp_path):
  m = _run(tmp_path, vocab=65536)   # 1 GiB tensors, ~2.5 GB checkpoint
  assert m["checkpoint_bytes"] > 2 << 30
