"""SFT on conversation manifests: the loss mask the pipeline packs is exactly the assistant turns (think
block of the final turn included), and a packed row's loss is the per-example losses summed."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx
from PIL import Image

from keye_jax.config import KeyeConfig, from_dict
from keye_jax.model import KeyeVL
from keye_jax.processing.chat import encode_example
from train.data.config import DataConfig, SourceConfig
from train.data.decode import token_ids
from train.data.packing import build_row, stack_rows
from train.data.pipeline import make_iterator
from train.losses.cross_entropy import cross_entropy_loss
from tests.train.helpers import TINY_MODEL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _conversations():
  return [
      [{"role": "user", "content": [{"type": "image", "image": "pic.png"},
                                    {"type": "text", "text": "How many red shapes? /think"}]},
       {"role": "assistant", "content": "<think>\nOne red square, one red circle.\n</think>\n\ntwo"}],
      [{"role": "system", "content": "Be brief."},
       {"role": "user", "content": "Colour of the sky? /no_think"}, {"role": "assistant", "content": "blue"}],
      [{"role": "user", "content": "Count to three. /think"},
       {"role": "assistant", "content": "<think>\n1, 2, 3\n</think>\n\nOne two three."},
       {"role": "user", "content": "Backwards?"}, {"role": "assistant", "content": "Three two one."}],
  ]


EXPECTED_SPANS = [
    ["<think>\nOne red square, one red circle.\n</think>\n\ntwo<|im_end|>"],
    ["<think>\n\n</think>\n\nblue<|im_end|>"],
    ["Three two one.<|im_end|>"],   # the first answer lost its thinking: context only
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
  d = tmp_path_factory.mktemp("sft")
  img = np.zeros((56, 84, 3), np.uint8)
  img[:, :28] = (255, 0, 0)
  Image.fromarray(img).save(d / "pic.png")
  with open(d / "sft.jsonl", "w") as f:
    for i, msgs in enumerate(_conversations()):
      f.write(json.dumps({"id": f"c{i}", "messages": msgs}) + "\n")
  return d


def _spans(ids, mask, tokenizer):
  spans, cur = [], []
  for i, m in zip(ids, mask):
    if m:
      cur.append(int(i))
    elif cur:
      spans.append(tokenizer.decode(cur))
      cur = []
  return spans + ([tokenizer.decode(cur)] if cur else [])


def test_packed_sft_batch_loss_mask_is_exactly_the_assistant_turns(manifest, tokenizer):
  cfg = DataConfig(sources=(SourceConfig(path=str(manifest / "sft.jsonl"), name="sft"),), seq_len=512,
                   num_patches=256, batch_size=1, shuffle=False, num_epochs=1)
  batch = next(make_iterator(cfg, tokenizer, process_index=0, process_count=1))
  ids, seg, mask = batch["input_ids"][0], batch["segment_ids"][0], batch["loss_mask"][0]
  got = [_spans(ids[seg == k], mask[seg == k], tokenizer) for k in range(1, seg.max() + 1)]
  assert sorted(got) == sorted(EXPECTED_SPANS)   # all three packed into one row


def test_packed_row_loss_equals_sum_of_per_example_losses(manifest, tokenizer):
  with open(TINY_MODEL) as f:
    cfg = yaml.safe_load(f)
  cfg["text"]["num_layers"], cfg["vision"]["num_layers"] = 1, 1     # the packing is under test, not depth
  model = KeyeVL(from_dict(KeyeConfig, cfg), rngs=nnx.Rngs(0))
  ids = token_ids(tokenizer)
  examples = [encode_example(m, tokenizer, base_dir=str(manifest)) for m in _conversations()]
  loss_fn = nnx.jit(cross_entropy_loss(chunk=64))    # one compile: every row has the same shapes

  def loss(rows):
    batch = {k: jnp.asarray(v) for k, v in stack_rows(rows).items()}
    total, count, _ = loss_fn(model, batch)
    return float(total), float(count)

  packed = loss([build_row(examples, 256, 64, ids)])
  alone = [loss([build_row([ex], 256, 64, ids)]) for ex in examples]
  assert packed[1] == sum(c for _, c in alone) == sum(int(ex["loss_mask"][1:].sum()) for ex in examples)
  np.testing.assert_allclose(packed[0], sum(t for t, _ in alone), rtol=2e-5)


@pytest.mark.parametrize("name", ["configs/demo/sft.yaml", "configs/keye-vl-1.5-8b/sft.yaml"])
def test_sft_configs_load(name):
  from train.config import load_train_config
  cfg = load_train_config(os.path.join(REPO, name))
  assert cfg.data.sources and cfg.init_from and cfg.steps > 0


@pytest.mark.slow  # two tiny SFT runs through `keye train`, then `keye merge` of their run dirs: ~1-2 min
def test_merge_of_sft_run_dirs(tmp_path, tokenizer):
  """Domain experts: SFT runs on different mixtures merged by `keye merge RUN_DIR RUN_DIR` (run dirs are
  checkpoint arguments: their latest checkpoint)."""
  import subprocess
  import sys
  from tests.train.helpers import TEXT_MODEL, env, write_config
  tok_dir = tmp_path / "tok"
  from keye_jax.processing import build_demo_tokenizer
  build_demo_tokenizer(str(tok_dir))
  model = {**TEXT_MODEL, "text": {**TEXT_MODEL["text"], "vocab_size": 1024}}
  runs = []
  for i, topic in enumerate(("sum", "colour")):
    manifest = tmp_path / f"{topic}.jsonl"
    with open(manifest, "w") as f:
      for j in range(8):
        q = f"What is {j} + {i}? /think" if topic == "sum" else f"Colour number {j}? /no_think"
        a = f"<think>\n{j} plus {i}\n</think>\n\n{i + j}" if topic == "sum" else ["red", "blue"][j % 2]
        f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    cfg = write_config(tmp_path / f"sft{i}.yaml", tmp_path / f"sft{i}", model=model, steps=2,
                       tokenizer=str(tok_dir), data={"sources": [{"path": str(manifest), "name": topic}],
                                                     "seq_len": 128, "num_patches": 32, "batch_size": 2})
    p = subprocess.run([sys.executable, "-m", "keye_jax", "train", cfg], env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs.append(str(tmp_path / f"sft{i}"))
  out = tmp_path / "merged"
  p = subprocess.run([sys.executable, "-m", "keye_jax", "merge", *runs, "--weights", "0.5", "0.5", "--out", str(out)],
                     env=env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads(p.stdout.strip().splitlines()[-1])["out"] == str(out)
  code = (f"import json, numpy as np\nfrom train.merge import load_canonical\n"
          f"_, a = load_canonical({runs[0]!r}); _, b = load_canonical({runs[1]!r}); _, m = load_canonical({str(out)!r})\n"
          "print(json.dumps(max(float(np.abs(m[k] - (a[k] + b[k]) / 2).max()) for k in m)))\n")
  p = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads(p.stdout.strip().splitlines()[-1]) < 1e-6
