"""The demo dataset: deterministic, the same records in all three forms, well-formed multiple-choice test
questions, and labels that agree with the pixels (checked numerically on images and video frames)."""

import json
import os
import re

import av
import numpy as np
import pytest
from PIL import Image

from tests.data.fakes import FakeTokenizer, fake_encode
from train.data.check import check_source
from train.data.demo import CELL, COLORS, FPS, POSITIONS, write_demo_dataset
from train.data.records import unpack_record
from train.data.sources import open_source

SCALE = 0.1


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("demo"))
  return write_demo_dataset(out, seed=0, scale=SCALE)


def read(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_counts_and_three_identical_forms(demo):
  root = demo["path"]
  for split in ("train", "test"):
    manifest = read(os.path.join(root, f"{split}.jsonl"))
    assert len(manifest) == demo[split]
    ar = open_source(os.path.join(root, "array_record", f"{split}.array_record"))
    tf = open_source(os.path.join(root, "tfds", "keye_demo", "1.0.0")) if split == "train" else None
    assert len(ar) == demo[split]
    for i in (0, len(manifest) // 2, len(manifest) - 1):
      for source in filter(None, (ar, tf)):
        record, blobs = unpack_record(source[i]["data"])
        assert record["id"] == manifest[i]["id"] and record["category"] == manifest[i]["category"]
        for m_ours, m_theirs in zip(record["messages"], manifest[i]["messages"]):
          for a, b in zip(m_ours["content"], m_theirs["content"]):
            if a["type"] == "text":
              assert a == b
            else:
              with open(os.path.join(root, b[b["type"]]), "rb") as f:
                assert blobs[a[a["type"]].removeprefix("blob:")] == f.read()
  assert len(open_source(os.path.join(root, "tfds", "keye_demo", "1.0.0") + ":test")) == demo["test"]
  info = json.load(open(os.path.join(root, "info.json")))
  assert set(info["splits"]["train"]["categories"]) >= {"caption", "video_time", "long_video", "reasoning"}


def test_same_seed_same_dataset(demo, tmp_path):
  again = write_demo_dataset(str(tmp_path), seed=0, scale=SCALE, with_tfds=False)
  assert open(os.path.join(demo["path"], "train.jsonl")).read() == open(os.path.join(again["path"], "train.jsonl")).read()
  png = read(os.path.join(again["path"], "test.jsonl"))
  first_image = next(r for r in png if r["messages"][0]["content"][0]["type"] == "image")
  rel = first_image["messages"][0]["content"][0]["image"]
  assert open(os.path.join(demo["path"], rel), "rb").read() == open(os.path.join(again["path"], rel), "rb").read()


def test_questions_are_four_way_multiple_choice(demo):
  for split in ("train", "test"):
    for r in read(os.path.join(demo["path"], f"{split}.jsonl")):
      user, assistant = r["messages"]
      answer = assistant["content"][0]["text"]
      if r["category"] == "instruction":
        continue
      if r["category"] == "reasoning":   # answered by the number itself, thinking first
        question = user["content"][-1]["text"]
        assert r["answer"].isdigit() and "options" not in r, r
        assert question.endswith("Answer with a number. /think") and "\nA. " not in question
        assert answer.startswith("<think>\n") and answer.endswith(f"</think>\n\n{r['answer']}")
        continue
      if split == "test" or r["category"] not in ("caption",):
        assert r["answer"] in "ABCD" and len(set(r["options"])) == 4, r
        assert answer == r["answer"] or (answer.startswith("<think>") and answer.endswith(r["answer"]))
        question = user["content"][-1]["text"]
        for letter, option in zip("ABCD", r["options"]):
          assert f"\n{letter}. {option}\n" in question


def nearest_colour(rgb):
  names = list(COLORS)
  d = [np.abs(np.array(COLORS[n]) - rgb).sum() for n in names]
  return names[int(np.argmin(d))]


def test_labels_agree_with_pixels(demo):
  """Colour and position questions against the image, event times against the video frames."""
  root = demo["path"]
  checked = {"color": 0, "position": 0, "video_time": 0}
  for r in read(os.path.join(root, "test.jsonl")) + read(os.path.join(root, "train.jsonl")):
    media = r["messages"][0]["content"][0]
    correct = r["options"][ord(r["answer"]) - 65] if "options" in r else None
    if r["category"] == "color":
      img = np.asarray(Image.open(os.path.join(root, media["image"]))).astype(int)
      fg = img[(img - [20, 20, 28]).__abs__().sum(-1) > 60]
      assert nearest_colour(np.median(fg, axis=0)) == correct
    elif r["category"] == "position" and len(r["options"]) == 4:
      name = r["messages"][0]["content"][1]["text"].split("\n")[0][len("Where is the "):-1]
      colour = name.split()[0]
      img = np.asarray(Image.open(os.path.join(root, media["image"]))).astype(int)
      mask = (np.abs(img - COLORS[colour]).sum(-1) < 40)
      r0, c0 = divmod(POSITIONS.index(correct), 3)
      assert mask[r0 * CELL:(r0 + 1) * CELL, c0 * CELL:(c0 + 1) * CELL].sum() > 100  # the shape is there
    elif r["category"] == "video_time":
      with av.open(os.path.join(root, media["video"])) as c:
        frames = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)]
      change = next(i for i, f in enumerate(frames) if (np.abs(f - frames[0]).sum(-1) > 60).sum() > 50)
      assert correct == f"{change / FPS:.1f} seconds"
    else:
      continue
    checked[r["category"]] += 1
  assert all(n >= 3 for n in checked.values()), checked


def test_demo_decodes_cleanly(demo):
  out = check_source(os.path.join(demo["path"], "array_record", "test.array_record"), FakeTokenizer(),
                     encode=fake_encode)
  assert out == {"total": demo["test"], "ok": demo["test"], "bad": {}}


def test_demo_decodes_cleanly_with_the_real_preprocessing(demo):
  """keye_jax.processing + the demo tokenizer: every test example decodes, fits the documented sizes."""
  from train.data.check import default_tokenizer
  from train.data.decode import Decoder
  tokenizer = default_tokenizer()
  out = check_source(os.path.join(demo["path"], "test.jsonl"), tokenizer)
  assert out == {"total": demo["test"], "ok": demo["test"], "bad": {}}
  source = open_source(os.path.join(demo["path"], "array_record", "test.array_record"))
  decode = Decoder(tokenizer, 0)
  records = read(os.path.join(demo["path"], "test.jsonl"))
  for i, r in enumerate(records):
    ex = decode(source[i])
    n, p = len(ex["input_ids"]), len(ex["pixel_values"])
    limit = {"long_video": (1900, 6400), "video_event": (530, 1600), "video_time": (530, 1600),
             "reasoning": (600, 1600), "instruction": (160, 36)}
    assert n <= limit.get(r["category"], (130, 36))[0] and p <= limit.get(r["category"], (130, 36))[1]
    assert tokenizer.decode(ex["input_ids"][ex["loss_mask"]]).startswith(r["messages"][1]["content"][0]["text"])


def test_instruction_replies_obey_their_constraints(demo):
  """Every instruction record's reply passes lm-eval's IFEval checkers (strict) on its own constraints."""
  from keye_jax.evaluate import ifeval
  n = 0
  for split in ("train", "test"):
    for r in read(os.path.join(demo["path"], f"{split}_instruction.jsonl")):
      reply = r["messages"][1]["content"][0]["text"]
      assert 1 <= len(r["instruction_id_list"]) <= 3
      assert ifeval.check(reply, r["instruction_id_list"], r["kwargs"])["strict"], r
      n += 1
  assert n > 0


def test_reasoning_records_carry_solution_and_hints(demo):
  for r in read(os.path.join(demo["path"], "train_reasoning.jsonl")):
    assert len(r["hints"]) == 5 and r["hints"][-1] == r["solution"]
    assert r["messages"][1]["content"][0]["text"] == f"<think>\n{r['solution']}\n</think>\n\n{r['answer']}"


def test_rl_prompts_are_fresh_reasoning_questions(demo, tmp_path):
  """RL's prompts are reasoning records of their own: none shares an id with the questions SFT's traces
  are built from, nor an image beyond the few small scenes that any two draws share, and writing them
  again gives the same file."""
  from train.data.demo import write_rl_prompts
  root = demo["path"]
  rl, sft = read(os.path.join(root, "train_rl.jsonl")), read(os.path.join(root, "train_reasoning.jsonl"))
  assert len(rl) == json.load(open(os.path.join(root, "info.json")))["rl_prompts"] > 0
  assert {r["category"] for r in rl} == {"reasoning"}
  assert all(len(r["hints"]) == 5 and r["answer"].isdigit() for r in rl)

  def media(r):
    e = r["messages"][0]["content"][0]
    with open(os.path.join(root, e[e["type"]]), "rb") as f:
      return f.read()
  assert not {r["id"] for r in rl} & {r["id"] for r in sft}
  shared = {media(r) for r in rl} & {media(r) for r in sft}
  # Only small scenes repeat (a one-shape image is one of 162): every larger scene is drawn afresh.
  assert all(int(r["answer"]) <= 2 for r in rl if media(r) in shared)
  assert write_rl_prompts(str(tmp_path), seed=0, n=len(rl)) == len(rl)
  assert open(tmp_path / "train_rl.jsonl").read() == open(os.path.join(root, "train_rl.jsonl")).read()


def test_reasoning_answers_are_the_counts_the_solutions_state():
  """The worked solution lists every shape, then states the count, which is the answer."""
  import random
  from train.data.demo import _Builder
  b = _Builder(random.Random(0))
  for _ in range(40):
    image, question, answer, number, solution, hints = b.reasoning_record()
    listed = len(re.findall(r"\ba (?:\w+) (?:circle|square|triangle)\b", solution))
    assert re.findall(r"\d+", solution)[-1] == number == str(listed), solution
    assert answer.endswith(f"</think>\n\n{number}") and hints[-1] == solution
    assert image.size == (224, 168) and question.startswith("How many shapes are there?")


def test_a_dataset_written_by_an_earlier_version_is_refused_by_the_demo(demo, tmp_path):
  """The demo schedule writes its dataset when missing, leaves a current one alone, and refuses one written
  by an earlier version of the demo (its questions differ) with one line naming the dir."""
  import shutil
  from keye_jax.config import ConfigError
  from train.schedule import ensure_demo_data
  root = tmp_path / "data"
  shutil.copytree(demo["path"], root, ignore=shutil.ignore_patterns("tfds", "array_record", "media"))
  (root / "tokenizer").mkdir()
  (root / "tokenizer" / "tokenizer.json").write_text("{}")   # present: not rebuilt
  before = (root / "info.json").read_text()
  ensure_demo_data(str(root))
  assert (root / "info.json").read_text() == before
  info = json.loads(before)
  del info["version"]   # as written before versions
  (root / "info.json").write_text(json.dumps(info))
  with pytest.raises(ConfigError, match=f"{root}: written by an earlier version of the demo"):
    ensure_demo_data(str(root))
