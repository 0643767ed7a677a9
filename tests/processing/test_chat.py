"""Tokenizer, chat template and the Example contract."""

import hashlib
import time

import numpy as np
import pytest
from PIL import Image

from keye_jax.processing import KeyeTokenizer, build_demo_tokenizer, encode_example, encode_prompt
from keye_jax.processing.tokenizer import SPECIAL_TOKENS
from tests.processing.media import scene_frames, write_video


def test_demo_tokenizer_is_small_fixed_and_deterministic(tmp_path, tokenizer):
  t0 = time.perf_counter()
  again = build_demo_tokenizer(str(tmp_path))
  assert time.perf_counter() - t0 < 5
  assert again.vocab_size == 1024
  assert [again.token_to_id(n) for n in SPECIAL_TOKENS] == list(range(12))
  build_demo_tokenizer(str(tmp_path / "again"))
  files = [hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest() for d in (tmp_path, tmp_path / "again")]
  assert files[0] == files[1]
  loaded = KeyeTokenizer.from_dir(str(tmp_path))
  text = "What color is the square at 12.5 seconds? /think"
  assert loaded.decode(loaded.encode(text)) == text
  assert loaded.encode(text) == tokenizer.encode(text)


def test_tokenizer_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    KeyeTokenizer.from_dir(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{broken")
  with pytest.raises(ValueError, match="tokenizer.json"):
    KeyeTokenizer.from_dir(str(tmp_path))


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  d = tmp_path_factory.mktemp("chat_media")
  Image.fromarray(scene_frames("static", 1, 150, 200)[0]).save(d / "pic.png")
  write_video(str(d / "clip.mp4"), scene_frames("mixed", 24, 96, 128), fps=8)
  return str(d)


def _rendered(tok, ids):
  return tok.decode(ids)


def test_example_contract_and_counts(tokenizer, media):
  sp = tokenizer.special
  msgs = [
      {"role": "system", "content": "You are helpful."},
      {"role": "user", "content": [{"type": "image", "image": "pic.png"}, {"type": "text", "text": "And this?"},
                                   {"type": "video", "video": "clip.mp4", "fps": 4}]},
      {"role": "assistant", "content": "<think>\nA cut.\n</think>\nTwo scenes."},
      {"role": "user", "content": "Sure? /no_think"},
      {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]},
  ]
  ex = encode_example(msgs, tokenizer, base_dir=media, max_pixels=200_000)
  ids, mask, pos, pv, grids = (ex[k] for k in ("input_ids", "loss_mask", "position_ids", "pixel_values", "grids_hw"))
  assert ids.dtype == np.int32 and mask.dtype == bool and pos.dtype == np.int32
  assert pv.dtype == np.float32 and grids.dtype == np.int32
  assert pos.shape == (3, len(ids)) and pv.shape == (int((grids[:, 0] * grids[:, 1]).sum()), 588)
  # Pads equal the grids: the image first, then one block per frame.
  assert (ids == sp.image_pad).sum() == grids[0, 0] * grids[0, 1] // 4
  assert (ids == sp.video_pad).sum() == (grids[1:, 0] * grids[1:, 1]).sum() // 4
  n_frames = len(grids) - 1
  assert (ids == sp.frame).sum() == n_frames and n_frames == 12         # 3 s at 4 fps
  assert (ids == sp.fast_start).sum() == (ids == sp.fast_end).sum()
  # Per frame: <|frame|>, timestamp text, then its pads (inside fast_start/fast_end for fast frames).
  frame_pos = np.flatnonzero(ids == sp.frame)
  n_fast = 0
  for j, p in enumerate(frame_pos):
    first_pad = p + np.flatnonzero(ids[p:] == sp.video_pad)[0]
    run = np.flatnonzero(ids[first_pad:] != sp.video_pad)[0]
    assert run == grids[1 + j, 0] * grids[1 + j, 1] // 4
    if ids[first_pad - 1] == sp.fast_start:
      assert ids[first_pad + run] == sp.fast_end
      n_fast += 1
  assert 0 < n_fast < n_frames and (ids == sp.fast_start).sum() == n_fast
  # Timestamps as text after every <|frame|>.
  text = _rendered(tokenizer, ids)
  assert "<|frame|>0.0" in text and "<|frame|>0.2" in text
  # The ids are exactly what the tokenizer makes of the rendered string.
  assert tokenizer.encode(text) == ids.tolist()
  # Loss mask: the final assistant turn (with the empty think block /no_think asks for) and its <|im_end|>;
  # the earlier turn lost its thinking (Qwen3's multi-turn rule), so it is context only.
  spans, cur = [], []
  for i in range(len(ids)):
    if mask[i]:
      cur.append(int(ids[i]))
    elif cur:
      spans.append(tokenizer.decode(cur))
      cur = []
  assert spans == ["<think>\n\n</think>\n\nYes.<|im_end|>"]
  assert "<|im_start|>assistant\nTwo scenes.<|im_end|>\n<|im_start|>user\nSure? /no_think" in text
  assert text.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n<|vision_start|>")


def test_prompt_for_generation(tokenizer, media):
  msgs = [{"role": "user", "content": [{"type": "image", "image": "pic.png"}, {"type": "text", "text": "What? /no_think"}]}]
  p = encode_prompt(msgs, tokenizer, base_dir=media)
  assert not p["loss_mask"].any()
  assert tokenizer.decode(p["input_ids"]).endswith("What? /no_think<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
  msgs[0]["content"][1]["text"] = "What? /think"
  p = encode_prompt(msgs, tokenizer, base_dir=media)
  assert tokenizer.decode(p["input_ids"]).endswith("<|im_start|>assistant\n")
  np.testing.assert_array_equal(p["position_ids"][:, -1], p["position_ids"][:, -2] + 1)


def test_bad_messages(tokenizer, media):
  with pytest.raises(ValueError, match="messages\\[0\\].*role"):
    encode_example([{"role": "robot", "content": "hi"}], tokenizer)
  with pytest.raises(ValueError, match="unknown element keys"):
    encode_example([{"role": "user", "content": [{"type": "image", "image": "pic.png", "size": 3}]}], tokenizer,
                   base_dir=media)


# ------------------------------------------------------------------------------------------------
# Thinking modes, multi-turn thinking, round trip, loss mask.

from keye_jax.processing.chat import canonical_messages, decode_conversation, thinking_mode  # noqa: E402
from keye_jax.processing.thinking import split_thinking, thinking_state  # noqa: E402


@pytest.mark.parametrize("text,thinking,answer,state", [
    ("<think>\nlet me see\n</think>\n\nB", "let me see", "B", "thought"),     # /think
    ("<think>\n\n</think>\n\nB", "", "B", "empty"),                           # /no_think
    ("B", "", "B", "none"),                                                   # auto-think, answered at once
    ("<think>\nstill counting: one, two", "still counting: one, two", "", "unclosed"),   # cut off
    ("prefilled thinking\n</think>\n\nC", "prefilled thinking", "C", "thought"),
])
def test_split_thinking_all_modes(text, thinking, answer, state):
  assert split_thinking(text) == (thinking, answer)
  assert thinking_state(text) == state


def _strip_media(messages):
  out = []
  for m in messages:
    c = m["content"]
    if isinstance(c, list):
      c = [{"type": e["type"]} if e.get("type") in ("image", "video") else {"type": "text", "text": e["text"]}
           for e in c]
    out.append({"role": m["role"], "content": c})
  return out


def test_round_trip_and_loss_mask(tokenizer, media):
  msgs = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "image", "image": "pic.png"}, {"type": "text", "text": "Count. /think"}]},
      {"role": "assistant", "content": "<think>\nOne, two.\n</think>\n\nTwo."},
      {"role": "user", "content": "Plain question"},
      {"role": "assistant", "content": "Plain answer."},
      {"role": "user", "content": [{"type": "text", "text": "Colour of the"},
                                   {"type": "video", "video": "clip.mp4", "fps": 2}, {"type": "text", "text": "? /think"}]},
      {"role": "assistant", "content": [{"type": "text", "text": "<think>red\n</think>Red."}]},
  ]
  assert thinking_mode(msgs) == "think"
  canon = canonical_messages(msgs)
  assert canon[2]["content"] == "Two." and canon[4]["content"] == "Plain answer."
  assert canon[6]["content"] == "<think>\nred\n</think>\n\nRed."
  ex = encode_example(msgs, tokenizer, base_dir=media)
  decoded = decode_conversation(ex["input_ids"], tokenizer)
  assert decoded == _strip_media(canon)
  # Encoding the canonical conversation again changes nothing (the template is idempotent).
  again = encode_example(canon, tokenizer, base_dir=media)
  np.testing.assert_array_equal(again["input_ids"], ex["input_ids"])
  # Loss mask, exactly: the think-less earlier answer (kept as the model wrote it) and the whole final turn,
  # think block included, each with its <|im_end|>; the earlier turn whose thinking was dropped is context.
  ids, mask = ex["input_ids"], ex["loss_mask"]
  spans, cur = [], []
  for i in range(len(ids)):
    if mask[i]:
      cur.append(int(ids[i]))
    elif cur:
      spans.append(tokenizer.decode(cur))
      cur = []
  spans.append(tokenizer.decode(cur)) if cur else None
  assert spans == ["Plain answer.<|im_end|>", "<think>\nred\n</think>\n\nRed.<|im_end|>"]
  # The generation prompt for the last turn is a prefix of the training example.
  p = encode_prompt(msgs[:-1], tokenizer, base_dir=media)["input_ids"]
  np.testing.assert_array_equal(ids[:len(p)], p)
  assert mask[len(p):].tolist() == [True] * (len(ids) - len(p) - 1) + [False]   # the final "\n" is not


def test_round_trip_text_only_and_bad_ids(tokenizer):
  msgs = [{"role": "user", "content": "Hi /no_think"}, {"role": "assistant", "content": "Hello."}]
  ids = encode_example(msgs, tokenizer)["input_ids"]
  assert decode_conversation(ids, tokenizer) == [
      {"role": "user", "content": "Hi /no_think"}, {"role": "assistant", "content": "<think>\n\n</think>\n\nHello."}]
  with pytest.raises(ValueError, match="no <\\|im_end\\|>"):
    decode_conversation(ids[:-3], tokenizer)
  with pytest.raises(ValueError, match="not <\\|im_start\\|>"):
    decode_conversation(ids[1:], tokenizer)
  with pytest.raises(ValueError, match="content must be"):
    encode_example([{"role": "user", "content": 3}], tokenizer)
