"""A handful of preference pairs (text and image prompts, every record form) and the demo tokenizer."""

import json

import numpy as np
import pytest
from PIL import Image

PAIRS = [
  {"id": "p0", "messages": [{"role": "user", "content": [{"type": "image", "image": "pic.png"},
                                                         {"type": "text", "text": "Colour on the left? /no_think"}]}],
   "chosen": "red", "rejected": "blue, I think"},
  {"id": "p1", "prompt": "Name a shape.", "chosen": "A circle.", "rejected": "no"},
  {"id": "p2", "prompt": "Describe the picture in lowercase.", "images": ["pic.png"],
   "chosen": "a red band on black", "rejected": "A RED BAND"},
  {"id": "p3", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to three."}],
   "chosen": {"role": "assistant", "content": "one two three"}, "rejected": [{"type": "text", "text": "one two"}]},
  {"id": "p4", "prompt": "Say yes.", "chosen": "yes", "rejected": "maybe not, let me think about it for a while"},
  {"id": "p5", "prompt": "What is 2+2? /no_think", "chosen": "4", "rejected": "5"},
]


def write_pairs(path, pairs):
  with open(path, "w") as f:
    for p in pairs:
      f.write(json.dumps(p) + "\n")
  return str(path)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
  from keye_jax.processing import build_demo_tokenizer
  d = tmp_path_factory.mktemp("mpo_tokenizer")
  build_demo_tokenizer(str(d))
  return str(d)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  from keye_jax.processing.tokenizer import load_tokenizer
  return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("mpo_pairs")
  img = np.zeros((56, 84, 3), np.uint8)
  img[:, :28] = (255, 0, 0)
  Image.fromarray(img).save(d / "pic.png")
  write_pairs(d / "pairs.jsonl", PAIRS)
  write_pairs(d / "text_pairs.jsonl", [p for p in PAIRS if "pic.png" not in json.dumps(p)])
  return d
