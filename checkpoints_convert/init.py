"""The stage-1 starting point: a SigLIP vision checkpoint + a Qwen3 checkpoint + a fresh projector.

SigLIP comes in transformers' naming (`vision_model.*` from a SiglipModel, or the same names without the
prefix as SiglipVisionModel saves them);
its text tower, logit scale and attention-pooling head are not part of Keye and are dropped.
"""

from __future__ import annotations

import numpy as np

from checkpoints_convert import rules
from checkpoints_convert.convert import dtype_of, read_hf_config, stream_groups, write_converted
from checkpoints_convert.safetensors_io import CheckpointError, SafetensorsReader
from keye_jax import config as config_lib


def _vision_config(siglip: dict) -> config_lib.VisionConfig:
  vc = siglip.get("vision_config", siglip)
  hf = {"vision_config": {k: v for k, v in vc.items() if k != "spatial_merge_size"}, "vocab_size": 1}
  return config_lib.from_hf_config(hf).vision


def init(out_dir: str, *, vision_dir: str, text_dir: str, seed: int = 0, dtype: str | None = None) -> dict:
  from flax import nnx
  from keye_jax.params import get_flat
  from keye_jax.projector import Projector

  text_hf = read_hf_config(text_dir)
  text_cfg = config_lib.from_hf_config(text_hf).text
  cfg = config_lib.KeyeConfig(text=text_cfg, vision=_vision_config(read_hf_config(vision_dir)))
  vision_reader, text_reader = SafetensorsReader(vision_dir), SafetensorsReader(text_dir)

  def source(hf: str):
    if hf.startswith("visual."):
      name = hf[len("visual."):]          # visual.vision_model.X -> vision_model.X (SiglipModel) or X
      for candidate in (name, name[len("vision_model."):]):
        if candidate in vision_reader.files:
          return vision_reader, candidate
      raise CheckpointError(f"{vision_dir}: missing tensor {name}")
    if hf not in text_reader.files:
      raise CheckpointError(f"{text_dir}: missing tensor {hf}")
    return text_reader, hf

  projector = Projector(cfg, rngs=nnx.Rngs(seed))
  fresh = {f"projector/{k}": v for k, v in get_flat(projector).items()}
  plan = rules.expand(cfg)
  hf_config = config_lib.to_hf_config(cfg, {k: v for k, v in text_hf.items() if k != "architectures"})
  hf_config["architectures"] = ["KeyeVL1_5ForConditionalGeneration"]
  return write_converted(out_dir, cfg, hf_config, stream_groups(cfg, plan, source, dtype_of(dtype), fresh),
                         side_files_from=text_dir, dtype=dtype, what="init")
