"""Keye-VL 1.5: vision tower -> projector -> scatter into text embeddings -> Qwen3 decoder.

Batch (fixed shapes; see keye_jax/processing/vision_layout.py for the vision metadata):
  input_ids (B, S) int32, segment_ids (B, S) int32 (0 = padding), position_ids (3, B, S) int32,
  pixel_values (B, P, C*p*p) float32, patch_segment_ids (B, P), patch_pos (B, P, 4),
  merge_index (B, P/4, 4), merge_valid (B, P/4).
  vision_features (B, P, Dv) optional: the vision tower's output for those patches, computed earlier (the RL
  rollout's encodes, reused when the tower is frozen); when present the tower is not run and the features
  go straight to the projector (pixel_values, patch_segment_ids and patch_pos are then not read).
The k-th real merged vision token of a row replaces the embedding of the row's k-th
`<|image_pad|>`/`<|video_pad|>` token that is not a training target (loss_mask, when the batch has one).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keye_jax.config import KeyeConfig
from keye_jax.decoder import Decoder

VISION_KEYS = ("pixel_values", "patch_segment_ids", "patch_pos", "merge_index", "merge_valid")


class KeyeVL(nnx.Module):

  def __init__(self, cfg: KeyeConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.decoder = Decoder(cfg, rngs=rngs)
    if cfg.vision is not None:
      from keye_jax.projector import Projector
      from keye_jax.vision import VisionTower
      self.vision = VisionTower(cfg, rngs=rngs)
      self.projector = Projector(cfg, rngs=rngs)
    else:
      self.vision = None
      self.projector = None

  def embed(self, batch) -> jax.Array:
    """Text embeddings with vision features scattered in: (B, S, Dt)."""
    ids = batch["input_ids"]
    x = self.decoder.embed(ids)
    if self.vision is None or ("pixel_values" not in batch and "vision_features" not in batch):
      return x
    if "vision_features" in batch:
      feats = batch["vision_features"]                                                         # (B, P, Dv)
    else:
      feats = self.vision(batch["pixel_values"], batch["patch_segment_ids"], batch["patch_pos"])  # (B, P, Dv)
    tokens = self.projector(feats, batch["merge_index"])                                        # (B, T, Dt)
    is_vision = self.vision_token_mask(ids)
    if "loss_mask" in batch:
      # A trained-on token is never a vision slot (media in an assistant turn is refused as a target): a pad
      # id there is one the model sampled (an RL response), an ordinary token, as the sampler embedded it.
      is_vision &= ~batch["loss_mask"].astype(bool)
    return scatter_vision(x, tokens, is_vision)

  def vision_token_mask(self, ids):
    return (ids == self.cfg.image_token_id) | (ids == self.cfg.video_token_id)

  def hidden_states(self, batch) -> jax.Array:
    return self.decoder.hidden_states(self.embed(batch), batch["position_ids"], batch["segment_ids"])

  def __call__(self, batch) -> jax.Array:
    """Logits (B, S, V)."""
    return self.decoder.logits(self.hidden_states(batch))


def scatter_vision(x_bsd, tokens_btd, is_vision_bs):
  """Row-wise: the k-th True position of `is_vision_bs` takes tokens[k]. Extra tokens are ignored; a
  pad position beyond the available tokens would read a clamped row, so counts are checked on the host
  (`check_vision_counts`) before the batch reaches the device."""
  k = jnp.cumsum(is_vision_bs, axis=1) - 1                                   # (B, S)
  k = jnp.clip(k, 0, tokens_btd.shape[1] - 1)
  gathered = jnp.take_along_axis(tokens_btd, k[..., None], axis=1)            # (B, S, D)
  return jnp.where(is_vision_bs[..., None], gathered.astype(x_bsd.dtype), x_bsd)


def check_vision_counts(batch, cfg: KeyeConfig) -> None:
  """Host-side check that each row has as many vision pad tokens as real merged vision tokens."""
  ids = np.asarray(batch["input_ids"])
  n_pad = ((ids == cfg.image_token_id) | (ids == cfg.video_token_id)).sum(axis=1)
  n_tok = (np.asarray(batch["merge_valid"]).sum(axis=1) if "merge_valid" in batch
           else np.zeros(ids.shape[0], np.int64))
  bad = np.nonzero(n_pad != n_tok)[0]
  if bad.size:
    r = int(bad[0])
    raise ValueError(f"row {r}: {int(n_pad[r])} image/video pad tokens in the text but {int(n_tok[r])} "
                     f"vision tokens from the pixels")
