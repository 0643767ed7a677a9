"""Tiny random transformers models (the PyTorch references) and their weights in our canonical view."""

from __future__ import annotations

import numpy as np
import torch

from checkpoints_convert import rules
from keye_jax.config import KeyeConfig, TextConfig


def tiny_text_config(**kw) -> TextConfig:
  base = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, rope_theta=10000.0, mrope_section=(2, 3, 3))
  base.update(kw)
  return TextConfig(**base)


def hf_qwen3(t: TextConfig, seed: int = 0):
  import transformers
  torch.manual_seed(seed)
  hf_cfg = transformers.Qwen3Config(
      vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
      head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
      tie_word_embeddings=False, attn_implementation="eager", max_position_embeddings=512)
  model = transformers.Qwen3ForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # random norm weights so the test sees them
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  return model


def hf_state_to_flat(state_dict, cfg: KeyeConfig) -> dict[str, np.ndarray]:
  sd = {rules.canonical_name(k): v.detach().float().numpy() for k, v in state_dict.items()}
  return {ours: rules.to_ours(sd[hf], tr) for hf, ours, tr, _ in rules.expand(cfg)}


# --------------------------------------------------------------------------------------------------
# The vision tower. transformers' SiglipVisionModel has the released tensor names (without the
# `visual.vision_model.` prefix); PaddleOCR-VL's vision tower (PaddleOCRVisionModel) is the same
# native-resolution SigLIP with 2D RoPE, block-diagonal attention and a bilinearly resized position
# table, under the same names. Neither has Keye 1.5's projector (PaddleOCR normalises before the 2x2
# merge, like Keye 1.0).


def tiny_vision_config(**kw):
  from keye_jax.config import VisionConfig
  base = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, image_size=112, patch_size=14)
  base.update(kw)
  return VisionConfig(**base)


def _randomize_norms(model, seed: int):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():  # LayerNorms start at (1, 0); move them so the test sees them
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
  return model


def hf_siglip_vision(v, seed: int = 0):
  import transformers
  torch.manual_seed(seed)
  hf_cfg = transformers.SiglipVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
      num_attention_heads=v.num_heads, num_channels=v.num_channels, image_size=v.image_size,
      patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps,
      vision_use_head=False, attn_implementation="eager")
  return _randomize_norms(transformers.SiglipVisionModel(hf_cfg).eval(), seed)


def hf_paddle_vision(v, seed: int = 0):
  from transformers.models.paddleocr_vl.configuration_paddleocr_vl import PaddleOCRVisionConfig
  from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionModel
  torch.manual_seed(seed)
  hf_cfg = PaddleOCRVisionConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
      num_attention_heads=v.num_heads, num_channels=v.num_channels, image_size=v.image_size,
      patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps,
      spatial_merge_size=v.spatial_merge_size, rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta},
      attn_implementation="eager")
  model = PaddleOCRVisionModel(hf_cfg).eval()
  with torch.no_grad():  # the default init zeroes some tensors; fill everything so the test sees it
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * (0.1 if "norm" in name or name.endswith("bias") else 0.05))
      if "norm" in name and name.endswith("weight"):
        p.add_(1.0)
  return model


def hf_vision_to_flat(state_dict, cfg: KeyeConfig) -> dict[str, np.ndarray]:
  """SiglipVisionModel / PaddleOCRVisionModel tensors (with or without the `vision_model.` prefix) -> our
  `vision/...` paths."""
  sd = {"visual.vision_model." + k.removeprefix("vision_model."): v.detach().float().numpy()
        for k, v in state_dict.items()}
  return {ours: rules.to_ours(sd[hf], tr) for hf, ours, tr, _ in rules.expand(cfg) if ours.startswith("vision/")}
