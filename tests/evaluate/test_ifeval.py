"""IFEval strict/loose through lm-eval's own checkers (lm_eval.tasks.ifeval), on hand-made responses, offline."""

import json
import os
import subprocess
import sys

import pytest

from keye_jax.evaluate import ifeval, run_eval
from keye_jax.generate import Generation

# English enough for langdetect (which IFEval's lowercase check also runs).
LOWER = "the picture shows a small red square in the middle of a white page, and nothing else."
# (instruction ids, kwargs, response, strict, loose)
CASES = [
    (["length_constraints:number_words"], [{"relation": "less than", "num_words": 5}], "A red square.", True, True),
    (["length_constraints:number_words"], [{"relation": "at least", "num_words": 5}], "A red square.", False, False),
    # Punkt's English model knows "Dr." and "U.S." are no sentence ends: three sentences, not five.
    (["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 4}],
     "Dr. Smith lives in the U.S. with a dog. It is red. It barks.", True, True),
    (["length_constraints:number_sentences"], [{"relation": "less than", "num_sentences": 3}],
     "Dr. Smith lives in the U.S. with a dog. It is red. It barks.", False, False),
    (["detectable_format:title"], [{}], "<<A Square>>\nIt is red.", True, True),
    (["detectable_format:title"], [{}], "A Square\nIt is red.", False, False),
    (["change_case:english_lowercase"], [{}], LOWER, True, True),
    (["change_case:english_lowercase"], [{}], LOWER.capitalize(), False, False),
    # Loose forgives a chatty first line and markdown asterisks; strict does not.
    (["change_case:english_lowercase"], [{}], "Sure! Here it is:\n" + LOWER, False, True),
    (["keywords:forbidden_words"], [{"forbidden_words": ["blue"]}], "It is red, not *blue*.", False, False),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], "Red.\nAny other questions?", True, True),
    (["startend:end_checker"], [{"end_phrase": "Any other questions?"}], "Red.\n**Any other questions?**", False, True),
    (["detectable_format:json_format"], [{}], '```json\n{"colour": "red"}\n```', True, True),
    (["detectable_format:json_format"], [{}], "colour: red", False, False),
    (["detectable_format:number_bullet_lists"], [{"num_bullets": 2}], "* red\n* blue", True, True),
    (["detectable_content:postscript"], [{"postscript_marker": "P.S."}], "Red.\nP.S. I like it.", True, True),
    (["language:response_language"], [{"language": "en"}], "The square in the picture is red and small.", True, True),
    # Two instructions: the prompt passes only if both do; the per-instruction list says which failed.
    (["change_case:english_lowercase", "length_constraints:number_words"],
     [{}, {"relation": "less than", "num_words": 3}], LOWER, False, False),
]


@pytest.mark.parametrize("ids,kwargs,response,strict,loose", CASES)
def test_ifeval_strict_and_loose(ids, kwargs, response, strict, loose):
  got = ifeval.check(response, ids, kwargs)
  assert (got["strict"], got["loose"]) == (strict, loose)
  assert len(got["strict_list"]) == len(ids)


def test_ifeval_per_instruction_lists_and_errors():
  got = ifeval.check(LOWER, ["change_case:english_lowercase", "length_constraints:number_words"],
                     [{}, {"relation": "less than", "num_words": 3}])
  assert got["strict_list"] == [True, False]
  assert len(ifeval.instruction_ids()) == 25
  with pytest.raises(ValueError, match="unknown IFEval instruction id 'nope:x'"):
    ifeval.check("x", ["nope:x"], [{}])
  with pytest.raises(ValueError, match="1 instruction ids but 2 kwargs"):
    ifeval.check("x", ["change_case:english_lowercase"], [{}, {}])


def test_punkt_model_is_installed_without_a_download(tmp_path):
  """A fresh data dir: the punkt_tab files are written from the PyPI package; nltk.download must not run."""
  code = ("import nltk\n"
          "def no(*a, **k): raise AssertionError('download attempted')\n"
          "nltk.download = no\n"
          "from keye_jax.evaluate import ifeval\n"
          "r = ifeval.check('Dr. Smith went home. He slept.', ['length_constraints:number_sentences'],"
          " [{'relation': 'less than', 'num_sentences': 3}])\n"
          "assert r['strict'], r\n"
          "import os; print(sorted(os.listdir(os.path.join(ifeval.nltk_data_dir(), 'tokenizers/punkt_tab/english'))))\n")
  env = {**os.environ, "KEYE_NLTK_DATA": str(tmp_path / "nltk")}
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "abbrev_types.txt" in done.stdout and "Downloaded" not in done.stdout


def test_ifeval_benchmark_through_the_harness(tmp_path):
  data = tmp_path / "input_data.jsonl"
  rows = [{"key": 1, "prompt": "Describe the square in lowercase letters only.",
           "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
          {"key": 2, "prompt": "Describe the square in fewer than 3 words, all lowercase.",
           "instruction_id_list": ["change_case:english_lowercase", "length_constraints:number_words"],
           "kwargs": [{}, {"relation": "less than", "num_words": 3}]},
          {"key": 3, "prompt": "Describe the square. End with 'Is there anything else?'",
           "instruction_id_list": ["startend:end_checker"], "kwargs": [{"end_phrase": "Is there anything else?"}]}]
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))

  class Sampler:
    def generate(self, prompts, params):
      return [Generation(tokens=[1], logprobs=[0.0], text=t, finish_reason="stop") for t in
              ["<think>ok</think>" + LOWER, LOWER, "It is red.\n*Is there anything else?*"][:len(prompts)]]

  out = tmp_path / "out"
  res = run_eval(None, None, "ifeval", str(data), str(out), sampler=Sampler(), encode=lambda m: m, checkpoint="c")
  results = json.loads((out / "results.json").read_text())
  assert res["accuracy"] == pytest.approx(1 / 3)                       # prompt-level strict
  assert results["ifeval"] == pytest.approx({"prompt_level_strict_acc": 1 / 3, "prompt_level_loose_acc": 2 / 3,
                                             "inst_level_strict_acc": 2 / 4, "inst_level_loose_acc": 3 / 4, "n": 3})
