"""A PyTorch reference of the whole Keye-VL 1.5 forward, assembled from transformers' own blocks:
PaddleOCR-VL's vision tower (the same native-resolution SigLIP with 2D RoPE), a projector written from
the spec (2x2 merge, LayerNorm after the merge, exact GELU), and transformers' Qwen3 decoder layers fed
with M-RoPE angles computed by the spec's formula. Also writes its weights in the released layout."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file

from tests.model.hf_reference import hf_paddle_vision, hf_qwen3


class Projector(torch.nn.Module):

  def __init__(self, dv: int, dt: int):
    super().__init__()
    self.pre_norm = torch.nn.LayerNorm(4 * dv, eps=1e-5)
    self.linear_1 = torch.nn.Linear(4 * dv, 4 * dv)
    self.linear_2 = torch.nn.Linear(4 * dv, dt)

  def forward(self, feats, h: int, w: int):
    x = feats.reshape(h // 2, 2, w // 2, 2, -1).permute(0, 2, 1, 3, 4).reshape((h // 2) * (w // 2), -1)
    return self.linear_2(torch.nn.functional.gelu(self.linear_1(self.pre_norm(x))))


def spec_position_ids(ids, blocks_hw, vision_ids) -> np.ndarray:
  """The walk of model.md §5, written as a plain loop (merged grid units per block)."""
  pos, cur, k, i = [], 0, 0, 0
  while i < len(ids):
    if ids[i] in vision_ids:
      h, w = blocks_hw[k]
      s = cur
      for r in range(h):
        for c in range(w):
          pos.append((s, s + r, s + c))
      cur = s + max(h, w)
      i += h * w
      k += 1
    else:
      pos.append((cur, cur, cur))
      cur += 1
      i += 1
  return np.array(pos, np.int64).T


def mrope(pos_3s, hd, theta, section):
  inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
  axis = np.repeat(np.arange(3), section)
  freqs = torch.stack([torch.tensor(pos_3s[axis[j]], dtype=torch.float64) * inv[j] for j in range(hd // 2)], -1)
  emb = torch.cat([freqs, freqs], -1)
  return emb.cos().float()[None], emb.sin().float()[None]


@torch.no_grad()
def keye_logits(c, vision, projector, text_model, lm_head, ids, pixel_values, image_grid_thw,
                pixel_values_videos, video_grid_thw):
  """(S,) ids with one image and one video -> ((S, V) logits, (3, S) position ids)."""
  ids_np = np.asarray(ids).reshape(-1)
  image_grid_thw, video_grid_thw = np.asarray(image_grid_thw), np.asarray(video_grid_thw)

  def features(pixels, grid_thw):
    out = vision(pixel_values=torch.as_tensor(pixels)[None], grid_thw=torch.as_tensor(grid_thw))
    feats, start, toks = out.last_hidden_state.reshape(-1, c.vision.hidden_size), 0, []
    for t, h, w in grid_thw:
      for _ in range(t):
        toks.append(projector(feats[start:start + h * w], h, w))
        start += h * w
    return torch.cat(toks)

  emb = text_model.embed_tokens(torch.as_tensor(ids_np))[None].clone()
  emb[0, ids_np == c.image_token_id] = features(pixel_values, image_grid_thw)
  emb[0, ids_np == c.video_token_id] = features(pixel_values_videos, video_grid_thw)
  blocks = []  # merged grids in order of occurrence (here: the image, then the video frames)
  for grid in (image_grid_thw, video_grid_thw):
    for t, h, w in grid:
      blocks += [(h // 2, w // 2)] * t
  pos = spec_position_ids(list(ids_np), blocks, {c.image_token_id, c.video_token_id})
  cos, sin = mrope(pos, c.text.head_dim, c.text.rope_theta, c.text.mrope_section)
  s = len(ids_np)
  causal = torch.full((s, s), float("-inf")).triu(1)[None, None]
  h = emb
  for layer in text_model.layers:
    h = layer(h, attention_mask=causal, position_embeddings=(cos, sin))
    h = h[0] if isinstance(h, tuple) else h
  return lm_head(text_model.norm(h))[0].numpy(), pos


class KeyeReference:

  def __init__(self, cfg, seed: int = 0):
    self.cfg = cfg
    self.vision = hf_paddle_vision(cfg.vision, seed)
    torch.manual_seed(seed + 1)
    self.projector = Projector(cfg.vision.hidden_size, cfg.text.hidden_size).eval()
    with torch.no_grad():
      for p in self.projector.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    self.text = hf_qwen3(cfg.text, seed + 2)

  def logits(self, ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
    return keye_logits(self.cfg, self.vision, self.projector, self.text.model, self.text.lm_head, ids,
                       pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

  def save_released(self, out_dir: str, hf_config: dict, spelling: str = "released") -> dict[str, np.ndarray]:
    """Released names (or the transformers-PR spelling), plus the unused release tensors."""
    t = {}
    for k, v in self.vision.state_dict().items():
      t["visual.vision_model." + k.removeprefix("vision_model.")] = v.numpy()
    for k, v in self.projector.state_dict().items():
      t["mlp_AR." + k] = v.numpy()
    for k, v in self.text.state_dict().items():
      t[k] = v.numpy()
    rng = np.random.default_rng(9)
    dv = self.cfg.vision.hidden_size
    t["visual.vision_model.embeddings.packing_position_embedding.weight"] = rng.standard_normal((32, dv)).astype(np.float32)
    t["visual.vision_model.head.probe"] = rng.standard_normal((1, 1, dv)).astype(np.float32)
    t["visual.vision_model.head.mlp.fc1.weight"] = rng.standard_normal((8, dv)).astype(np.float32)
    if spelling == "pr":
      pr = {"visual.": "model.visual.", "mlp_AR.": "model.mm_projector.", "model.": "model.language_model."}
      t = {next(pr[p] + k[len(p):] for p in pr if k.startswith(p)) if not k.startswith("lm_head") else k: v
           for k, v in t.items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(t, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_config, f)
    with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
      json.dump({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "patch_size": 14}, f)
    return t
