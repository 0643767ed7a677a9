"""rl.slots is the global number of decode slots: each process's rollout engine runs rl.slots / processes
of them on its own devices (train/rl/rollouts.py), and `keye plan` compiles that engine's decode step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from jax.sharding import Mesh

from keye_jax.config import ConfigError
from train.rl.config import RLConfig
from train.rl.rollouts import hosts_mesh, process_mesh, slots_per_process


def test_slots_split_evenly_over_processes():
  assert slots_per_process(256, 1) == 256
  assert slots_per_process(256, 16) == 16     # v5p:4x4x4: 16 hosts of 4 chips, 4 slots per chip either way
  assert slots_per_process(64, 2) == 32


@pytest.mark.parametrize("slots,processes", [(30, 4), (2, 4), (0, 1)])
def test_slots_that_do_not_split_are_one_clear_error(slots, processes):
  with pytest.raises(ValueError, match=rf"^rl\.slots={slots} must be a positive multiple of the {processes} processes"):
    slots_per_process(slots, processes)


def test_config_rejects_no_slots():
  with pytest.raises(ConfigError, match="rl.slots must be positive"):
    dataclasses.replace(RLConfig(), slots=0)


@dataclasses.dataclass(frozen=True)
class _Device:      # what Mesh and hosts_mesh read of a device
  id: int
  process_index: int
  platform: str = "tpu"
  device_kind: str = "fake"


def test_each_process_engine_mesh_is_its_own_devices():
  # 4 processes of 4 chips, trainer mesh fsdp=16: each engine gets its process's 4 chips as fsdp=4.
  devices = np.asarray([_Device(i, i // 4) for i in range(16)]).reshape(1, 16, 1, 1)
  mesh = Mesh(devices, ("data", "fsdp", "tensor", "context"))
  assert hosts_mesh(mesh).devices.shape == (4, 1, 4, 1, 1)
  for p in range(4):
    local = process_mesh(mesh, p)
    assert dict(local.shape) == {"data": 1, "fsdp": 4, "tensor": 1, "context": 1}
    assert {d.process_index for d in local.devices.flat} == {p}
