"""The Qwen3 text decoder (the language-model half of Keye-VL 1.5).

h += o_proj(attn(RMSNorm_in(h))); h += down(silu(gate(x)) * up(x)) with x = RMSNorm_post(h).
Attention: GQA, per-head RMSNorm on q and k before M-RoPE, no biases, causal within segments.

Two ways through it:
  training / prefill  `__call__(embeds, position_ids, segment_ids)` on whole sequences; prefill also
                      returns every layer's K/V to fill a cache;
  decoding            `decode(embeds, position_ids, cache)`: one new token per row attends to a
                      preallocated cache (B, Hkv, T, hd) per layer, which is updated and returned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from keye_jax import ops, rope
from keye_jax.config import KeyeConfig, TextConfig
from keye_jax.layers import Dense, Embed, RMSNorm
from keye_jax.sharding import constrain
from keye_jax.stack import Stack
from kernels.decode import merge_new_tokens


class Attention(nnx.Module):

  def __init__(self, cfg: TextConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype, param_dtype):
    d, hd = cfg.hidden_size, cfg.head_dim
    kw = dict(bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Dense(d, cfg.num_heads * hd, ("embed", "heads"), **kw)
    self.k_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
    self.v_proj = Dense(d, cfg.num_kv_heads * hd, ("embed", "kv_heads"), **kw)
    self.o_proj = Dense(cfg.num_heads * hd, d, ("heads", "embed"), **kw)
    self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
    self.attention_impl = attention_impl

  def qkv(self, x_bsd, cos, sin):
    b, s, _ = x_bsd.shape
    q = self.q_norm(self.q_proj(x_bsd).reshape(b, s, self.num_heads, self.head_dim))
    k = self.k_norm(self.k_proj(x_bsd).reshape(b, s, self.num_kv_heads, self.head_dim))
    v = self.v_proj(x_bsd).reshape(b, s, self.num_kv_heads, self.head_dim)
    rotate = ops.current().apply_rope
    q = constrain(rotate(q, cos, sin), ("batch", "length", "act_heads", None))
    k = constrain(rotate(k, cos, sin), ("batch", "length", "act_heads", None))
    return q, k, v

  def __call__(self, x_bsd, cos, sin, segment_ids, cache=None):
    """Returns (output (B, S, D), (k, v) of the new tokens). With `cache` = (k_cache, v_cache,
    cache_segment_ids, cache_lengths), the queries attend to the valid cache slots and, causally, to each other; the
    caller writes the returned k/v into the cache once for all layers (no per-layer cache copy)."""
    b, s, _ = x_bsd.shape
    q, k, v = self.qkv(x_bsd, cos, sin)
    if cache is None:
      out = ops.current().attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                                    causal=True, impl=self.attention_impl)
    else:
      out = decode_attention(q, k, v, *cache, impl=self.attention_impl)
    out = out.reshape(b, s, self.num_heads * self.head_dim)
    return self.o_proj(out), (k, v)


def decode_attention(q_bshd, k_new, v_new, k_cache, v_cache, cache_segment_ids, cache_lengths, *,
                     impl: str = "auto"):
  """Few new queries against a read-only cache plus their own keys, merged in one softmax.

  q (B, s, Hq, D); k_new, v_new (B, s, Hkv, D); k_cache, v_cache (B, Hkv, T, D); cache_segment_ids (B, T)
  with 0 = empty slot; cache_lengths (B,) or scalar: no valid slot at or after it (kernels.decode).
  The new tokens' own keys are not in the cache yet (see `Decoder.decode`); they see each other causally.
  """
  b, s, hq, d = q_bshd.shape
  hkv = k_cache.shape[1]
  g, scale = hq // hkv, d ** -0.5
  q_bhrd = q_bshd.reshape(b, s, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, s * g, d)  # rows (s, g)
  out_c, lse_c = ops.current().cache_attention(q_bhrd, k_cache, v_cache, cache_segment_ids, cache_lengths,
                                               scale=scale, impl=impl)
  s_new = jnp.einsum("bhrd,bkhd->bhrk", q_bhrd, k_new, preferred_element_type=jnp.float32) * scale
  causal = (jnp.arange(s * g)[:, None] // g) >= jnp.arange(s)[None, :]                  # (s*g, s)
  out = merge_new_tokens(out_c, lse_c, jnp.where(causal, s_new, -jnp.inf), jnp.swapaxes(v_new, 1, 2))
  return out.reshape(b, hkv, s, g, d).transpose(0, 2, 1, 3, 4).reshape(b, s, hq, d).astype(q_bshd.dtype)


class MLP(nnx.Module):

  def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(bias=False, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.gate_proj = Dense(d, f, ("embed", "mlp"), **kw)
    self.up_proj = Dense(d, f, ("embed", "mlp"), **kw)
    self.down_proj = Dense(f, d, ("mlp", "embed"), **kw)

  def __call__(self, x):
    h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, ("batch", "length", "act_mlp")))


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: TextConfig, *, attention_impl: str, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.attn = Attention(cfg, attention_impl=attention_impl, rngs=rngs, **kw)
    self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, rngs=rngs, **kw)

  def __call__(self, h, cache, *, cos, sin, segment_ids, kv_segment_ids=None, kv_lengths=None,
               return_kv=False):
    layer_cache = None if cache is None else (cache[0], cache[1], kv_segment_ids, kv_lengths)
    a, kv = self.attn(self.input_norm(h), cos, sin, segment_ids, layer_cache)
    h = h + a
    h = h + self.mlp(self.post_norm(h))
    return constrain(h, ("batch", "length", "act_embed")), (kv if return_kv else None)


class Decoder(nnx.Module):
  """Embedding, decoder layers, final norm and (untied) lm_head."""

  def __init__(self, cfg: KeyeConfig, *, rngs: nnx.Rngs):
    t = cfg.text
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.cfg = t
    self.embed = Embed(t.vocab_size, t.hidden_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.layers = Stack(
        lambda r: DecoderLayer(t, attention_impl=cfg.attention_impl, rngs=r, dtype=dtype,
                               param_dtype=param_dtype),
        t.num_layers, scan=cfg.scan_layers, remat=cfg.remat, rngs=rngs)
    self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.lm_head = None if t.tie_word_embeddings else Dense(
        t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs, dtype=dtype,
        param_dtype=param_dtype)

  def _cos_sin(self, position_ids_3bs):
    t = self.cfg
    return rope.mrope_cos_sin(position_ids_3bs, t.head_dim, t.rope_theta, t.mrope_section)

  def hidden_states(self, embeds_bsd, position_ids_3bs, segment_ids_bs, *, return_kv: bool = False):
    """Final-normed hidden states (B, S, D); with return_kv also the stacked (k, v), each (L, B, S, Hkv, hd)."""
    cos, sin = self._cos_sin(position_ids_3bs)
    h = constrain(embeds_bsd, ("batch", "length", "act_embed"))
    h, kv = self.layers(h, None, cos=cos, sin=sin, segment_ids=segment_ids_bs, return_kv=return_kv)
    h = self.norm(h)
    return (h, kv) if return_kv else h

  def logits(self, h_bsd):
    if self.lm_head is None:
      return jnp.dot(h_bsd, self.embed.embedding[...].astype(h_bsd.dtype).T)
    return self.lm_head(h_bsd)

  def lm_head_kernel(self):
    """(D, V) output projection, for losses that never materialise all logits at once."""
    return self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]

  def __call__(self, input_ids_bs, position_ids_3bs=None, segment_ids_bs=None):
    """Text-only forward: token ids -> logits (B, S, V). Default positions 0..S-1, one segment."""
    b, s = input_ids_bs.shape
    if position_ids_3bs is None:
      position_ids_3bs = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (3, b, s))
    if segment_ids_bs is None:
      segment_ids_bs = jnp.ones((b, s), jnp.int32)
    return self.logits(self.hidden_states(self.embed(input_ids_bs), position_ids_3bs, segment_ids_bs))

  # ---- decoding with a preallocated cache -------------------------------------------------------

  def init_cache(self, batch: int, length: int, dtype=None) -> dict:
    """Zeroed cache: k, v (L, B, Hkv, T, hd), segment ids (B, T) (0 = empty slot), next index, and the
    latest token's K/V (L, B, 1, Hkv, hd), still to be written at slot index - 1 (see `decode`).
    Head-major, so a step's attention reads each head's keys and values where they lie (no transposes)."""
    t = self.cfg
    dtype = dtype or self.embed.dtype
    shape = (t.num_layers, batch, t.num_kv_heads, length, t.head_dim)
    pending = jnp.zeros((t.num_layers, batch, 1, t.num_kv_heads, t.head_dim), dtype)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                segment_ids=jnp.zeros((batch, length), jnp.int32), index=jnp.zeros((), jnp.int32),
                pending_k=pending, pending_v=pending)

  def prefill(self, embeds_bsd, position_ids_3bs, segment_ids_bs, cache: dict):
    """Runs the prompt (left-padded: segment id 0 on padding) and writes its K/V into the cache slots
    0..S-1. Returns (hidden (B, S, D), cache)."""
    s = embeds_bsd.shape[1]
    h, (k, v) = self.hidden_states(embeds_bsd, position_ids_3bs, segment_ids_bs, return_kv=True)
    cache = dict(
        cache,
        k=jax.lax.dynamic_update_slice(cache["k"], _heads_major(k, cache["k"].dtype), (0, 0, 0, 0, 0)),
        v=jax.lax.dynamic_update_slice(cache["v"], _heads_major(v, cache["v"].dtype), (0, 0, 0, 0, 0)),
        segment_ids=jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_bs.astype(jnp.int32), (0, 0)),
        index=jnp.asarray(s, jnp.int32),
        # The last prompt token's K/V, already in slot S-1: writing them again there changes nothing.
        pending_k=k[:, :, -1:].astype(cache["pending_k"].dtype),
        pending_v=v[:, :, -1:].astype(cache["pending_v"].dtype))
    return h, cache

  def decode(self, embeds_bsd, position_ids_3bs, cache: dict):
    """One new token per row (B, 1) at cache slot `index`. Returns (hidden (B, 1, D), cache).

    The step's own K/V are attended directly and left pending; the next step writes them first. Writing
    before any read is what lets XLA update the cache in place: written after the reads (the last
    layer's K/V do not depend on its own read), it would copy the whole cache every step.
    """
    b, s, _ = embeds_bsd.shape
    if s != cache["pending_k"].shape[2]:
      raise ValueError(f"decode takes {cache['pending_k'].shape[2]} new token(s) per call, got {s}")
    index = cache["index"]
    at = (0, 0, 0, jnp.maximum(index - 1, 0), 0)  # an empty cache's zeros go to slot 0, still empty
    k_cache = jax.lax.dynamic_update_slice(cache["k"], _heads_major(cache["pending_k"], cache["k"].dtype), at)
    v_cache = jax.lax.dynamic_update_slice(cache["v"], _heads_major(cache["pending_v"], cache["v"].dtype), at)
    segment_ids = cache["segment_ids"]  # the pending slot is already marked (below, last step)
    cos, sin = self._cos_sin(position_ids_3bs)
    h, (k, v) = self.layers(embeds_bsd, (k_cache, v_cache), cos=cos, sin=sin, segment_ids=None,
                            kv_segment_ids=segment_ids, kv_lengths=index, return_kv=True)
    cache = dict(k=k_cache, v=v_cache, index=index + s, pending_k=k.astype(k_cache.dtype),
                 pending_v=v.astype(v_cache.dtype),
                 segment_ids=jax.lax.dynamic_update_slice(segment_ids, jnp.ones((b, s), jnp.int32), (0, index)))
    return self.norm(h), cache


def _heads_major(kv_lbshd, dtype):
  """(L, B, S, Hkv, hd) -> the cache's (L, B, Hkv, S, hd)."""
  return jnp.swapaxes(kv_lbshd, 2, 3).astype(dtype)
