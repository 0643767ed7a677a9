"""Multi-process (multi-host) initialisation from the config or the environment."""

from __future__ import annotations

import logging
import os

import jax

from train.config import DistributedConfig

log = logging.getLogger("train")


def initialize(cfg: DistributedConfig) -> None:
  """Calls jax.distributed.initialize once, when the config or KEYE_* environment asks for several
  processes; `num_processes: -1` lets JAX detect the cluster itself (TPU pods, SLURM)."""
  if jax.distributed.is_initialized():
    return
  address = cfg.coordinator_address or os.environ.get("KEYE_COORDINATOR", "")
  num = cfg.num_processes or int(os.environ.get("KEYE_NUM_PROCESSES", "0"))
  pid = cfg.process_id if cfg.process_id >= 0 else int(os.environ.get("KEYE_PROCESS_ID", "-1"))
  if num == -1:
    jax.distributed.initialize()
  elif num > 1:
    if not address or pid < 0:
      raise ValueError("multi-process training needs distributed.coordinator_address and distributed.process_id "
                       "(or KEYE_COORDINATOR / KEYE_PROCESS_ID)")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # multi-process CPU runs (tests)
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
  else:
    return
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
           jax.local_device_count(), jax.device_count())
