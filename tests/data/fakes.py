"""A small stand-in for keye_jax.processing: same example contract, trivially checkable numbers.

Text is byte-coded (id = 12 + byte), images/frames are cut into 14x14 patches at their size rounded to
28 px, position ids follow the M-RoPE rule (model.md section 5). Used to test the data pipeline alone."""

import os

import av
import numpy as np
from PIL import Image

SPECIAL = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 3, "<|vision_end|>": 4,
           "<|image_pad|>": 5, "<|video_pad|>": 6, "<|frame|>": 7, "<|fast_start|>": 8, "<|fast_end|>": 9,
           "<think>": 10, "</think>": 11}


class MediaError(ValueError):
  pass


class FakeTokenizer:
  def token_to_id(self, name):
    return SPECIAL.get(name)


def _text(s):
  return [12 + b for b in s.encode()]


def _patches(rgb):
  h, w = rgb.shape[:2]
  h2, w2 = max(28, round(h / 28) * 28), max(28, round(w / 28) * 28)
  if (h2, w2) != (h, w):
    rgb = np.asarray(Image.fromarray(rgb).resize((w2, h2)))
  x = rgb.astype(np.float32) / 127.5 - 1.0
  gh, gw = h2 // 14, w2 // 14
  x = x.reshape(gh, 14, gw, 14, 3).transpose(0, 2, 4, 1, 3).reshape(gh * gw, 588)
  return x, (gh, gw)


def _frames(path):
  if not os.path.exists(path):
    raise FileNotFoundError(path)
  if path.endswith(".mp4"):
    try:
      with av.open(path) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    except av.error.FFmpegError as e:
      raise MediaError(f"{path}: {e}") from e
  try:
    with Image.open(path) as im:
      return [np.asarray(im.convert("RGB"))]
  except OSError as e:
    raise MediaError(f"{path}: cannot decode image: {e}") from e


def fake_encode(messages, tokenizer, base_dir=None, **kwargs):
  ids, loss, pos, pix, grids = [], [], [], [], []
  cur = 0

  def text(toks, target):
    nonlocal cur
    for t in toks:
      ids.append(t)
      loss.append(target)
      pos.append((cur, cur, cur))
      cur += 1

  def block(rgb, pad, target):
    nonlocal cur
    x, (gh, gw) = _patches(rgb)
    pix.append(x)
    grids.append((gh, gw))
    s = cur
    for r in range(gh // 2):
      for c in range(gw // 2):
        ids.append(pad)
        loss.append(False)
        pos.append((s, s + r, s + c))
    cur = s + max(gh // 2, gw // 2)

  for m in messages:
    target = m["role"] == "assistant"
    text([SPECIAL["<|im_start|>"]] + _text(m["role"] + "\n"), False)
    for el in m["content"]:
      if el["type"] == "text":
        text(_text(el["text"]), target)
      else:
        path = el[el["type"]]
        path = os.path.join(base_dir or "", path)
        frames = _frames(path)
        text([SPECIAL["<|vision_start|>"]], False)
        if el["type"] == "image":
          block(frames[0], SPECIAL["<|image_pad|>"], target)
        else:
          for j, f in enumerate(frames):
            text([SPECIAL["<|frame|>"]] + _text(f"{j / 2:.1f}"), False)
            block(f, SPECIAL["<|video_pad|>"], target)
        text([SPECIAL["<|vision_end|>"]], False)
    text([SPECIAL["<|im_end|>"]], target)
    text(_text("\n"), False)
  return {"input_ids": np.array(ids, np.int32), "loss_mask": np.array(loss, bool),
          "position_ids": np.array(pos, np.int32).T.reshape(3, -1),
          "pixel_values": np.concatenate(pix) if pix else np.zeros((0, 588), np.float32),
          "grids_hw": np.array(grids, np.int32).reshape(-1, 2)}


def write_manifest(out_dir, n, seed=0, sizes=(28, 56, 84), text_only_every=4, tag="question"):
  """n records of small images (or text only) with unique texts; returns the manifest path."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(out_dir, "img"), exist_ok=True)
  path = os.path.join(out_dir, f"{tag}.jsonl")
  import json
  with open(path, "w") as f:
    for i in range(n):
      content = []
      if not text_only_every or i % text_only_every:
        h, w = rng.choice(sizes), rng.choice(sizes)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(out_dir, "img", f"{tag}{i}.png"))
        content.append({"type": "image", "image": f"img/{tag}{i}.png"})
      content.append({"type": "text", "text": f"{tag} {i} " + "x" * int(rng.integers(0, 40))})
      rec = {"id": i, "messages": [{"role": "user", "content": content},
                                   {"role": "assistant", "content": [{"type": "text", "text": f"answer {i}"}]}]}
      f.write(json.dumps(rec) + "\n")
  return path


def segments(batch):
  """(source id, input_ids tuple, pixel sum) of every packed example of a numpy batch."""
  out = []
  b, s = batch["segment_ids"].shape
  for r in range(b):
    seg, pseg = batch["segment_ids"][r], batch["patch_segment_ids"][r]
    # patch blocks belong to examples in order; recover example boundaries from the pad counts
    p = 0
    for k in range(1, seg.max() + 1):
      ids = batch["input_ids"][r][seg == k]
      n_patch = int(np.isin(ids, (5, 6)).sum()) * 4
      pix = batch["pixel_values"][r][p:p + n_patch]
      p += n_patch
      out.append((int(batch["source_ids"][r][seg == k][0]), tuple(ids.tolist()), round(float(pix.sum()), 3)))
  return out
