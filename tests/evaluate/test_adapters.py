"""Each benchmark adapter end to end on a few records written in the published format, through the harness
with a scripted sampler (answers chosen per question), plus resuming an interrupted run."""

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from keye_jax.evaluate import run_eval
from keye_jax.evaluate.harness import read_predictions
from keye_jax.generate import Generation


def _png(color=(200, 30, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (28, 28), color).save(buf, format="PNG")
  return buf.getvalue()


def _text(messages) -> str:
  return "".join(e.get("text", "") for m in messages for e in m["content"] if e.get("type") == "text")


class Scripted:
  """Stands in for the Sampler: replies by the first key found in the prompt text; checks the media."""

  def __init__(self, replies: dict[str, str]):
    self.replies, self.calls, self.media, self.frames = replies, 0, [], []

  def generate(self, prompts, params):
    self.calls += 1
    out = []
    for messages in prompts:
      for m in messages:
        for e in m["content"]:
          for key in ("image", "video"):
            if key in e:
              paths = e[key] if isinstance(e[key], list) else [e[key]]
              assert all(os.path.exists(p) for p in paths), e
              self.media.append(key)
              if isinstance(e[key], list):
                self.frames.append([os.path.basename(p) for p in paths])
      text = _text(messages)
      reply = next((r for k, r in self.replies.items() if k in text), "no idea")
      out.append(Generation(tokens=[1], logprobs=[0.0], text=reply, finish_reason="stop"))
    return out


def _run(name, data, out, replies, **kw):
  sampler = Scripted(replies)
  kw.setdefault("checkpoint", "scripted")
  res = run_eval(None, None, name, str(data), str(out), sampler=sampler, encode=lambda m: m, batch_size=2, **kw)
  results = json.loads((out / "results.json").read_text())
  assert (out / "results.md").read_text().startswith(f"# {res['benchmark']}")
  return res, results, sampler


def test_mmmu_validation_parquet(tmp_path):
  rows = [
      dict(id="validation_Art_Theory_1", question="Which painter made <image 1>?", options="['Monet', 'Dali', 'Goya', 'Klee']",
           explanation="", image_1={"bytes": _png(), "path": "a.png"}, image_2=None, img_type="['Paintings']",
           answer="B", topic_difficulty="Easy", question_type="multiple-choice", subfield="Art History"),
      dict(id="validation_Art_Theory_2", question="Which style is <image 1>?", options="['Cubism', 'Fauvism']",
           explanation="", image_1={"bytes": _png((0, 0, 255)), "path": "b.png"}, image_2=None, img_type="[]",
           answer="A", topic_difficulty="Hard", question_type="multiple-choice", subfield="Art History"),
      dict(id="validation_Physics_3", question="What is the speed in m/s?", options="[]", explanation="",
           image_1={"bytes": _png(), "path": "c.png"}, image_2=None, img_type="[]", answer="['12.5', '12.50']",
           topic_difficulty="Medium", question_type="open", subfield="Mechanics"),
  ]
  for subject, part in (("Art_Theory", rows[:2]), ("Physics", rows[2:])):
    os.makedirs(tmp_path / "mmmu" / subject)
    pq.write_table(pa.Table.from_pylist(part), tmp_path / "mmmu" / subject / "validation-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(part), tmp_path / "mmmu" / subject / "dev-00000-of-00001.parquet")
  replies = {"Which painter": "<think>Monet? No.</think>The answer is (B) Dali.", "Which style": "Fauvism",
             "speed": "v = 25/2 so the answer is 12.5 m/s"}
  res, results, sampler = _run("mmmu_val", tmp_path / "mmmu", tmp_path / "out", replies)
  assert res == {"benchmark": "mmmu", "accuracy": pytest.approx(2 / 3), "n": 3}
  assert results["categories"]["subject"]["Art_Theory"] == {"accuracy": 0.5, "n": 2}
  assert results["categories"]["discipline"]["Science"]["accuracy"] == 1.0
  assert sampler.media == ["image"] * 3


def test_mmmu_auto_converted_layout_scores_validation_only(tmp_path):
  """`Subject/validation/0000.parquet` next to `Subject/dev/0000.parquet`: the split is a folder, not a file
  name prefix (issue 19: dev rows were scored too)."""
  def row(i, split):
    return dict(id=f"{split}_Math_{i}", question=f"Question {split} {i}?", options="['1', '2']", explanation="",
                image_1={"bytes": _png(), "path": "a.png"}, image_2=None, img_type="[]", answer="A",
                topic_difficulty="Easy", question_type="multiple-choice", subfield="x")
  for split, n in (("validation", 2), ("dev", 5), ("test", 3)):
    os.makedirs(tmp_path / "mmmu" / "Math" / split)
    pq.write_table(pa.Table.from_pylist([row(i, split) for i in range(n)]),
                   tmp_path / "mmmu" / "Math" / split / "0000.parquet")
  res, results, _ = _run("mmmu", tmp_path / "mmmu", tmp_path / "out", {"Question validation": "A"})
  assert res == {"benchmark": "mmmu", "accuracy": 1.0, "n": 2}
  ids = [json.loads(x)["id"] for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  assert ids == ["validation_Math_0", "validation_Math_1"]
  # Only dev and test: an error naming what was found, not a silent score of the wrong split.
  import shutil
  shutil.rmtree(tmp_path / "mmmu" / "Math" / "validation")
  with pytest.raises(ValueError, match="no validation split .*found dev, test"):
    run_eval(None, None, "mmmu", str(tmp_path / "mmmu"), str(tmp_path / "out2"), sampler=Scripted({}),
             encode=lambda m: m, checkpoint="x")
  assert not (tmp_path / "out2").exists()


def test_video_mmmu_parquet_and_videos(tmp_path):
  root = tmp_path / "vmmmu"
  for track, rows in {
      "Perception": [dict(id="validation_Art_1", question="What colour is the slide title?",
                          options=["red", "blue", "green", "black"], answer="A", question_type="multiple-choice",
                          link_selected="x", image=None)],
      "Adaptation": [dict(id="validation_Math_2", question="Compute the area of <image 1>.", options=[],
                          answer="12", question_type="open", link_selected="x",
                          image={"bytes": _png(), "path": "q.png"}),
                     dict(id="validation_Math_3", question="Which theorem applies?", options=["Pythagoras", "Bayes"],
                          answer="A", question_type="multiple-choice", link_selected="x", image=None)]}.items():
    os.makedirs(root / track)
    pq.write_table(pa.Table.from_pylist(rows), root / track / "test-00000-of-00001.parquet")
  for vid, folder in (("validation_Art_1", "Art"), ("validation_Math_2", "Science"), ("validation_Math_3", "Science")):
    os.makedirs(root / "videos" / folder, exist_ok=True)
    (root / "videos" / folder / f"{vid}.mp4").write_bytes(b"\x00")
  replies = {"slide title": "A", "area": "The area is 12 square units.", "theorem": "\\boxed{B}"}
  res, results, sampler = _run("video_mmmu", root, tmp_path / "out", replies)
  assert res["n"] == 3 and res["accuracy"] == pytest.approx(2 / 3)
  assert results["categories"]["track"] == {"Adaptation": {"accuracy": 0.5, "n": 2},
                                            "Perception": {"accuracy": 1.0, "n": 1}}
  assert sorted(sampler.media) == ["image", "video", "video", "video"]


def test_mvbench_json_and_video_folders(tmp_path):
  root = tmp_path / "mvbench"
  os.makedirs(root / "json")
  (root / "json" / "action_count.json").write_text(json.dumps([
      {"video": "v1.mp4", "question": "How many times does the person jump?", "candidates": ["2", "3", "4"],
       "answer": "3"},
      {"video": "v2.mp4", "question": "How many times does the ball bounce?", "candidates": ["5", "1"],
       "answer": "5"}]))
  (root / "json" / "episodic_reasoning.json").write_text(json.dumps([
      {"video": "clip_a", "question": "Why does Ross leave?", "candidates": ["He is late", "He is hungry"],
       "answer": "He is hungry", "start": 1.0, "end": 4.5}]))
  os.makedirs(root / "video" / "perception" / "videos")
  for v in ("v1.mp4", "v2.mp4"):
    (root / "video" / "perception" / "videos" / v).write_bytes(b"\x00")
  frames = root / "video" / "tvqa" / "frames_fps3_hq" / "clip_a"
  os.makedirs(frames)
  for i in range(1, 31):  # ten seconds at MVBench's 3 fps, numbered from 1
    (frames / f"{i:05d}.jpg").write_bytes(_png())
  replies = {"jump": "Best option:(B) 3", "bounce": "(B)", "Ross": "He is hungry."}
  res, results, sampler = _run("mvbench", root, tmp_path / "out", replies)
  assert res["accuracy"] == pytest.approx(2 / 3)
  assert results["categories"]["task"]["episodic_reasoning"]["accuracy"] == 1.0
  assert sampler.media == ["video"] * 3
  # start 1.0 s, end 4.5 s: frames round(3.0) = 3 .. round(13.5) = 14, as MVBench's read_frame bounds them.
  assert sampler.frames == [[f"{i:05d}.jpg" for i in range(3, 15)]]


def test_mvbench_missing_video_is_an_item_error(tmp_path):
  root = tmp_path / "mvbench"
  os.makedirs(root / "json")
  os.makedirs(root / "video")
  (root / "json" / "action_count.json").write_text(json.dumps([
      {"video": "gone.mp4", "question": "How many jumps?", "candidates": ["2", "3"], "answer": "3"},
      {"video": "here.mp4", "question": "How many bounces?", "candidates": ["5", "1"], "answer": "5"}]))
  (root / "video" / "here.mp4").write_bytes(b"\x00")
  res, results, sampler = _run("mvbench", root, tmp_path / "out", {"bounces": "A"})
  assert res["n"] == 2 and res["accuracy"] == 0.5 and results["errors"] == 1
  lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  assert "gone.mp4 not found" in lines[0]["error"] and sampler.media == ["video"]


def test_demo_benchmark_and_resume(tmp_path):
  from train.data.demo import write_demo_dataset
  write_demo_dataset(str(tmp_path / "demo"), seed=0, with_tfds=False, scale=0.05)
  records = [json.loads(x) for x in (tmp_path / "demo" / "test.jsonl").read_text().splitlines()]
  # The items with an answer only (instruction items are scored by IFEval, tested in test_ifeval.py).
  records = [r for r in records if "answer" in r]
  # The fake sampler answers by question text: keep one record per text (counting questions repeat).
  records = list({_text([m for m in r["messages"] if m["role"] == "user"]): r for r in records}.values())
  (tmp_path / "demo" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  # Right on even records, wrong on odd ones.
  replies = {}
  for i, r in enumerate(records):
    q = _text([m for m in r["messages"] if m["role"] == "user"])
    # Reasoning items are answered by a number, the others by an option letter.
    wrong = str(int(r["answer"]) + 1) if r["answer"].isdigit() else "ABCD"[("ABCD".index(r["answer"]) + 1) % 4]
    replies[q] = f"<think>hmm</think>{r['answer'] if i % 2 == 0 else wrong}"
  out = tmp_path / "out"
  # An interrupted run: two items finished, then a torn line.
  res, _, _ = _run("demo", tmp_path / "demo", out, replies, limit=2)
  with open(out / "predictions.jsonl", "a") as f:
    f.write('{"id": "test-000')
  res, results, sampler = _run("demo", tmp_path / "demo", out, replies)
  n = len(records)
  assert res["n"] == n and sampler.calls == -(-(n - 2) // 2)
  assert res["accuracy"] == pytest.approx(np.mean([i % 2 == 0 for i in range(n)]))
  from keye_jax.evaluate.demo import CATEGORY
  assert set(results["categories"]["category"]) == {CATEGORY.get(r["category"], r["category"]) for r in records}
  assert "video" in results["categories"]["category"]
  assert len(read_predictions(str(out / "predictions.jsonl"))) == n
  assert set(sampler.media) == {"image", "video"}
