"""The vision tower and projector against transformers (SigLIP, PaddleOCR-VL's Keye-derived vision tower)
and against small hand-written computations of the spec (model.md §2-3)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from keye_jax import rope
from keye_jax.config import KeyeConfig
from keye_jax.model import KeyeVL, check_vision_counts
from keye_jax.params import get_flat, set_flat
from keye_jax.processing.vision_layout import split_grid_thw, vision_layout
from keye_jax.projector import Projector
from keye_jax.vision import VisionTower, interpolated_positions
from tests.model.hf_reference import (hf_paddle_vision, hf_siglip_vision, hf_vision_to_flat, tiny_text_config,
                                      tiny_vision_config)

V = tiny_vision_config()  # Dv 64, 2 layers, 2 heads (hd 32), MLP 128, image 112 -> G = 8
G, P_SIZE = V.grid_size, V.patch_size
K = V.num_channels * P_SIZE * P_SIZE


def _cfg(scan=True, **kw):
  return KeyeConfig(text=tiny_text_config(), vision=V, scan_layers=scan, attention_impl="xla", **kw)


def _tower(flat=None, scan=True):
  tower = VisionTower(_cfg(scan), rngs=nnx.Rngs(0))
  if flat is not None:
    set_flat(tower, {k.removeprefix("vision/"): a for k, a in flat.items()})
  return tower


def _patches(rng, h, w):
  """Random pixels of an (h, w)-patch block: (h*w, C, p, p), row-major over the grid."""
  return rng.standard_normal((h * w, V.num_channels, P_SIZE, P_SIZE)).astype(np.float32)


def _image_of(patches_n3pp, h, w):
  """Patches back to an image (C, h*p, w*p), for transformers' conv embedding."""
  x = patches_n3pp.reshape(h, w, V.num_channels, P_SIZE, P_SIZE)
  return x.transpose(2, 0, 3, 1, 4).reshape(V.num_channels, h * P_SIZE, w * P_SIZE)


def _packed(blocks, num_patches, rng=None):
  """Blocks [(patches, h, w)] -> one batch row of (pixel_values, patch_segment_ids, patch_pos), with
  random (rather than zero) pixels in the padding when `rng` is given."""
  lay = vision_layout([(h, w) for _, h, w in blocks], num_patches)
  pix = np.zeros((num_patches, K), np.float32) if rng is None else (
      rng.standard_normal((num_patches, K)).astype(np.float32) * 100)
  flat = np.concatenate([p.reshape(len(p), K) for p, _, _ in blocks])
  pix[:len(flat)] = flat
  return pix[None], lay["patch_segment_ids"][None], lay["patch_pos"][None], lay


@pytest.fixture(scope="module")
def siglip():
  hf = hf_siglip_vision(V)
  return hf, hf_vision_to_flat(hf.state_dict(), _cfg())


# --------------------------------------------------------------------------------------------------
# One encoder layer.


def test_encoder_layer_matches_siglip_layer_and_is_block_diagonal(siglip):
  hf, flat = siglip
  layer = _tower(flat, scan=False).layers.layers[0]
  hf_layer = hf.encoder.layers[0]
  rng = np.random.default_rng(0)
  hd = V.head_dim

  @nnx.jit
  def run(layer, x, seg):
    no_rope = dict(cos=jnp.ones(x.shape[:2] + (hd,)), sin=jnp.zeros(x.shape[:2] + (hd,)))  # identity rotation
    return layer(x, None, segment_ids=seg, **no_rope)[0]

  def ours(x_nd, seg_n):
    return np.asarray(run(layer, jnp.asarray(x_nd[None]), jnp.asarray(seg_n[None], jnp.int32)))[0]

  def theirs(x_nd):
    with torch.no_grad():
      return hf_layer(torch.tensor(x_nd[None]), attention_mask=None)[0].numpy()

  a, b = rng.standard_normal((12, V.hidden_size)), rng.standard_normal((20, V.hidden_size))
  a, b = a.astype(np.float32), b.astype(np.float32)
  err = np.abs(ours(a, np.ones(12)) - theirs(a)).max()
  assert err <= 2e-5, err
  # Two blocks and three padding rows of garbage in one sequence: each block as if alone.
  pad = rng.standard_normal((3, V.hidden_size)).astype(np.float32) * 1e3
  got = ours(np.concatenate([a, b, pad]), np.array([1] * 12 + [2] * 20 + [0] * 3))
  assert np.abs(got[:12] - theirs(a)).max() <= 2e-5
  assert np.abs(got[12:32] - theirs(b)).max() <= 2e-5


# --------------------------------------------------------------------------------------------------
# Patch embedding and the resized position table.


def _torch_bilinear(table_nd, h, w):
  t = torch.tensor(table_nd).reshape(1, G, G, -1).permute(0, 3, 1, 2)
  out = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
  return out.permute(0, 2, 3, 1).reshape(h * w, -1).numpy()


def _grid_pos(h, w):
  r, c = np.divmod(np.arange(h * w), w)
  return np.stack([r, c, np.full_like(r, h), np.full_like(r, w)], -1)[None].astype(np.int32)


@pytest.mark.parametrize("hw", [(8, 8), (4, 6), (10, 14), (16, 2), (3, 11), (1, 1)])
def test_position_interpolation_is_bilinear_without_antialias(hw):
  """Up- and downsampling, per axis and mixed, against torch and jax resizes of the whole table."""
  h, w = hw
  table = np.random.default_rng(1).standard_normal((G * G, 16)).astype(np.float32)
  got = np.asarray(interpolated_positions(jnp.asarray(table), jnp.asarray(_grid_pos(h, w)), G))[0]
  np.testing.assert_allclose(got, _torch_bilinear(table, h, w), atol=1e-5)
  want_jax = jax.image.resize(jnp.asarray(table).reshape(G, G, -1), (h, w, 16), "bilinear", antialias=False)
  np.testing.assert_allclose(got, np.asarray(want_jax).reshape(h * w, -1), atol=1e-5)
  if h < G and w < G and h * w > 1:  # the check can tell: jax's default antialias changes downsampling
    alias = jax.image.resize(jnp.asarray(table).reshape(G, G, -1), (h, w, 16), "bilinear")
    assert np.abs(np.asarray(alias).reshape(h * w, -1) - got).max() > 1e-2


def test_patch_embedding_and_positions_match_siglip_embeddings(siglip):
  """On the native G x G grid, transformers' SiglipVisionEmbeddings uses the table as is: exact parity.
  For other grids its `interpolate_pos_encoding=True` resizes the table *bicubically*, which is not the
  spec (Keye resizes bilinearly, align_corners=False, no antialias); there we compare with its own patch
  conv plus F.interpolate(bilinear) of its table."""
  hf, flat = siglip
  tower = _tower(flat)
  rng = np.random.default_rng(2)
  for h, w in [(G, G), (6, 10), (12, 4)]:
    patches = _patches(rng, h, w)
    pix, seg, pos, _ = _packed([(patches, h, w)], h * w)
    got = np.asarray(nnx.jit(lambda t, *a: t.embed(*a))(tower, pix, seg, pos))[0]
    image = torch.tensor(_image_of(patches, h, w)[None])
    with torch.no_grad():
      if (h, w) == (G, G):
        want = hf.embeddings(image, interpolate_pos_encoding=True)[0].numpy()
      else:
        conv = hf.embeddings.patch_embedding(image).flatten(2).transpose(1, 2)[0].numpy()
        want = conv + _torch_bilinear(hf.embeddings.position_embedding.weight.numpy(), h, w)
    err = np.abs(got - want).max()
    assert err <= 1e-5, ((h, w), err)


# --------------------------------------------------------------------------------------------------
# 2D RoPE.


def test_vision_rope_angles_for_a_10x14_image():
  hd, theta = V.head_dim, V.rope_theta
  lay = vision_layout([(10, 14)], 140)
  pos = lay["patch_pos"]
  cos, sin = rope.vision_cos_sin(jnp.asarray(pos[:, 0]), jnp.asarray(pos[:, 1]), hd, theta)
  want = np.zeros((140, hd))
  for p in range(140):
    row, col = divmod(p, 14)
    for j in range(hd // 4):
      inv_freq = theta ** (-2 * j / (hd // 2))
      want[p, j] = want[p, j + hd // 2] = row * inv_freq                         # first hd/4 pairs: row
      want[p, hd // 4 + j] = want[p, hd // 4 + j + hd // 2] = col * inv_freq     # next hd/4 pairs: column
  np.testing.assert_allclose(np.asarray(cos), np.cos(want), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin), np.sin(want), atol=1e-5)
  assert (pos[:, 0].max(), pos[:, 1].max()) == (9, 13)


# --------------------------------------------------------------------------------------------------
# The whole tower.


def test_tower_matches_paddleocr_vision_tower():
  """PaddleOCR-VL's vision tower (transformers) is Keye 1.5's: native resolution, bilinear table,
  2D RoPE, block-diagonal attention. Two images and a two-frame video (grid row t = 2), packed."""
  hf = hf_paddle_vision(V)
  tower = _tower(hf_vision_to_flat(hf.state_dict(), _cfg()))
  rng = np.random.default_rng(3)
  grid_thw = np.array([[1, 4, 6], [1, 10, 14], [2, 6, 4]])
  grids = split_grid_thw(grid_thw)
  blocks = [(_patches(rng, h, w), h, w) for h, w in grids]
  n = sum(h * w for h, w in grids)
  with torch.no_grad():
    pixels = torch.tensor(np.concatenate([p for p, _, _ in blocks])[None])
    want = hf(pixel_values=pixels, grid_thw=torch.tensor(grid_thw)).last_hidden_state.reshape(n, -1).numpy()
  pix, seg, pos, _ = _packed(blocks, n + 12, rng)
  got = np.asarray(tower(jnp.asarray(pix), jnp.asarray(seg), jnp.asarray(pos)))[0, :n]
  err = np.abs(got - want).max()
  assert err <= 1e-4, err


def test_packed_blocks_equal_each_block_alone(siglip):
  _, flat = siglip
  tower = _tower(flat)
  run = jax.jit(lambda pix, seg, pos: tower(pix, seg, pos))
  rng = np.random.default_rng(4)
  grids = [(4, 6), (2, 2), (6, 4), (8, 10)]
  blocks = [(_patches(rng, h, w), h, w) for h, w in grids]
  pix, seg, pos, lay = _packed(blocks, 160, rng)   # 140 real patches, garbage padding
  packed = np.asarray(run(pix, seg, pos))[0]
  start = 0
  for block in blocks:
    size = block[1] * block[2]
    alone = np.asarray(run(*_packed([block], 80)[:3]))[0, :size]
    err = np.abs(packed[start:start + size] - alone).max()
    assert err <= 1e-5, (block[1:], err)
    start += size
  assert np.isfinite(packed).all()


def test_scanned_and_unscanned_towers_agree(siglip):
  _, flat = siglip
  scanned, unscanned = _tower(flat, scan=True), _tower(scan=False)
  set_flat(unscanned, get_flat(scanned))
  rng = np.random.default_rng(5)
  pix, seg, pos, _ = _packed([(_patches(rng, 4, 6), 4, 6), (_patches(rng, 6, 2), 6, 2)], 40)
  args = jnp.asarray(pix), jnp.asarray(seg), jnp.asarray(pos)
  run = nnx.jit(lambda tower, *a: tower(*a))
  np.testing.assert_allclose(np.asarray(run(scanned, *args)), np.asarray(run(unscanned, *args)), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The projector.


def test_projector_merge_order_and_norm_after_merge():
  cfg = _cfg()
  proj = Projector(cfg, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(6)
  d4 = 4 * V.hidden_size
  proj.norm.scale[...] = jnp.asarray(1 + 0.1 * rng.standard_normal(d4), jnp.float32)
  proj.norm.bias[...] = jnp.asarray(0.1 * rng.standard_normal(d4), jnp.float32)
  grids = [(4, 6), (2, 4)]
  lay = vision_layout(grids, 40)
  feats = rng.standard_normal((40, V.hidden_size)).astype(np.float32)
  got = np.asarray(proj(jnp.asarray(feats[None]), jnp.asarray(lay["merge_index"][None])))[0]

  p = {k: np.asarray(a, np.float64) for k, a in nnx.to_flat_state(nnx.state(proj))
       for k in ["/".join(map(str, k))]}
  erf = np.vectorize(math.erf)
  rows, start = [], 0
  for h, w in grids:
    img = feats[start:start + h * w].reshape(h, w, -1)
    for i in range(h // 2):
      for j in range(w // 2):
        rows.append(np.concatenate([img[2 * i, 2 * j], img[2 * i, 2 * j + 1], img[2 * i + 1, 2 * j],
                                    img[2 * i + 1, 2 * j + 1]]))
    start += h * w
  x = np.stack(rows).astype(np.float64)                      # (T, 4Dv): merged first ...
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.projector_ln_eps)
  x = x * p["norm/scale"] + p["norm/bias"]                    # ... then LayerNorm(4Dv, eps 1e-5)
  x = x @ p["linear_1/kernel"] + p["linear_1/bias"]
  x = 0.5 * x * (1 + erf(x / math.sqrt(2)))                   # exact GELU
  want = x @ p["linear_2/kernel"] + p["linear_2/bias"]
  n_tok = int(lay["merge_valid"].sum())
  assert n_tok == len(rows) == 8
  np.testing.assert_allclose(got[:n_tok], want, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Everything together.


def test_keye_vl_runs_end_to_end_with_vision():
  cfg = _cfg(image_token_id=90, video_token_id=91)
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(7)
  grids = [(4, 6), (2, 4)]                                   # 6 + 2 merged tokens
  pix, seg, pos, lay = _packed([(_patches(rng, h, w), h, w) for h, w in grids], 48)
  ids = np.concatenate([[1, 2], [90] * 6, [3], [90] * 2, [4, 5, 0, 0]])[None].astype(np.int32)
  s = ids.shape[1]
  batch = dict(input_ids=ids, segment_ids=(np.arange(s) < s - 2)[None].astype(np.int32),
               position_ids=np.broadcast_to(np.arange(s, dtype=np.int32), (3, 1, s)).copy(),
               pixel_values=pix, patch_segment_ids=seg, patch_pos=pos,
               merge_index=lay["merge_index"][None], merge_valid=lay["merge_valid"][None])
  check_vision_counts(batch, cfg)
  batch = jax.tree.map(jnp.asarray, batch)

  @nnx.jit
  def run(m, b):
    tokens = m.projector(m.vision(b["pixel_values"], b["patch_segment_ids"], b["patch_pos"]), b["merge_index"])
    return m(b), m.embed(b), tokens

  logits, emb, tokens = run(model, batch)
  assert logits.shape == (1, s, cfg.text.vocab_size) and bool(jnp.isfinite(logits).all())
  # The pads carry the projected vision tokens, in order; the other tokens keep their embeddings.
  emb, tokens = np.asarray(emb)[0], np.asarray(tokens)[0]
  is_pad = ids[0] == 90
  np.testing.assert_allclose(emb[is_pad], tokens[:8], atol=1e-6)
  np.testing.assert_allclose(emb[~is_pad], np.asarray(model.decoder.embed(batch["input_ids"]))[0][~is_pad])
