"""One of two local processes (see test_data_multiprocess.py): reads its shard of an epoch, then builds
global arrays of one batch over a 4-device mesh spanning both processes.

usage: python -m tests.data.two_process_worker PORT PROCESS_ID MANIFEST OUT_JSON"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from tests.data.fakes import FakeTokenizer, fake_encode, segments  # noqa: E402
from train.data.config import DataConfig, SourceConfig  # noqa: E402
from train.data.pipeline import make_iterator  # noqa: E402


def main(port, pid, manifest, out):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=int(pid))
  cfg = DataConfig(sources=(SourceConfig(path=manifest),), seq_len=256, num_patches=128, batch_size=4,
                   num_epochs=1)
  epoch = [s[1] for b in make_iterator(cfg, FakeTokenizer(), encode=fake_encode) for s in segments(b)]
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
  local = next(make_iterator(cfg, FakeTokenizer(), encode=fake_encode, process_index=jax.process_index(),
                             process_count=jax.process_count()))
  batch = next(make_iterator(cfg, FakeTokenizer(), mesh, encode=fake_encode))
  total = jax.jit(lambda x: x.astype(np.int64).sum())(batch["input_ids"])
  pos_total = jax.jit(lambda x: x.astype(np.int64).sum())(batch["position_ids"])
  with open(out, "w") as f:
    json.dump({"epoch": epoch, "global_shape": list(batch["input_ids"].shape),
               "global_sum": int(total), "local_sum": int(local["input_ids"].astype(np.int64).sum()),
               "global_pos_sum": int(pos_total),
               "local_pos_sum": int(local["position_ids"].astype(np.int64).sum()),
               "process_count": jax.process_count()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
