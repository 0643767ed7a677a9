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
