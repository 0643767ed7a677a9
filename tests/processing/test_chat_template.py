"""Our chat template against Qwen3's published one (tests/processing/data/qwen3_chat_template.jinja, see the
README there): rendered with jinja2 the way transformers' apply_chat_template renders it, tokenised with the
same tokenizer, compared id for id with keye_jax.processing.chat."""

from __future__ import annotations

import os

import jinja2
import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from keye_jax.processing import vision_process
from keye_jax.processing.chat import encode_example, encode_prompt
from keye_jax.processing.processor import Processor
from tests.processing.media import scene_frames, write_video

DATA = os.path.join(os.path.dirname(__file__), "data")
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def template():
  # transformers' apply_chat_template: an immutable sandbox with trim_blocks and lstrip_blocks.
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
  with open(os.path.join(DATA, "qwen3_chat_template.jinja")) as f:
    return env.from_string(f.read())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  d = tmp_path_factory.mktemp("template_media")
  Image.fromarray(scene_frames("static", 1, 150, 200)[0]).save(d / "pic.png")
  write_video(str(d / "clip.mp4"), scene_frames("mixed", 16, 96, 128), fps=8)
  return str(d)


def _flatten(messages):
  """List contents -> strings with one placeholder per medium, as Keye's processor template writes them
  (Qwen3's text template renders a non-string content as '')."""
  out = []
  for m in messages:
    c = m["content"]
    if isinstance(c, list):
      c = "".join(e["text"] if e.get("type", "text") == "text" else
                  VIDEO_PLACEHOLDER if e["type"] == "video" else IMAGE_PLACEHOLDER for e in c)
    out.append({"role": m["role"], "content": c})
  return out


def _expand(text, messages, base_dir):
  """The processor's step: each placeholder becomes the medium's tokens (preprocessing.md, "Prompt layout")."""
  proc = Processor()
  for m in messages:
    for e in m["content"] if isinstance(m["content"], list) else []:
      if e.get("type") == "image":
        _, grid = proc.image(vision_process.fetch_image({**e, "image": os.path.join(base_dir, e["image"])}))
        expanded = "<|vision_start|>" + "<|image_pad|>" * (int(grid[0] * grid[1]) // 4) + "<|vision_end|>"
        text = text.replace(IMAGE_PLACEHOLDER, expanded, 1)
      elif e.get("type") == "video":
        frames, info = vision_process.fetch_video({**e, "video": os.path.join(base_dir, e["video"])})
        _, grids = proc.video(frames, **info)
        parts = ["<|vision_start|>"]
        for ts, kind, g in zip(info["timestamps"], info["frame_types"], grids):
          pads = "<|video_pad|>" * (int(g[0] * g[1]) // 4)
          parts.append(f"<|frame|>{float(ts):.1f}" + (f"<|fast_start|>{pads}<|fast_end|>" if kind == 1 else pads))
        parts.append("<|vision_end|>")
        text = text.replace(VIDEO_PLACEHOLDER, "".join(parts), 1)
  return text


def _reference_ids(template, tokenizer, messages, base_dir=None, **kwargs):
  text = template.render(messages=_flatten(messages), **kwargs)
  return tokenizer.encode(_expand(text, messages, base_dir)), text


CONVERSATIONS = {
    "system_user_assistant_think": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "How many dots? /think"},
        {"role": "assistant", "content": "<think>\nI count two, then one more.\n</think>\n\nThree."}],
    "no_think_plain_answer": [   # /no_think: both write the empty think block before the answer
        {"role": "user", "content": "What colour is the sky? /no_think"},
        {"role": "assistant", "content": "Blue."}],
    "think_block_unnormalised": [   # newlines around the reasoning are normalised the same way
        {"role": "user", "content": "Which is bigger, 3 or 5?/think"},
        {"role": "assistant", "content": "<think>five is more\n\n\n</think>5"}],
    "multi_turn_drops_earlier_thinking": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Count the squares. /think"},
        {"role": "assistant", "content": "<think>\nOne, two.\n</think>\n\nTwo."},
        {"role": "user", "content": "And circles? /no_think"},
        {"role": "assistant", "content": "None."},
        {"role": "user", "content": "Sum of both? /think"},
        {"role": "assistant", "content": "<think>\n2 + 0 = 2\n</think>\n\n2"}],
    "auto_think_that_thought": [
        {"role": "user", "content": "Is 7 prime?"},
        {"role": "assistant", "content": "<think>\nNo divisor below 3.\n</think>\n\nYes."}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_conversation_ids_equal_qwen3(template, tokenizer, name):
  messages = CONVERSATIONS[name]
  ref, text = _reference_ids(template, tokenizer, messages)
  ours = encode_example(messages, tokenizer)["input_ids"].tolist()
  assert ours == ref, (tokenizer.decode(ours), text)


def test_auto_think_plain_answer_differs_on_purpose(template, tokenizer):
  """Qwen3 writes an empty think block before every final answer, even when the user asked for no mode.
  We keep a mode-less, think-less answer as written: plain chat and the pre-training sources are
  conversations too, and padding each with `<think>\\n\\n</think>\\n\\n` would spend 4 tokens per example on
  a block the auto-think model may skip. Everything else is the same."""
  messages = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "A red square."}]
  ref, text = _reference_ids(template, tokenizer, messages)
  assert "<think>\n\n</think>\n\nA red square." in text
  ours = encode_example(messages, tokenizer)["input_ids"].tolist()
  assert ours == tokenizer.encode(text.replace("<think>\n\n</think>\n\n", ""))


@pytest.mark.parametrize("suffix,enable_thinking,thinking", [
    (" /think", None, None), (" /no_think", False, None), ("", None, None), ("", False, False)])
def test_generation_prompt_ids_equal_qwen3(template, tokenizer, suffix, enable_thinking, thinking):
  messages = [{"role": "system", "content": "You are helpful."},
              {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "<think>\nhi\n</think>\n\nHello."},
              {"role": "user", "content": "How many shapes?" + suffix}]
  kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
  ref, text = _reference_ids(template, tokenizer, messages, add_generation_prompt=True, **kwargs)
  ours = encode_prompt(messages, tokenizer, thinking=thinking)["input_ids"].tolist()
  assert ours == ref, (tokenizer.decode(ours), text)


@pytest.mark.parametrize("suffix,final", [
    ("/think", "<think>\nThe square is red, the circle blue.\n</think>\n\nB"),
    (" /no_think", "B")])
def test_images_and_videos_ids_equal_qwen3(template, tokenizer, media, suffix, final):
  messages = [
      {"role": "user", "content": [{"type": "image", "image": "pic.png"}, {"type": "text", "text": "What is this?"}]},
      {"role": "assistant", "content": "<think>\nshapes\n</think>\n\nShapes."},
      {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                   {"type": "video", "video": "clip.mp4", "fps": 4},
                                   {"type": "image", "image": "pic.png"},
                                   {"type": "text", "text": "Which colour? " + suffix}]},
      {"role": "assistant", "content": final}]
  ref, _ = _reference_ids(template, tokenizer, messages, base_dir=media)
  ex = encode_example(messages, tokenizer, base_dir=media)
  assert ex["input_ids"].tolist() == ref
  sp = tokenizer.special
  assert (ex["input_ids"] == sp.frame).sum() > 0 and (ex["input_ids"] == sp.image_pad).sum() > 0
  prompt = encode_prompt(messages[:-1], tokenizer, base_dir=media)
  ref_prompt, _ = _reference_ids(template, tokenizer, messages[:-1], base_dir=media, add_generation_prompt=True,
                                 **({"enable_thinking": False} if "no_think" in suffix else {}))
  assert prompt["input_ids"].tolist() == ref_prompt
  np.testing.assert_array_equal(ex["input_ids"][:len(ref_prompt)], ref_prompt)   # the prompt is a prefix
