"""The tiny multimodal Keye-VL of the vision tests, on a small demo dataset and the demo tokenizer."""

from __future__ import annotations

from keye_jax.config import KeyeConfig
from keye_jax.processing import build_demo_tokenizer
from tests.model.hf_reference import tiny_text_config, tiny_vision_config


def tiny_demo(root, seed: int):
  """(tokenizer, KeyeConfig): the demo dataset (5% scale) written to root/data, the demo tokenizer to
  root/tok, and a tiny config with that tokenizer's vocabulary and vision tokens (XLA attention)."""
  from train.data.demo import write_demo_dataset
  tok = build_demo_tokenizer(str(root / "tok"))
  write_demo_dataset(str(root / "data"), seed=seed, with_tfds=False, scale=0.05)
  sp = tok.special
  cfg = KeyeConfig(text=tiny_text_config(vocab_size=tok.vocab_size), vision=tiny_vision_config(),
                   attention_impl="xla", image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                   vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                   bos_token_id=sp.endoftext, eos_token_id=sp.im_end)
  return tok, cfg
