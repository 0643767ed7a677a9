"""MIA-Bench scored as the official evaluation does (apple/ml-mia-bench evaluation.ipynb): the judge's total
score per item, the judge shown the image, replies parsed leniently, unscorable items counted."""

import io
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from keye_jax.evaluate import run_eval
from keye_jax.evaluate.items import Item
from keye_jax.evaluate.mia_bench import judge_prompt, parse_judge, sampler_judge
from keye_jax.generate import Generation

W = [4, 3, 3]


@pytest.mark.parametrize("reply,total,components", [
    # The official format.
    ("score of component 1: 4/4, score of component 2: 3/3, score of component 3: 0/3, total score: 7/10. The "
     "response uses the word room.", 0.7, [1.0, 1.0, 0.0]),
    # Markdown, one score per line.
    ("**Score of component 1:** 4/4\n**Score of component 2:** 2/3\n- **Total score**: 6/10\n\nReasons...",
     0.6, [1.0, 2 / 3, None]),
    ("### Total Score - 8 / 10", 0.8, [None] * 3),
    # Only "x/10" (or "x out of 10") somewhere.
    ("I would rate this response 9/10 overall.", 0.9, [None] * 3),
    ("Overall: 5 out of 10.", 0.5, [None] * 3),
    # JSON, bare or fenced.
    ('{"component_1": 4, "component_2": 3, "component_3": 1, "total_score": 8}', 0.8, [1.0, 1.0, 1 / 3]),
    ('```json\n{"total score": "7/10", "components": ["4/4", "3/3", "0/3"]}\n```', 0.7, [1.0, 1.0, 0.0]),
    # Components only (the total is left to the caller), and nothing at all.
    ("score of component 1: 4/4, score of component 2: 3/3, score of component 3: 0/3.", None, [1.0, 1.0, 0.0]),
    ("I cannot grade this.", None, [None] * 3),
])
def test_parse_judge(reply, total, components):
  got = parse_judge(reply, W)
  assert got["total"] == pytest.approx(total) if total is not None else got["total"] is None
  assert got["components"] == pytest.approx(components) if None not in components else got["components"] == components


def test_judge_prompt_is_the_official_wording():
  item = Item("0", [], "instruction", extra={"instruction": "Describe the image in one sentence.",
                                             "components": ["Describe the image", "in one sentence"],
                                             "component_weight": [6, 4]})
  # evaluation.ipynb generate_prompt for two components, character for character.
  assert judge_prompt(item, "A dog.") == (
      "Here is an instruction for a multimodal LLM: ' Describe the image in one sentence. You need to grade if the "
      "response from the model follows each component of the instruction. The first component is:' Describe the "
      "image', and the second component is:' in one sentence' The response is:' A dog.' You need to score the "
      "response and be strict. The total score ranges from 0 to 10, depending on if the response follows the "
      "instruction. The first and second component is each worth 6 and 4 scores. List scores of each component, "
      "and the total score in one sentence in this format: score of component 1: x/2, score of component 2: "
      "y/10, total score: z/10. Then explain your reasons.")
  item.extra.update(components=["a", "b", "c", "d"], component_weight=[1, 2, 3, 4])
  assert "The first second, third, and fourth component is each worth 1, 2, 3 and 4 scores." in judge_prompt(item, "")


def _png() -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (28, 28), (10, 200, 10)).save(buf, format="PNG")
  return buf.getvalue()


RECORDS = [
    {"image": "http://images.cocodataset.org/val2017/000000000001.jpg",
     "instruction": "Describe the image in one sentence without using the word \"room\".", "type": "basic",
     "num_of_component": 3, "components": ["Describe the image", "in one sentence", "without using the word \"room\""],
     "component_weight": [4, 3, 3], "component_type": ["describe", "length_limit", "mention"]},
    {"image": "http://images.cocodataset.org/val2017/000000000002.jpg",
     "instruction": "Write a four-line poem about the scene.", "type": "creative", "num_of_component": 2,
     "components": ["Write a poem about the scene", "four-line"], "component_weight": [6, 4],
     "component_type": ["linguistics", "length_limit"]},
    {"image": "http://images.cocodataset.org/val2017/000000000003.jpg",
     "instruction": "Name the animal. Answer in bold.", "type": "basic", "num_of_component": 2,
     "components": ["Name the animal", "in bold"], "component_weight": [5, 5],
     "component_type": ["describe", "format"]},
]


class Scripted:
  def generate(self, prompts, params):
    return [Generation(tokens=[1], logprobs=[0.0], text="<think>hm</think>A green square.", finish_reason="stop")
            for _ in prompts]


def _judge(tmp_path):
  """A judge command: checks it can read the image it is given, then grades by the instruction it sees."""
  script = tmp_path / "judge.py"
  script.write_text(
      "import os, sys\n"
      "prompt = sys.stdin.read()\n"
      "images = os.environ['KEYE_JUDGE_IMAGES'].split(os.pathsep)\n"
      "assert all(os.path.getsize(p) > 0 for p in images), images\n"
      "assert \"The response is:' A green square.'\" in prompt\n"
      "if 'poem' in prompt:\n"
      "  print('**Score of component 1:** 3/6\\n**Score of component 2:** 0/4\\n**Total score:** 3/10')\n"
      "elif 'animal' in prompt:\n"
      "  print('Sorry, I cannot see the image.')\n"
      "else:\n"
      "  print('score of component 1: 4/4, score of component 2: 3/3, score of component 3: 3/3, total score: "
      "10/10. Fine.')\n")
  return f"{sys.executable} {script}"


def _check(res, results, out):
  lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
  # The judge's totals: 10/10, 3/10, and an unscorable reply counted as 0 (not dropped).
  assert res["n"] == 3 and res["accuracy"] == pytest.approx((1.0 + 0.3 + 0.0) / 3)
  assert sum(r["score"] for r in lines) / 3 == pytest.approx(res["accuracy"])
  assert results["unscored"] == 1 and results["diagnostics"]["unscored"] == 1
  assert [r["unscored"] for r in lines] == [False, False, True]
  assert lines[1]["components"] == [0.5, 0.0]                 # diagnostics: the per-component scores
  assert results["diagnostics"]["component_type"]["length_limit"] == pytest.approx(0.5)
  assert results["categories"]["type"]["creative"]["accuracy"] == pytest.approx(0.3)
  assert "could not score" in (out / "results.md").read_text()


def test_mia_bench_json_with_judge_command(tmp_path):
  root = tmp_path / "mia"
  os.makedirs(root / "images")
  (root / "instruction_benchmark_all.json").write_text(json.dumps(RECORDS))
  for i in (1, 2, 3):
    (root / "images" / f"00000000000{i}.jpg").write_bytes(_png())
  out = tmp_path / "out"
  res = run_eval(None, None, "mia_bench", str(root), str(out), sampler=Scripted(), encode=lambda m: m,
                 judge_cmd=_judge(tmp_path), checkpoint="c")
  _check(res, json.loads((out / "results.json").read_text()), out)


def test_mia_bench_parquet_with_embedded_images_and_a_missing_image(tmp_path):
  rows = [{**r, "image": {"bytes": _png(), "path": None}} for r in RECORDS]
  root = tmp_path / "mia"
  root.mkdir()
  pq.write_table(pa.Table.from_pylist(rows), root / "test-00000-of-00001.parquet")
  out = tmp_path / "out"
  res = run_eval(None, None, "mia_bench", str(root), str(out), sampler=Scripted(), encode=lambda m: m,
                 judge_cmd=_judge(tmp_path), checkpoint="c")
  _check(res, json.loads((out / "results.json").read_text()), out)
  # The JSON layout with one image missing: that item is an error (scored 0), the others still run.
  root2 = tmp_path / "mia2"
  os.makedirs(root2 / "images")
  (root2 / "instruction_benchmark_all.json").write_text(json.dumps(RECORDS[:2]))
  (root2 / "images" / "000000000002.jpg").write_bytes(_png())
  res = run_eval(None, None, "mia_bench", str(root2), str(tmp_path / "out2"), sampler=Scripted(),
                 encode=lambda m: m, judge_cmd=_judge(tmp_path), checkpoint="c")
  results = json.loads((tmp_path / "out2" / "results.json").read_text())
  assert res["n"] == 2 and results["errors"] == 1 and res["accuracy"] == pytest.approx(0.3 / 2)


def test_mia_bench_needs_a_judge(tmp_path):
  root = tmp_path / "mia"
  root.mkdir()
  (root / "instruction_benchmark_all.json").write_text(json.dumps(RECORDS))
  with pytest.raises(ValueError, match="scored by a judge"):
    run_eval(None, None, "mia_bench", str(root), str(tmp_path / "out"), sampler=Scripted(), encode=lambda m: m)
  assert not (tmp_path / "out").exists()


def test_checkpoint_judge_sees_the_image_and_the_prompt():
  """--judge-ckpt: our sampler gets one user turn, the item's image(s) first, then the grading prompt."""
  seen = []

  class Judge:
    def generate(self, prompts, params):
      seen.append((prompts, params))
      return [Generation(tokens=[1], logprobs=[0.0], text="total score: 6/10", finish_reason="stop")]

  judge = sampler_judge(Judge(), encode=lambda messages: messages)
  assert parse_judge(judge("grade this", ["/x/a.png"]), [10])["total"] == 0.6
  (messages,), params = seen[0]
  assert messages == [{"role": "user", "content": [{"type": "image", "image": "/x/a.png"},
                                                   {"type": "text", "text": "grade this"}]}]
  assert params.temperature == 0.0
