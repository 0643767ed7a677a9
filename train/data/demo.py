"""The synthetic demo dataset: coloured shapes in small images and short videos, learnable by a tiny model.

`write_demo_dataset(out_dir, seed)` writes, in a few seconds on a CPU:

  out_dir/train.jsonl, test.jsonl          manifests; media paths relative to out_dir
  out_dir/{train,test}_{image,video,reasoning,instruction}.jsonl   each split by kind (images and text;
                                           videos; reasoning and instruction prompts for SFT/RL, of which one
                                           in PRETRAIN_SHARE also joins the image/video files: instructions
                                           as they are, reasoning answered directly in /no_think form)
  out_dir/train_caption.jsonl              the image file's captions on their own
  out_dir/media/{train,test}/...           84x84 PNG images and 224x168 2-fps MP4 videos (5-32 frames)
  out_dir/array_record/{train,test}.array_record   the same records with media inline (records.py)
  out_dir/tfds/keye_demo/1.0.0/            the same records as a prepared TFDS dataset (if with_tfds)
  out_dir/train_rl.jsonl                   RL prompts: fresh reasoning questions seen by no other phase
                                           (RL_PROMPTS of them, media in media/rl/, drawn from their own
                                           random stream, so the files above do not change with them)
  out_dir/{train,test}_pairs.jsonl         preference pairs from the instruction records (chosen obeys every
                                           constraint, rejected breaks one; train/data/demo_pairs.py)
  out_dir/info.json                        counts per split and category

Content (an image: 84x84 px = 6x6 patches = 9 LLM tokens, cells of a 3x3 grid are 28 px; a video frame:
224x168 px = 12x16 patches = 48 tokens, black, with one shape filling an 84 px box (3x3 tokens) in one of
its four quadrants):
  caption          describe 1-3 shapes: colour, shape, position
  color/shape/count/position   multiple-choice questions on an image
  video_event      five frames; the shape appears, moves to another quadrant or changes colour at a known
                   frame; what happened? (the outcome: the new shape's colour, the quadrant it moves to, the
                   colour it turns; options in the pool's order like the image questions', the distractors
                   colours not in the video or the other quadrants)
  video_time       ... when did it happen? (read from the frame timestamps; five frames make the options the
                   four possible times 0.5-2.0 s, the correct letter uniform)
  long_video       20-32 frames (10-16 s), one event; when? (for long-context rows; the demo's are too short)
  reasoning        counting with a <think> trace that lists the shapes, the user turn ending in /think:
                   how many shapes in an image drawn like a video frame (224x168, 1-5 shapes in 56 px cells
                   of the 3x3 grid). The answer is the number in digits (no options). Records carry `solution`
                   (the worked answer) and `hints` (five levels, L1 concept .. L5 the solution) for
                   progressive hint sampling
  instruction      describe the image under 1-3 verifiable constraints (IFEval ids: lowercase, no commas,
                   end phrase, keyword, fewer than N words, <<title>>, quotation marks); records carry
                   `instruction_id_list` and `kwargs`, the reply obeys them
  text             text-only multiple choice (which word is a colour / a shape)
Videos are static between events, so the unchanged frames become fast frames and, on the frames' black
background, the frame where a shape appears or moves is a slow frame (the reference's slow/fast
classification marks the change; a colour change mostly stays fast).

Sizes with keye_jax.processing and the demo tokenizer: an image example is ~57 tokens and 36 patches. A
video frame has at least 48 tokens (the reference's VIDEO_MIN_PIXELS) and a fast frame at most 48 (its
budget is 0.3x a slow frame's, floored at that minimum), so a 224x168 frame (6x8 tokens) is the one size
the reference sizing keeps as it is for slow and fast frames alike: no resampling, and the shape boxes lie
on the merged-token grid. A short video example (5 frames) is ~330 tokens and 960 patches, a long one (20-32
frames) ~1150-1800 tokens and 3840-6144 patches.

The CPU demo (configs/demo) scores test.jsonl: the image questions (colour, shape, count, position), the
video questions (event and time, as one `video` category), reasoning and instructions.

Why the videos look like this (measured from the demo's stage-4 checkpoint, video-only, lr 1e-3, rows of
1,024 tokens, 200 fresh items). Two things held the video questions at chance in earlier versions:
- Options in random order. A model that sees the outcome must then find its word among the options to name
  the letter, and the tiny model does not learn that lookup: told the answer in the prompt ("The answer is
  blue. ... A. red ..."), it picks the letter 28% of the time. On the same videos (the whole frame one
  colour turning into another), 150 event-only steps reach 80% with the options in the colours' order and
  25% with them shuffled. The image questions always listed theirs in the pool's order (`_choices`).
- Small shapes. With 1-2 shapes in 56 px cells (2x2 of a frame's 48 tokens) and the options in order,
  "what happened" was 24% after 150 steps and 29% after 450 (half of them "when", 62% by then); one 84 px
  shape in a quadrant: 58% and 54% ("what", "when") after 150 steps, 51% and 88% after 300.
The budget decides the rest: the ~1,500 videos the tiny model needs are learnt when they are spread through
the demo's stage 2 (one example in 12), not from a video-heavy stage at the end (README, "Video").
The answer letters are uniform so that no letter prior inflates the scores.

Every question but captions, reasoning and instructions is multiple choice with four options A-D (chance
25%) answered by one letter, in train and test alike; test records keep `answer` (the letter), `options`
and `category` for exact-match scoring. Reasoning questions are answered with the number (`answer` "2", no
options; scored by the number rule), instruction records by IFEval's checkers.
"""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
from PIL import Image, ImageDraw

from train.data.records import pack_record

SIZE = 84
CELL = 28
BACKGROUND = (20, 20, 28)
# Video frames (and the reasoning images drawn like them, 1-5 shapes in 56 px cells) are black around the
# shapes: the reference's slow/fast classifier leaves out patches that are black in both frames, so an event
# changes a large share of the few patches left and its frame is a slow frame when a shape appears or moves
# (124 of 124 in 200 videos; a colour change keeps brightness and saturation and mostly stays fast, 64 of 76).
# On the images' dark grey all 48 patches count, and most event frames stayed fast.
VIDEO_FRAME = {"size": (224, 168), "cell_px": 56, "left": 28, "background": (0, 0, 0)}
# A video: one shape, QUADRANT_BOX px (3x3 merged tokens), in one quadrant of the frame, token-aligned.
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUADRANT_XY = {"top left": (0, 0), "top right": (140, 0), "bottom left": (0, 84), "bottom right": (140, 84)}
QUADRANT_BOX = 84
SHORT_FRAMES = 5
FPS = 2
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
          "purple": (150, 60, 200), "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
LETTERS = "ABCD"
# Sampling rate of the files (every frame is read); the reference sizing upscales frames to >= 196x196.
VIDEO_KEYS = {"fps": float(FPS)}
VIDEO_CATEGORIES = ("video_event", "video_time", "long_video")
# One in PRETRAIN_SHARE reasoning and instruction records is also in the pre-training (image/video) files.
PRETRAIN_SHARE = 4
# Instruction constraints for the `instruction` category: name -> (IFEval instruction id, how it is asked).
END_PHRASE = "That is all."
INSTRUCTIONS = {
    "lowercase": ("change_case:english_lowercase", "Answer in lowercase letters only."),
    "no_comma": ("punctuation:no_comma", "Do not use any commas."),
    "end": ("startend:end_checker", "End your answer with the phrase: {end}"),
    "keyword": ("keywords:existence", "Include the word {word}."),
    "short": ("length_constraints:number_words", "Answer with less than {limit} words."),
    "title": ("detectable_format:title", "Start with a title in double angular brackets, like <<shapes>>."),
    "quote": ("startend:quotation", "Wrap your whole answer in double quotation marks."),
}
_CONFLICTS = ({"end", "quote"}, {"end", "lowercase"})
# Examples per split and category: many image questions (cheap rows, learnable from the pixels).
TRAIN_COUNTS = {"caption": 1500, "color": 1500, "shape": 1500, "count": 1500, "position": 1500,
                "video_event": 250, "video_time": 250, "long_video": 40, "reasoning": 800, "text": 500,
                "instruction": 600}
# info.json's `version`: raised when the questions change, so that a demo run dir trained on an earlier
# version's dataset is not continued on this one (train/schedule.ensure_demo_data). 2: frame-drawn counting;
# 3: videos of one large shape, event options in the pool's order.
DATA_VERSION = 3
# RL's prompts are reasoning questions of their own: on the train_reasoning.jsonl questions, whose worked
# traces SFT has just learnt, an earlier demo's RL lowered reasoning; fresh ones are what RL is measured on.
RL_PROMPTS = 1000
# long_video is trained on (stage 4) but not scored: 20-32 frames each would dominate every evaluation.
TEST_COUNTS = {"color": 40, "shape": 40, "count": 40, "position": 40, "video_event": 20, "video_time": 20,
               "reasoning": 200, "instruction": 40}


# --------------------------------------------------------------------------------------------------
# Drawing.

def _draw(objects, size: tuple[int, int] = (SIZE, SIZE), cell_px: int = CELL, left: int = 0,
          background: tuple[int, int, int] = BACKGROUND) -> Image.Image:
  """A (width, height) RGB image of (colour, shape, cell) objects on a dark background: a 3x3 grid of
  `cell_px` cells, `left` px from the left edge (an image: 84x84, 28 px cells; a reasoning image: VIDEO_FRAME)."""
  img = Image.new("RGB", size, background)
  d = ImageDraw.Draw(img)
  pad = cell_px // 7
  for color, shape, cell in objects:
    r, c = divmod(cell, 3)
    x0, y0 = left + c * cell_px + pad, r * cell_px + pad
    _shape(d, shape, (x0, y0, x0 + cell_px - 2 * pad, y0 + cell_px - 2 * pad), COLORS[color])
  return img


def _video_frame(obj) -> Image.Image:
  """A video frame: black, with at most one (colour, shape, quadrant) shape filling its quadrant's box."""
  img = Image.new("RGB", VIDEO_FRAME["size"], VIDEO_FRAME["background"])
  if obj is not None:
    color, shape, quadrant = obj
    x, y = QUADRANT_XY[quadrant]
    _shape(ImageDraw.Draw(img), shape, (x + 2, y + 2, x + QUADRANT_BOX - 3, y + QUADRANT_BOX - 3), COLORS[color])
  return img


def _shape(d: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
  x0, y0, x1, y1 = box
  if shape == "circle":
    d.ellipse(box, fill=fill)
  elif shape == "square":
    d.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)
  else:
    d.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)


def _png(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def _mp4(frames: list[Image.Image]) -> bytes:
  import av
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=FPS, options={"crf": "12", "preset": "ultrafast"})
    stream.width, stream.height = frames[0].size
    stream.pix_fmt = "yuv420p"
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(f), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
  return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Questions.

def _name(color, shape) -> str:
  return f"{color} {shape}"


def _where(cell: int) -> str:
  return "the center" if POSITIONS[cell] == "center" else f"the {POSITIONS[cell]}"


def _choices(rng: random.Random, correct: str, pool) -> tuple[list[str], str]:
  """Four options (the correct one and three distinct distractors) listed in the pool's order, as an
  exam lists numbers or times in ascending order, and the correct one's letter."""
  pool = list(dict.fromkeys(pool))
  options = rng.sample([p for p in pool if p != correct], 3) + [correct]
  options.sort(key=pool.index)
  return options, LETTERS[options.index(correct)]


def _mc_text(question: str, options: list[str]) -> str:
  lines = [question] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]
  return "\n".join(lines) + "\nAnswer with the option's letter."


def _scene(rng: random.Random, n: int):
  cells = rng.sample(range(9), n)
  return [(rng.choice(list(COLORS)), rng.choice(SHAPES), cell) for cell in cells]


def _seconds(t: float) -> str:
  return f"{t:.1f} seconds"


class _Builder:
  """Generates records of each category; media bytes are returned alongside, named by the record."""

  def __init__(self, rng: random.Random):
    self.rng = rng

  def image_record(self, category: str):
    rng = self.rng
    if category == "caption":
      objs = _scene(rng, rng.randint(1, 3))
      parts = [f"a {_name(c, s)} in {_where(p)}" for c, s, p in objs]
      text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
      caption = f"{NUMBERS[len(objs)].capitalize()} shape{'s' if len(objs) > 1 else ''}: {text}."
      return objs, "Describe the image.", caption, None, None
    if category == "count":
      objs = _scene(rng, rng.randint(1, 4))
      options, letter = _choices(rng, NUMBERS[len(objs)], NUMBERS[1:] + ("five",))
      return objs, _mc_text("How many shapes are there?", options), letter, options, letter
    objs = _scene(rng, 1 if category != "position" else rng.randint(1, 3))
    color, shape, cell = objs[0]
    if category == "color":
      q, correct, pool = f"What colour is the {shape}?", color, COLORS
      objs = [o for o in objs if o[1] != shape or o is objs[0]]
    elif category == "shape":
      q, correct, pool = f"What shape is the {color} object?", shape, SHAPES + ("star",)
    else:
      q, correct, pool = f"Where is the {_name(color, shape)}?", POSITIONS[cell], POSITIONS
      objs = [objs[0]] + [o for o in objs[1:] if (o[0], o[1]) != (color, shape)]
    options, letter = _choices(rng, correct, pool)
    return objs, _mc_text(q, options), letter, options, letter

  def reasoning_record(self):
    """A counting question with a worked solution that lists the shapes, then counts them, on an image
    drawn like a video frame (224x168, 1-5 shapes): (image, question, '<think>...</think>' answer, the
    number as a string, solution, five hint levels).

    The tiny model learns to reason through this one within the demo's budget, and RL then sharpens it.
    Earlier designs (84x84 images; how many of a colour or a shape, how many more, one more added; shapes
    at the end of a video) were answered by question type, leaving RL nothing to sharpen, and the video
    prompts exceed the demo RL's prompt budget (README). The answer is the number itself, not an option
    letter: with options listed in ascending order, small counts made "B" right for 45% of the items."""
    objs = _scene(self.rng, self.rng.randint(1, 5))
    seen = ", ".join(f"a {_name(c, s)} in {_where(p)}" for c, s, p in objs)
    n = len(objs)
    steps = f"I see {seen}. Counting them gives {n}."
    hints = ["Look at every shape in the image: its colour, its shape and its place.",
             "List the shapes one by one, then count them.",
             "The answer is a count: one number, written in digits.", f"I see {seen}.", steps]
    answer = f"<think>\n{steps}\n</think>\n\n{n}"
    question = "How many shapes are there?\nAnswer with a number. /think"
    return _draw(objs, **VIDEO_FRAME), question, answer, str(n), steps, hints

  def instruction_record(self):
    """A caption request with 1-3 verifiable IFEval constraints and a reply that obeys them:
    (objs, question, answer, instruction_id_list, kwargs)."""
    rng = self.rng
    objs = _scene(rng, rng.randint(1, 3))
    chosen, want = [], rng.randint(1, 3)
    for name in rng.sample(list(INSTRUCTIONS), len(INSTRUCTIONS)):
      if len(chosen) < want and not any({name, other} in _CONFLICTS for other in chosen):
        chosen.append(name)
    word = rng.choice(("scene", "picture", "image"))
    parts = [f"a {_name(c, s)} in {_where(p)}" for c, s, p in objs]
    text = (f"The {word} shows " if "keyword" in chosen else "") + ", ".join(parts) + "."
    text = text[0].upper() + text[1:]
    if "no_comma" in chosen:
      text = text.replace(", ", " and ")
    if "lowercase" in chosen:
      text = text.lower()
    if "title" in chosen:
      text = "<<shapes>>\n" + text
    if "end" in chosen:
      text += " " + END_PHRASE
    if "quote" in chosen:
      text = f'"{text}"'
    limit = len(text.split()) + rng.randint(1, 4)
    asks = [INSTRUCTIONS[n][1].format(word=word, limit=limit, end=END_PHRASE) for n in chosen]
    ids = [INSTRUCTIONS[n][0] for n in chosen]
    kwargs = [{"keywords": [word]} if n == "keyword" else {"relation": "less than", "num_words": limit}
              if n == "short" else {"end_phrase": END_PHRASE} if n == "end" else {} for n in chosen]
    return objs, "Describe the image. " + " ".join(asks), text, ids, kwargs

  def video_record(self, category: str):
    """(frames, question, answer text, options, letter) for video_event, video_time or long_video.

    One shape in one quadrant of a black frame appears, moves to another quadrant or changes colour at
    frame k. video_event asks for the outcome (the new shape's colour, the quadrant it moves to, the colour
    it turns), its four options listed in the pool's order like the image questions'; video_time and
    long_video ask when it happens, the correct letter drawn uniformly among four ascending times (a short
    video's five frames make them always 0.5-2.0 seconds)."""
    rng = self.rng
    n = rng.randint(20, 32) if category == "long_video" else SHORT_FRAMES
    if category == "video_event":
      k = rng.randint(1, n - 1)  # the event's frame: frames k.. show the outcome
    else:
      j = rng.randrange(4)       # the correct letter: j earlier times and 3 - j later ones among the options
      k = rng.randint(j + 1, n - 4 + j)
    color, shape, place = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(QUADRANTS)
    subject = _name(color, shape)
    kind = rng.choice(("appear", "move", "change"))
    if kind == "appear":
      before, after = None, (color, shape, place)
      question, correct, pool = "A new shape appears. What colour is it?", color, COLORS
    elif kind == "move":
      target = rng.choice([q for q in QUADRANTS if q != place])
      before, after = (color, shape, place), (color, shape, target)
      question, correct, pool = f"The {subject} moves. Where does it move to?", target, QUADRANTS
    else:
      new_color = rng.choice([c for c in COLORS if c != color])
      before, after = (color, shape, place), (new_color, shape, place)
      question, correct = f"The {subject} changes colour. What colour does it turn?", new_color
      pool = [c for c in COLORS if c != color]
    frames = [_video_frame(before if i < k else after) for i in range(n)]
    if category == "video_event":
      options, letter = _choices(rng, correct, pool)
      return frames, _mc_text(question, options), letter, options, letter
    earlier = rng.sample(range(1, k), j)
    later = rng.sample(range(k + 1, n), 3 - j)
    options = [_seconds(i / FPS) for i in sorted(earlier + [k] + later)]
    verb = {"appear": "appear", "move": "move", "change": "change colour"}[kind]
    q = _mc_text(f"When does the {subject} {verb}?", options)
    return frames, q, LETTERS[j], options, LETTERS[j]

  def text_record(self):
    rng = self.rng
    kind = rng.choice(("colour", "shape"))
    if kind == "colour":
      correct, pool = rng.choice(list(COLORS)), list(SHAPES) + ["table", "river", "seven", "music"]
    else:
      correct, pool = rng.choice(SHAPES), list(COLORS) + ["table", "river", "seven"]
    options = rng.sample(pool, 3) + [correct]
    rng.shuffle(options)
    letter = LETTERS[options.index(correct)]
    return _mc_text(f"Which word names a {kind}?", options), letter, options, letter


def _message(user_content, answer) -> list[dict]:
  return [{"role": "user", "content": user_content},
          {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _no_think(record: dict) -> dict:
  """A reasoning record asked with /no_think and answered with an empty think block and the number."""
  user, _ = record["messages"]
  content = [dict(e) for e in user["content"]]
  content[-1]["text"] = content[-1]["text"].removesuffix(" /think") + " /no_think"
  return {**record, "messages": _message(content, f"<think>\n\n</think>\n\n{record['answer']}")}


def _records(split: str, counts: dict[str, int], rng: random.Random, media_dir: str, out_dir: str):
  """Yields (record, {relative media path: bytes}) for one split, categories interleaved at random."""
  b = _Builder(rng)
  order = [c for c, n in counts.items() for _ in range(n)]
  rng.shuffle(order)
  for i, category in enumerate(order):
    rid = f"{split}-{i:05d}"
    media = {}
    extra = {}
    if category == "reasoning":
      image, question, answer, number, solution, hints = b.reasoning_record()
      rel = os.path.relpath(os.path.join(media_dir, f"{rid}.png"), out_dir)
      media[rel] = _png(image)
      content = [{"type": "image", "image": rel}, {"type": "text", "text": question}]
      letter, extra = None, {"answer": number, "solution": solution, "hints": hints}
    elif category == "instruction":
      objs, question, answer, ids, kwargs = b.instruction_record()
      rel = os.path.relpath(os.path.join(media_dir, f"{rid}.png"), out_dir)
      media[rel] = _png(_draw(objs))
      content = [{"type": "image", "image": rel}, {"type": "text", "text": question}]
      letter, extra = None, {"instruction_id_list": ids, "kwargs": kwargs}
    elif category in VIDEO_CATEGORIES:
      frames, question, answer, options, letter = b.video_record(category)
      rel = os.path.relpath(os.path.join(media_dir, f"{rid}.mp4"), out_dir)
      media[rel] = _mp4(frames)
      content = [{"type": "video", "video": rel, **VIDEO_KEYS}, {"type": "text", "text": question}]
    elif category == "text":
      question, answer, options, letter = b.text_record()
      content = [{"type": "text", "text": question}]
    else:
      objs, question, answer, options, letter = b.image_record(category)
      rel = os.path.relpath(os.path.join(media_dir, f"{rid}.png"), out_dir)
      media[rel] = _png(_draw(objs))
      content = [{"type": "image", "image": rel}, {"type": "text", "text": question}]
    record = {"id": rid, "category": category, "messages": _message(content, answer)}
    if letter is not None:
      record.update(answer=letter, options=options)
    record.update(extra)
    yield record, media


def write_demo_dataset(out_dir: str, seed: int = 0, with_tfds: bool = True, scale: float = 1.0) -> dict:
  """Writes the demo dataset (see the module docstring); returns {"train": N, "test": N, "path": out_dir}.

  `scale` multiplies the number of examples per category (tests use a small scale)."""
  rng = random.Random(seed)
  out_dir = os.path.abspath(out_dir)
  info, packed = {"version": DATA_VERSION, "seed": seed, "splits": {}}, {}
  for split, counts in (("train", TRAIN_COUNTS), ("test", TEST_COUNTS)):
    counts = {c: max(1, round(n * scale)) for c, n in counts.items()}
    media_dir = os.path.join(out_dir, "media", split)
    os.makedirs(media_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "array_record"), exist_ok=True)
    packed[split] = []
    from array_record.python import array_record_module
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(out_dir, "array_record", f"{split}.array_record"), "group_size:1")
    by_modality = {"image": [], "video": [], "reasoning": [], "instruction": [], "caption": []}
    kept = {"reasoning": 0, "instruction": 0}
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w") as manifest:
      for record, media in _records(split, counts, rng, media_dir, out_dir):
        _write_media(out_dir, media)
        line = json.dumps(record) + "\n"
        manifest.write(line)
        category = record["category"]
        is_video = any(e["type"] == "video" for e in record["messages"][0]["content"])
        if category == "caption":   # also in the image file; on its own for SFT's mix (configs/demo/sft.yaml)
          by_modality["caption"].append(line)
        if category in ("reasoning", "instruction"):
          by_modality[category].append(line)
          # A share also joins pre-training: instructions as they are (alignment RL then sharpens them),
          # reasoning questions answered directly in /no_think form, so the pre-trained model knows
          # the questions but not the worked reasoning that the SFT cold start teaches.
          kept[category] += 1
        if category not in kept or kept[category] % PRETRAIN_SHARE == 1:
          pretrain_line = json.dumps(_no_think(record)) + "\n" if category == "reasoning" else line
          by_modality["video" if is_video else "image"].append(pretrain_line)
        blob = pack_record(record, out_dir)
        writer.write(blob)
        packed[split].append(blob)
    writer.close()
    for modality, lines in by_modality.items():
      if modality == "caption" and not lines:   # the test split has no captions
        continue
      with open(os.path.join(out_dir, f"{split}_{modality}.jsonl"), "w") as f:
        f.writelines(lines)
    info["splits"][split] = {"examples": len(packed[split]), "categories": counts}
  info["rl_prompts"] = write_rl_prompts(out_dir, seed, max(1, round(RL_PROMPTS * scale)))
  if with_tfds:
    from train.data.tfds_export import write_tfds
    write_tfds(packed, os.path.join(out_dir, "tfds"))
  from train.data.demo_pairs import write_demo_pairs   # imports this module: imported here
  info["pairs"] = write_demo_pairs(out_dir, seed)
  with open(os.path.join(out_dir, "info.json"), "w") as f:
    json.dump(info, f, indent=1)
  return {"train": info["splits"]["train"]["examples"], "test": info["splits"]["test"]["examples"],
          "path": out_dir}


def write_rl_prompts(out_dir: str, seed: int = 0, n: int = RL_PROMPTS) -> int:
  """Writes out_dir/train_rl.jsonl: n reasoning records (media in media/rl/) from their own random stream
  (so their number does not change the rest of the dataset); returns n."""
  rng = random.Random(f"rl-{seed}")
  media_dir = os.path.join(out_dir, "media", "rl")
  os.makedirs(media_dir, exist_ok=True)
  path = os.path.join(out_dir, "train_rl.jsonl")
  with open(path + ".tmp", "w") as f:   # renamed when complete: an interrupted write is redone next time
    for record, media in _records("rl", {"reasoning": n}, rng, media_dir, out_dir):
      _write_media(out_dir, media)
      f.write(json.dumps(record) + "\n")
  os.replace(path + ".tmp", path)
  return n


def _write_media(out_dir: str, media: dict[str, bytes]) -> None:
  for rel, data in media.items():
    with open(os.path.join(out_dir, rel), "wb") as f:
      f.write(data)
