"""HF Qwen3 checkpoint -> Orbax -> HF: logits equal transformers, bit-identical round trip, clear errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from checkpoints_convert import CheckpointError, load_model, to_hf, to_orbax
from checkpoints_convert.safetensors_io import SafetensorsReader
from tests.model.hf_reference import hf_qwen3, tiny_text_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("qwen3")
  model = hf_qwen3(tiny_text_config(num_layers=3), seed=1)
  model.save_pretrained(d, max_shard_size="40KB")   # sharded with an index file
  assert os.path.exists(d / "model.safetensors.index.json")
  return d, model


def _read_all(d):
  r = SafetensorsReader(str(d))
  return {k: r.get(k) for k in r.keys()}


def test_convert_logits_and_round_trip(hf_dir, tmp_path):
  d, hf = hf_dir
  out = tmp_path / "orbax"
  stats = to_orbax(str(d), str(out))
  assert stats["tensors"] == len(_read_all(d))
  cfg, model = load_model(str(out), ["attention_impl=xla"])
  ids = np.random.default_rng(0).integers(0, cfg.text.vocab_size, (2, 11))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  pos = np.broadcast_to(np.arange(11), (3, 2, 11))
  got = np.asarray(model.decoder(jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(mask, jnp.int32)))
  assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4

  back = tmp_path / "hf"
  to_hf(str(out), str(back))
  a, b = _read_all(d), _read_all(back)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
  assert os.path.exists(back / "config.json")


def test_bf16_output(hf_dir, tmp_path):
  import ml_dtypes
  from keye_jax.checkpoint_io import load_flat
  d, _ = hf_dir
  to_orbax(str(d), str(tmp_path / "o"), dtype="bfloat16")
  cfg, model = load_model(str(tmp_path / "o"))
  assert str(model.decoder.norm.scale[...].dtype) == "float32"  # params follow the model's param_dtype
  # What is stored is bf16: the source rounded to bf16, nothing else.
  stored, src = load_flat(str(tmp_path / "o")), _read_all(d)
  assert all(v.dtype == ml_dtypes.bfloat16 for v in stored.values())
  q = stored["decoder/layers/layers/1/mlp/up_proj/kernel"]
  want = src["model.layers.1.mlp.up_proj.weight"].T.astype(ml_dtypes.bfloat16)
  assert q.dtype == want.dtype and np.array_equal(q.view(np.uint16), want.view(np.uint16))
  np.testing.assert_array_equal(stored["decoder/norm/scale"].view(np.uint16),
                                src["model.norm.weight"].astype(ml_dtypes.bfloat16).view(np.uint16))


def _copy_ckpt(d, dst, edit):
  os.makedirs(dst)
  tensors = _read_all(d)
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(d, "config.json")) as f:
    cfg = json.load(f)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(cfg, f)
  return dst


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}), "unexpected tensor model.layers.0.extra.weight"),
    (lambda t: t.update({"model.norm.weight": np.zeros(5, np.float32)}), "tensor model.norm.weight has shape (5,), expected (64,)"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}),
     "tensor model.norm.weight has dtype int32, expected a floating-point type"),
    (lambda t: t["model.layers.2.self_attn.q_proj.weight"].__setitem__((0, 3), np.nan),
     "tensor model.layers.2.self_attn.q_proj.weight has 1 non-finite values"),
])
def test_bad_checkpoints_name_the_key_and_leave_nothing(hf_dir, tmp_path, edit, message):
  d, _ = hf_dir
  src = _copy_ckpt(d, str(tmp_path / "bad"), edit)
  out = tmp_path / "out"
  with pytest.raises(CheckpointError) as e:
    to_orbax(src, str(out))
  assert message in str(e.value)
  assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_missing_tokenizer_warns(hf_dir, tmp_path, capsys):
  d, _ = hf_dir
  to_orbax(str(d), str(tmp_path / "o"))  # transformers' save_pretrained wrote no tokenizer
  assert "has no tokenizer.json" in capsys.readouterr().err


def test_missing_config_and_dir(tmp_path):
  with pytest.raises(CheckpointError, match="config.json"):
    to_orbax(str(tmp_path), str(tmp_path / "o"))
  with pytest.raises(CheckpointError, match="not a directory"):
    SafetensorsReader(str(tmp_path / "nope"))
