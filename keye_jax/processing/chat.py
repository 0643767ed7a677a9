"""Chat template and tokenised examples (the Example contract of the data pipeline).

Qwen format: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`, no default system prompt.
Media in content expand in place:
  image: <|vision_start|> <|image_pad|> x tokens <|vision_end|>
  video: <|vision_start|> then per frame <|frame|> + f"{ts:.1f}" (when timestamps exist) +
         slow: <|video_pad|> x tokens    fast: <|fast_start|> <|video_pad|> x tokens <|fast_end|>
         then <|vision_end|>
The text between special tokens is tokenised as one piece, exactly as a tokenizer would cut the rendered
string, and the loss mask is set on the assistant content and its <|im_end|> (not the role header, not the
newline after). A user turn ending in `/no_think` makes the generation prompt close an empty think block
(Qwen3's convention); `/think` or nothing leaves the model to open `<think>` itself.
"""

from __future__ import annotations

import os

import numpy as np

from keye_jax.processing import vision_process
from keye_jax.processing.errors import MediaError
from keye_jax.processing.positions import position_ids
from keye_jax.processing.processor import Processor
from keye_jax.processing.tokenizer import KeyeTokenizer

ROLES = ("system", "user", "assistant")
EMPTY_THINK = "<think>\n\n</think>\n\n"


def _resolve(path, base_dir):
  """Media paths relative to base_dir; URLs, data URLs, bytes and in-memory images pass through."""
  if not isinstance(path, str) or base_dir is None:
    return path
  if path.startswith(("http://", "https://", "data:", "file://")) or os.path.isabs(path):
    return path
  return os.path.join(base_dir, path)


class _Builder:
  """Collects pieces (text, or a special-token id) with a target flag, then tokenises them."""

  def __init__(self, tokenizer: KeyeTokenizer):
    self.tok = tokenizer
    self.sp = tokenizer.special
    self.pieces: list[tuple[str | list[int], bool]] = []

  def text(self, s: str, target: bool = False):
    if s:
      self.pieces.append((s, target))

  def ids(self, ids, target: bool = False):
    self.pieces.append((list(ids), target))

  def build(self) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = [], []
    i = 0
    while i < len(self.pieces):
      piece, target = self.pieces[i]
      if isinstance(piece, list):
        ids += piece
        mask += [target] * len(piece)
        i += 1
        continue
      # Join consecutive text pieces: the tokenizer would see them as one string.
      text, flags = "", []
      while i < len(self.pieces) and isinstance(self.pieces[i][0], str):
        text += self.pieces[i][0]
        flags += [self.pieces[i][1]] * len(self.pieces[i][0])
        i += 1
      tok_ids, offsets = self.tok.encode_with_offsets(text)
      ids += tok_ids
      mask += [any(flags[a:max(b, a + 1)]) for a, b in offsets]
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def _image(b: _Builder, ele: dict, processor: Processor, out: dict):
  pixels, grid = processor.image(vision_process.fetch_image(ele))
  out["pixels"].append(pixels)
  out["grids"].append(grid[None])
  b.ids([b.sp.vision_start] + [b.sp.image_pad] * (int(grid[0] * grid[1]) // 4) + [b.sp.vision_end])


def _video(b: _Builder, ele: dict, processor: Processor, out: dict):
  frames, info = vision_process.fetch_video(ele)
  pixels, grids = processor.video(frames, **info)
  out["pixels"].append(pixels)
  out["grids"].append(grids)
  timestamps = info.get("timestamps")
  b.ids([b.sp.vision_start])
  for j, (kind, grid) in enumerate(zip(info["frame_types"], grids)):
    b.ids([b.sp.frame])
    if timestamps is not None:
      b.text(f"{float(timestamps[j]):.1f}")
    pads = [b.sp.video_pad] * (int(grid[0] * grid[1]) // 4)
    b.ids([b.sp.fast_start] + pads + [b.sp.fast_end] if kind == 1 else pads)
  b.ids([b.sp.vision_end])


def _content(b: _Builder, content, target: bool, base_dir, processor, defaults, out, where: str):
  if isinstance(content, str):
    b.text(content, target)
    return
  if not isinstance(content, list):
    raise ValueError(f"{where}: content must be a string or a list of elements, got {type(content).__name__}")
  for k, ele in enumerate(content):
    if not isinstance(ele, dict):
      raise ValueError(f"{where}.content[{k}]: an element must be a dict, got {type(ele).__name__}")
    kind = ele.get("type") or next((key for key in ("text", "image", "image_url", "video") if key in ele), None)
    if kind == "text":
      b.text(ele.get("text", ""), target)
    elif kind in ("image", "image_url", "video"):
      if target:
        raise ValueError(f"{where}.content[{k}]: media in an assistant turn cannot be a training target")
      ele = {**defaults, **ele}
      for key in ("image", "image_url", "video"):
        if key in ele:
          value = ele[key]
          ele[key] = [_resolve(v, base_dir) for v in value] if isinstance(value, list) else _resolve(value, base_dir)
      (_video if kind == "video" else _image)(b, ele, processor, out)
    else:
      raise MediaError(ele, f"{where}.content[{k}]: unknown element type {kind!r}")


def _last_user_text(messages) -> str:
  for m in reversed(messages):
    if m.get("role") == "user":
      c = m.get("content")
      if isinstance(c, str):
        return c
      return "".join(e.get("text", "") for e in c if isinstance(e, dict) and e.get("type", "text") == "text")
  return ""


def _encode(messages, tokenizer: KeyeTokenizer, base_dir, processor, vision_kwargs, generation: bool,
            thinking) -> dict:
  if not isinstance(messages, list) or not messages:
    raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
  processor = processor or Processor()
  vision_process.check_element(vision_kwargs)
  b = _Builder(tokenizer)
  out = {"pixels": [], "grids": []}
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"{where}: a message needs 'role' and 'content'")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}: unknown role {m['role']!r}; expected one of {ROLES}")
    target = m["role"] == "assistant" and not generation
    b.ids([b.sp.im_start])
    b.text(f"{m['role']}\n")
    _content(b, m["content"], target, base_dir, processor, vision_kwargs, out, where)
    b.ids([b.sp.im_end], target)
    b.text("\n")
  if generation:
    b.ids([b.sp.im_start])
    b.text("assistant\n")
    if thinking is None:
      thinking = not _last_user_text(messages).rstrip().endswith("/no_think")
    if not thinking:
      b.text(EMPTY_THINK)
  ids, mask = b.build()
  grids = np.concatenate(out["grids"]).astype(np.int32) if out["grids"] else np.zeros((0, 2), np.int32)
  pixels = (np.concatenate(out["pixels"]).astype(np.float32) if out["pixels"]
            else np.zeros((0, 3 * processor.patch_size ** 2), np.float32))
  pos, _ = position_ids(ids, grids, (tokenizer.special.image_pad, tokenizer.special.video_pad),
                        processor.merge_size)
  return {"input_ids": ids, "loss_mask": mask, "position_ids": pos, "pixel_values": pixels, "grids_hw": grids}


def encode_example(messages, tokenizer: KeyeTokenizer, base_dir: str | None = None,
                   processor: Processor | None = None, **vision_kwargs) -> dict:
  """A full conversation -> Example dict: input_ids (S,) int32, loss_mask (S,) bool (assistant content and
  its <|im_end|>), position_ids (3, S) int32, pixel_values (P, 588) float32, grids_hw (n, 2) int32.

  `vision_kwargs` (min_pixels, max_pixels, fps, max_frames, video_total_pixels, ...) are defaults for every
  media element; an element's own keys win. Media paths are relative to `base_dir`.
  """
  return _encode(messages, tokenizer, base_dir, processor, vision_kwargs, generation=False, thinking=None)


def encode_prompt(messages, tokenizer: KeyeTokenizer, base_dir: str | None = None,
                  processor: Processor | None = None, thinking: bool | None = None, **vision_kwargs) -> dict:
  """The prompt for generation: the messages followed by `<|im_start|>assistant\\n` (and an empty think
  block when thinking is off; None = decided by a trailing `/no_think` in the last user turn). Same arrays
  as `encode_example`, loss_mask all False."""
  return _encode(messages, tokenizer, base_dir, processor, vision_kwargs, generation=True, thinking=thinking)
