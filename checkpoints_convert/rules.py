"""The checkpoint name mapping as a table of rules (one table serves both directions).

A rule: (HF name pattern, our parameter path, transform). `{i}` is a layer index. Our paths are
'/'-joined nnx state paths of `KeyeVL` in the per-layer (unscanned) spelling; the scanned layout
stacks the `{i}` tensors along a new leading axis.

Transforms (HF tensor -> ours; each has an exact inverse):
  "id"     unchanged (norm scales, biases, embeddings)
  "t"      linear weight (out, in) -> kernel (in, out)
  "conv"   patch conv (Dv, C, p, p) -> kernel (C*p*p, Dv), patch flattened in (channel, y, x) order
"""

from __future__ import annotations

import re

import numpy as np

TEXT_RULES = (
    ("model.embed_tokens.weight", "decoder/embed/embedding", "id"),
    ("model.layers.{i}.input_layernorm.weight", "decoder/layers/layers/{i}/input_norm/scale", "id"),
    ("model.layers.{i}.post_attention_layernorm.weight", "decoder/layers/layers/{i}/post_norm/scale", "id"),
    ("model.layers.{i}.self_attn.q_proj.weight", "decoder/layers/layers/{i}/attn/q_proj/kernel", "t"),
    ("model.layers.{i}.self_attn.k_proj.weight", "decoder/layers/layers/{i}/attn/k_proj/kernel", "t"),
    ("model.layers.{i}.self_attn.v_proj.weight", "decoder/layers/layers/{i}/attn/v_proj/kernel", "t"),
    ("model.layers.{i}.self_attn.o_proj.weight", "decoder/layers/layers/{i}/attn/o_proj/kernel", "t"),
    ("model.layers.{i}.self_attn.q_norm.weight", "decoder/layers/layers/{i}/attn/q_norm/scale", "id"),
    ("model.layers.{i}.self_attn.k_norm.weight", "decoder/layers/layers/{i}/attn/k_norm/scale", "id"),
    ("model.layers.{i}.mlp.gate_proj.weight", "decoder/layers/layers/{i}/mlp/gate_proj/kernel", "t"),
    ("model.layers.{i}.mlp.up_proj.weight", "decoder/layers/layers/{i}/mlp/up_proj/kernel", "t"),
    ("model.layers.{i}.mlp.down_proj.weight", "decoder/layers/layers/{i}/mlp/down_proj/kernel", "t"),
    ("model.norm.weight", "decoder/norm/scale", "id"),
    ("lm_head.weight", "decoder/lm_head/kernel", "t"),
)

_V = "visual.vision_model"
VISION_RULES = (
    (f"{_V}.embeddings.patch_embedding.weight", "vision/patch_embed/kernel", "conv"),
    (f"{_V}.embeddings.patch_embedding.bias", "vision/patch_embed/bias", "id"),
    (f"{_V}.embeddings.position_embedding.weight", "vision/pos_embed/embedding", "id"),
    (f"{_V}.encoder.layers.{{i}}.layer_norm1.weight", "vision/layers/layers/{i}/norm1/scale", "id"),
    (f"{_V}.encoder.layers.{{i}}.layer_norm1.bias", "vision/layers/layers/{i}/norm1/bias", "id"),
    (f"{_V}.encoder.layers.{{i}}.layer_norm2.weight", "vision/layers/layers/{i}/norm2/scale", "id"),
    (f"{_V}.encoder.layers.{{i}}.layer_norm2.bias", "vision/layers/layers/{i}/norm2/bias", "id"),
    *((f"{_V}.encoder.layers.{{i}}.self_attn.{p}_proj.{w}", f"vision/layers/layers/{{i}}/attn/{p}_proj/{o}",
       "t" if w == "weight" else "id")
      for p in ("q", "k", "v", "out") for w, o in (("weight", "kernel"), ("bias", "bias"))),
    *((f"{_V}.encoder.layers.{{i}}.mlp.{p}.{w}", f"vision/layers/layers/{{i}}/mlp/{p}/{o}",
       "t" if w == "weight" else "id")
      for p in ("fc1", "fc2") for w, o in (("weight", "kernel"), ("bias", "bias"))),
    (f"{_V}.post_layernorm.weight", "vision/post_norm/scale", "id"),
    (f"{_V}.post_layernorm.bias", "vision/post_norm/bias", "id"),
    ("mlp_AR.pre_norm.weight", "projector/norm/scale", "id"),
    ("mlp_AR.pre_norm.bias", "projector/norm/bias", "id"),
    ("mlp_AR.linear_1.weight", "projector/linear_1/kernel", "t"),
    ("mlp_AR.linear_1.bias", "projector/linear_1/bias", "id"),
    ("mlp_AR.linear_2.weight", "projector/linear_2/kernel", "t"),
    ("mlp_AR.linear_2.bias", "projector/linear_2/bias", "id"),
)

# Released tensors the model does not use: kept aside on import, written back on export.
UNUSED_PATTERNS = (
    re.compile(r"^visual\.vision_model\.embeddings\.packing_position_embedding\.weight$"),
    re.compile(r"^visual\.vision_model\.head\..*$"),
)

# The transformers-PR spelling of the same tensors (accepted on import; export writes the original).
_PR_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.mm_projector.", "mlp_AR."),
    ("model.language_model.", "model."),
)


def canonical_name(hf_name: str) -> str:
  """Original release spelling of a tensor name (maps the transformers-PR prefixes back)."""
  for pr, orig in _PR_PREFIXES:
    if hf_name.startswith(pr):
      return orig + hf_name[len(pr):]
  return hf_name


def to_ours(x: np.ndarray, transform: str) -> np.ndarray:
  if transform == "id":
    return x
  if transform == "t":
    return np.ascontiguousarray(x.T)
  if transform == "conv":  # (Dv, C, p, p) -> (C*p*p, Dv)
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)
  raise ValueError(f"unknown transform {transform!r}")


def to_hf(x: np.ndarray, transform: str, hf_shape: tuple[int, ...]) -> np.ndarray:
  if transform == "id":
    return x
  if transform in ("t", "conv"):
    return np.ascontiguousarray(x.T).reshape(hf_shape)
  raise ValueError(f"unknown transform {transform!r}")


def expand(cfg) -> list[tuple[str, str, str, tuple[int, ...] | None]]:
  """Every (hf_name, our_path, transform, group) the config's model has; group names the set of
  tensors saved together: one group per layer and one per other module (the embedding alone, the
  lm_head alone), so conversion holds one group in memory at a time."""
  out = []
  tables = [("decoder", TEXT_RULES, cfg.text.num_layers)]
  if cfg.vision is not None:
    tables.append(("vision", VISION_RULES, cfg.vision.num_layers))
  for part, table, n_layers in tables:
    for hf, ours, tr in table:
      if ours == "decoder/lm_head/kernel" and cfg.text.tie_word_embeddings:
        continue
      if "{i}" in hf:
        for i in range(n_layers):
          out.append((hf.format(i=i), ours.format(i=i), tr, f"{ours.split('/')[0]}_layer_{i:03d}"))
      else:
        out.append((hf, ours, tr, "_".join(ours.split("/")[:2])))
  return out


def is_unused(hf_name: str) -> bool:
  return any(p.match(hf_name) for p in UNUSED_PATTERNS)
