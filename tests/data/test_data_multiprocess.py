"""Two local processes (jax.distributed on 127.0.0.1, gloo CPU collectives) together see every example
of an epoch exactly once, and assemble one global batch sharded over both."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.data.fakes import fake_encode, write_manifest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.timeout(300)
def test_two_processes_share_an_epoch_exactly_once(tmp_path):
  manifest = write_manifest(str(tmp_path), 30)
  port = free_port()
  env = {**os.environ, "PYTHONPATH": ROOT}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.data.two_process_worker", str(port), str(i), manifest,
                             str(tmp_path / f"out{i}.json")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
  logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  outs = [json.load(open(tmp_path / f"out{i}.json")) for i in range(2)]
  assert all(o["process_count"] == 2 for o in outs)

  with open(manifest) as f:
    records = [json.loads(line) for line in f]
  want = sorted(fake_encode(r["messages"], None, base_dir=str(tmp_path))["input_ids"].tolist() for r in records)
  seen = [list(s) for o in outs for s in o["epoch"]]
  assert sorted(seen) == want  # every example once, none twice
  assert not {tuple(s) for s in outs[0]["epoch"]} & {tuple(s) for s in outs[1]["epoch"]}

  # The global batch is both processes' local batches: shape (4, S) and the sums add up.
  assert outs[0]["global_shape"] == [4, 256]
  assert outs[0]["global_sum"] == outs[1]["global_sum"] == outs[0]["local_sum"] + outs[1]["local_sum"]
  assert outs[0]["global_pos_sum"] == outs[0]["local_pos_sum"] + outs[1]["local_pos_sum"]
