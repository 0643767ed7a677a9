"""The whole model: released checkpoint -> Orbax -> `keye verify` against a PyTorch reference assembled
from transformers' blocks; bit-identical round trip including unused tensors; the PR spelling; init."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from checkpoints_convert import CheckpointError, load_model, to_hf, to_orbax
from checkpoints_convert.convert import load_flat
from checkpoints_convert.safetensors_io import SafetensorsReader
from keye_jax import config as config_lib
from keye_jax.config import KeyeConfig
from tests.convert.keye_reference import KeyeReference
from tests.model.hf_reference import tiny_text_config, tiny_vision_config

IMG, VID, VS, VE = 90, 91, 92, 93
CFG = KeyeConfig(text=tiny_text_config(), vision=tiny_vision_config(), image_token_id=IMG, video_token_id=VID,
                 vision_start_token_id=VS, vision_end_token_id=VE, attention_impl="xla")


def _hf_config():
  hf = config_lib.to_hf_config(CFG, {"architectures": ["KeyeVL1_5ForConditionalGeneration"]})
  return json.loads(json.dumps(hf))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  d = tmp_path_factory.mktemp("keye")
  ref = KeyeReference(CFG)
  tensors = ref.save_released(str(d / "hf"), _hf_config())
  rng = np.random.default_rng(0)
  text = lambda n: list(rng.integers(10, 80, n))
  image_grid = np.array([[1, 4, 6]])                  # 6 merged tokens
  video_grid = np.array([[1, 4, 6], [1, 2, 4]])       # a slow frame (6 tokens), a fast frame (2 tokens)
  ids = (text(3) + [VS] + [IMG] * 6 + [VE] + text(2) + [VS] + text(4) + [VID] * 6 + text(5) + [VID] * 2
         + text(1) + [VE] + text(3))
  pix = rng.standard_normal((24, 3, 14, 14)).astype(np.float32)
  pix_v = rng.standard_normal((32, 3, 14, 14)).astype(np.float32)
  logits, pos = ref.logits(ids, pix, image_grid, pix_v, video_grid)
  golden = d / "golden.npz"
  np.savez(golden, input_ids=np.array(ids), pixel_values=pix, image_grid_thw=image_grid,
           pixel_values_videos=pix_v, video_grid_thw=video_grid, logits=logits, position_ids=pos)
  return d, tensors, golden


def _keye(*args):
  r = subprocess.run([sys.executable, "-m", "keye_jax", *args], capture_output=True, text=True, timeout=600)
  return r.returncode, (json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else None), r.stderr


def test_convert_and_verify_against_reference(released, tmp_path):
  d, tensors, golden = released
  rc, stats, err = _keye("convert", "to-orbax", str(d / "hf"), str(tmp_path / "orbax"))
  assert rc == 0, err
  assert stats["tensors"] == len(tensors)
  rc, result, err = _keye("verify", str(tmp_path / "orbax"), str(golden), "--atol", "1e-4")
  assert rc == 0, err
  assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0, result
  assert result["position_ids_equal"] is True and result["kl"] < 1e-8
  # A golden that disagrees makes verify fail with exit status 1.
  with np.load(golden) as f:
    bad = {k: f[k] for k in f.files}
  bad["logits"] = bad["logits"] + 0.01
  np.savez(tmp_path / "bad.npz", **bad)
  rc, result, _ = _keye("verify", str(tmp_path / "orbax"), str(tmp_path / "bad.npz"), "--atol", "1e-4")
  assert rc == 1 and result["max_abs_diff"] > 1e-3


def test_round_trip_is_bit_identical_with_unused_tensors(released, tmp_path):
  d, tensors, _ = released
  to_orbax(str(d / "hf"), str(tmp_path / "o"))
  to_hf(str(tmp_path / "o"), str(tmp_path / "back"))
  r = SafetensorsReader(str(tmp_path / "back"))
  assert sorted(r.keys()) == sorted(tensors)
  for k, v in tensors.items():
    got = r.get(k)
    assert got.dtype == v.dtype and np.array_equal(got, v), k
  assert os.path.exists(tmp_path / "back" / "preprocessor_config.json")


def test_transformers_pr_spelling_is_accepted(released, tmp_path):
  d, _, _ = released
  ref = KeyeReference(CFG)
  ref.save_released(str(tmp_path / "pr"), _hf_config(), spelling="pr")
  to_orbax(str(d / "hf"), str(tmp_path / "a"))
  to_orbax(str(tmp_path / "pr"), str(tmp_path / "b"))
  a, b = load_flat(str(tmp_path / "a")), load_flat(str(tmp_path / "b"))
  assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_wrong_vision_shape_names_the_key(released, tmp_path):
  d, tensors, _ = released
  from safetensors.numpy import save_file
  bad = dict(tensors)
  bad["mlp_AR.linear_1.weight"] = bad["mlp_AR.linear_1.weight"][:, :5]
  os.makedirs(tmp_path / "bad")
  save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
  (tmp_path / "bad" / "config.json").write_text(json.dumps(_hf_config()))
  with pytest.raises(CheckpointError, match=r"mlp_AR.linear_1.weight has shape \(256, 5\), expected \(256, 256\)"):
    to_orbax(str(tmp_path / "bad"), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_init_from_siglip_and_qwen3(tmp_path):
  """Stage-1 start: SigLIP (transformers naming, with its head) + Qwen3 + a seeded fresh projector."""
  from tests.model.hf_reference import hf_qwen3, hf_siglip_vision
  v, t = tiny_vision_config(), tiny_text_config()
  siglip = hf_siglip_vision(v)
  siglip.save_pretrained(tmp_path / "siglip")
  hf_qwen3(t).save_pretrained(tmp_path / "qwen")
  rc, stats, err = _keye("convert", "init", str(tmp_path / "i1"), "--vision", str(tmp_path / "siglip"),
                         "--text", str(tmp_path / "qwen"), "--seed", "3")
  assert rc == 0, err
  from checkpoints_convert.init import init
  init(str(tmp_path / "i2"), vision_dir=str(tmp_path / "siglip"), text_dir=str(tmp_path / "qwen"), seed=3)
  init(str(tmp_path / "i3"), vision_dir=str(tmp_path / "siglip"), text_dir=str(tmp_path / "qwen"), seed=4)
  a, b, c = (load_flat(str(tmp_path / n)) for n in ("i1", "i2", "i3"))
  assert np.array_equal(a["projector/linear_1/kernel"], b["projector/linear_1/kernel"])
  assert not np.array_equal(a["projector/linear_1/kernel"], c["projector/linear_1/kernel"])
  sd = siglip.state_dict()
  np.testing.assert_array_equal(a["vision/pos_embed/embedding"],
                                sd["embeddings.position_embedding.weight"].numpy())
  cfg, model = load_model(str(tmp_path / "i1"))
  assert cfg.vision.hidden_size == v.hidden_size and cfg.text.num_layers == t.num_layers


def test_verify_hf_dir_runs_the_checkpoints_own_code(released, tmp_path):
  """--hf-dir: the golden comes from the checkpoint's modeling code loaded with trust_remote_code."""
  import shutil
  d, _, _ = released
  hf = tmp_path / "hf"
  shutil.copytree(d / "hf", hf)
  shutil.copy(os.path.join(os.path.dirname(__file__), "remote_code", "modeling_fake_keye.py"), hf)
  cfg = json.loads((hf / "config.json").read_text())
  cfg.update(model_type="fake_keye", auto_map={"AutoConfig": "modeling_fake_keye.FakeKeyeConfig",
                                               "AutoModelForCausalLM": "modeling_fake_keye.FakeKeye"})
  (hf / "config.json").write_text(json.dumps(cfg))
  to_orbax(str(d / "hf"), str(tmp_path / "orbax"))
  rc, result, err = _keye("verify", str(tmp_path / "orbax"), "--hf-dir", str(hf), "--trust-remote-code",
                         "--atol", "1e-4")
  assert rc == 0, err[-3000:]
  assert result["max_abs_diff"] <= 1e-4 and result["top1_agreement"] == 1.0, result
