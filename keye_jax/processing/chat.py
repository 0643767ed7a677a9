"""Chat template and tokenised examples (the Example contract of the data pipeline).

Qwen format: every message is `<|im_start|>{role}\n{content}<|im_end|>\n`, no default system prompt.
Media in content expand in place:
  image: <|vision_start|> <|image_pad|> x tokens <|vision_end|>
  video: <|vision_start|> then per frame <|frame|> + f"{ts:.1f}" (when timestamps exist) +
         slow: <|video_pad|> x tokens    fast: <|fast_start|> <|video_pad|> x tokens <|fast_end|>
         then <|vision_end|>
The text between special tokens is tokenised as one piece, exactly as a tokenizer would cut the rendered
string, and the loss mask is set on the assistant content and its <|im_end|> (not the role header, not the
newline after).

Thinking (keye_jax.processing.thinking; Qwen3's chat template is the reference, see
tests/processing/test_chat_template.py which renders it with jinja2 and compares token ids):
  - the last user turn's suffix picks the mode: `/think`, `/no_think`, or none (auto-think);
  - assistant turns before the last user turn lose their thinking (Qwen3 keeps only the text after
    `</think>` in the context of later turns). Such a turn is context only: no loss, since the model never
    produced that think-less text;
  - assistant turns after the last user turn are rewritten to Qwen3's `<think>\nR\n</think>\n\nA` when they
    hold a think block; the final one, under `/think` or `/no_think`, gets the empty block
    `<think>\n\n</think>\n\n` when it has none (as Qwen3 always does). Deliberate difference from Qwen3: with
    no mode suffix and no think block the turn stays as written (plain chat and pre-training data are not
    padded with empty think blocks; auto-think means the model may answer at once);
  - the generation prompt closes an empty think block when thinking is off (`thinking=False` or a trailing
    `/no_think`); otherwise the model opens `<think>` itself.
`decode_conversation` turns ids back into messages: encode -> decode gives `canonical_messages(messages)`.
"""

from __future__ import annotations

import os

import numpy as np

from keye_jax.processing import vision_process
from keye_jax.processing.errors import MediaError
from keye_jax.processing.positions import position_ids
from keye_jax.processing.processor import Processor
from keye_jax.processing.thinking import EMPTY_THINK, mode_of, qwen3_parts, with_think_block
from keye_jax.processing.tokenizer import KeyeTokenizer

ROLES = ("system", "user", "assistant")


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


def _text_of(content) -> str:
  if isinstance(content, str):
    return content
  return "".join(e.get("text", "") for e in content if isinstance(e, dict) and e.get("type", "text") == "text")


def _check(messages):
  if not isinstance(messages, list) or not messages:
    raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
  for i, m in enumerate(messages):
    where = f"messages[{i}]"
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
      raise ValueError(f"{where}: a message needs 'role' and 'content'")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}: unknown role {m['role']!r}; expected one of {ROLES}")
    if not isinstance(m["content"], (str, list)):
      raise ValueError(f"{where}: content must be a string or a list of elements, got {type(m['content']).__name__}")
    if m["role"] == "assistant" and isinstance(m["content"], list):
      for k, ele in enumerate(m["content"]):
        if isinstance(ele, dict) and (ele.get("type") in ("image", "image_url", "video")
                                      or any(key in ele for key in ("image", "image_url", "video"))):
          raise ValueError(f"{where}.content[{k}]: media in an assistant turn cannot be a training target")


def last_user_index(messages) -> int:
  """Index of the last user turn (-1 if none): Qwen3's `last_query_index`."""
  return max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)


def thinking_mode(messages) -> str:
  """"think", "no_think" or "auto": the suffix of the last user turn."""
  i = last_user_index(messages)
  return mode_of(_text_of(messages[i]["content"])) if i >= 0 else "auto"


def _canonical(messages) -> list[tuple[dict, bool]]:
  """(message, target) pairs after Qwen3's thinking rules (module doc); assistant contents become strings."""
  last_query, mode = last_user_index(messages), thinking_mode(messages)
  out = []
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      out.append((m, False))
      continue
    reasoning, content = qwen3_parts(_text_of(m["content"]))
    target = True
    if i < last_query:
      target = reasoning is None           # thinking dropped: context only
    elif reasoning is not None:
      content = with_think_block(reasoning, content)
    elif i == len(messages) - 1 and mode != "auto":
      content = with_think_block("", content)
    out.append(({**m, "content": content}, target))
  return out


def canonical_messages(messages) -> list[dict]:
  """The conversation as the template renders it (thinking dropped from earlier turns, think blocks in
  Qwen3's layout); what `decode_conversation` returns for `encode_example(messages)`'s ids."""
  _check(messages)
  return [m for m, _ in _canonical(messages)]


def _encode(messages, tokenizer: KeyeTokenizer, base_dir, processor, vision_kwargs, generation: bool,
            thinking) -> dict:
  _check(messages)
  processor = processor or Processor()
  vision_process.check_element(vision_kwargs)
  b = _Builder(tokenizer)
  out = {"pixels": [], "grids": []}
  for i, (m, target) in enumerate(_canonical(messages)):
    where = f"messages[{i}]"
    target = target and not generation
    b.ids([b.sp.im_start])
    b.text(f"{m['role']}\n")
    _content(b, m["content"], target, base_dir, processor, vision_kwargs, out, where)
    b.ids([b.sp.im_end], target)
    b.text("\n")
  if generation:
    b.ids([b.sp.im_start])
    b.text("assistant\n")
    if thinking is None:
      thinking = thinking_mode(messages) != "no_think"
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
  its <|im_end|>, except earlier turns whose thinking was dropped), position_ids (3, S) int32, pixel_values (P, 588) float32, grids_hw (n, 2) int32.

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


def decode_conversation(ids, tokenizer: KeyeTokenizer) -> list[dict]:
  """Ids of a rendered conversation -> messages. A media span becomes {"type": "image"} or {"type": "video"}
  (paths are not in the ids); a content without media is a string, otherwise a list of elements.
  Raises ValueError when the ids are not a sequence of whole `<|im_start|>role\n...<|im_end|>\n` turns."""
  sp = tokenizer.special
  ids = [int(i) for i in ids]
  messages, i, n = [], 0, len(ids)
  while i < n:
    if ids[i] != sp.im_start:
      raise ValueError(f"decode_conversation: token {i} is not <|im_start|>")
    try:
      end = ids.index(sp.im_end, i)
    except ValueError:
      raise ValueError(f"decode_conversation: the turn at token {i} has no <|im_end|>") from None
    body, elements, text = ids[i + 1:end], [], []
    j = 0
    while j < len(body):
      if body[j] == sp.vision_start:
        k = body.index(sp.vision_end, j)
        kind = "video" if sp.frame in body[j:k] or sp.video_pad in body[j:k] else "image"
        if text:
          elements.append({"type": "text", "text": tokenizer.decode(text)})
          text = []
        elements.append({"type": kind})
        j = k + 1
      else:
        text.append(body[j])
        j += 1
    if text:
      elements.append({"type": "text", "text": tokenizer.decode(text)})
    first = elements[0] if elements else {"type": "text", "text": ""}
    if first.get("type") != "text" or "\n" not in first["text"]:
      raise ValueError(f"decode_conversation: the turn at token {i} has no role line")
    role, _, rest = first["text"].partition("\n")
    elements = ([{"type": "text", "text": rest}] if rest else []) + elements[1:]
    content = (elements[0]["text"] if len(elements) == 1 and elements[0]["type"] == "text" else
               "" if not elements else elements)
    messages.append({"role": role, "content": content})
    i = end + 1
    if i < n and tokenizer.decode(ids[i:i + 1]) == "\n":
      i += 1
  return messages
