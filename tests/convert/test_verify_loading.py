"""`keye verify --hf-dir` refuses a reference that its own code does not load completely (issue 19): a
checkpoint whose names the remote code does not map (the transformers-PR spelling: missing and unexpected
weights) and a non-persistent rotary buffer left unfilled are named, instead of a large logits difference
that would look like our bug. The release's unused tensors are not counted as unexpected."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from checkpoints_convert import CheckpointError
from checkpoints_convert.verify import check_loading, golden_from_hf
from keye_jax import config as config_lib
from tests.convert.keye_reference import KeyeReference
from tests.convert.test_full_model import CFG

REMOTE_CODE = os.path.join(os.path.dirname(__file__), "remote_code", "modeling_fake_keye.py")

# Remote code with its own rotary module (a name transformers does not recognise, so nothing recomputes
# its non-persistent buffer after building the model on the meta device).
UNFILLED = '''

class LegacyRope(torch.nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim), persistent=False)


class FakeKeyeUnfilled(FakeKeye):
  def __init__(self, config):
    super().__init__(config)
    self.legacy_rope = LegacyRope(16)
'''


class Tiny(torch.nn.Module):
  def __init__(self, buffer):
    super().__init__()
    self.proj = torch.nn.Linear(2, 2)
    self.register_buffer("inv_freq", buffer, persistent=False)


def test_check_loading_names_what_is_missing_unexpected_or_unfilled():
  ok = Tiny(torch.tensor([1.0, 0.1]))
  check_loading({"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set()}, ok, "d")
  # The release's unused tensors, in either spelling, may be unexpected to the reference code.
  check_loading({"unexpected_keys": {"visual.vision_model.head.probe",
                                     "model.visual.vision_model.embeddings.packing_position_embedding.weight"}},
                ok, "d")
  with pytest.raises(CheckpointError, match=r"d: .*1 missing weights \(model.norm.weight\); "
                                            r"1 unexpected weights \(model.language_model.norm.weight\)"):
    check_loading({"missing_keys": {"model.norm.weight"}, "unexpected_keys": {"model.language_model.norm.weight"}},
                  ok, "d")
  with pytest.raises(CheckpointError, match=r"1 mismatched weights \(lm_head.weight\)"):
    check_loading({"mismatched_keys": [("lm_head.weight", (4, 2), (2, 4))]}, ok, "d")
  for bad in (torch.zeros(2), torch.tensor([float("nan"), 1.0]), torch.empty(2, device="meta")):
    with pytest.raises(CheckpointError, match=r"uninitialised buffers \(inv_freq\)"):
      check_loading({}, Tiny(bad), "d")
  # Raw memory that reads as ordinary numbers differs from what __init__ computes.
  built = {"inv_freq": torch.tensor([1.0, 0.1])}
  check_loading({}, ok, "d", built)
  with pytest.raises(CheckpointError, match=r"uninitialised buffers \(inv_freq\)"):
    check_loading({}, Tiny(torch.tensor([3.2e5, 4.6e-41])), "d", built)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  d = tmp_path_factory.mktemp("keye") / "hf"
  hf_config = config_lib.to_hf_config(CFG, {"architectures": ["KeyeVL1_5ForConditionalGeneration"]})
  KeyeReference(CFG).save_released(str(d), json.loads(json.dumps(hf_config)))
  return d


def _remote(released, out, model_class: str = "FakeKeye", extra_code: str = ""):
  """A copy of the release with the stand-in remote code of class `model_class` as its AutoModel (each
  test its own directory name: transformers caches remote code by the directory's name)."""
  shutil.copytree(released, out)
  with open(REMOTE_CODE) as f:
    code = f.read()
  (out / "modeling_fake_keye.py").write_text(code + extra_code)
  cfg = json.loads((out / "config.json").read_text())
  cfg.update(model_type="fake_keye", auto_map={"AutoConfig": "modeling_fake_keye.FakeKeyeConfig",
                                               "AutoModelForCausalLM": f"modeling_fake_keye.{model_class}"})
  (out / "config.json").write_text(json.dumps(cfg))
  return out


def test_reference_loads_completely(released, tmp_path):
  g = golden_from_hf(str(_remote(released, tmp_path / "hf_complete")), CFG)
  assert np.isfinite(g["logits"]).all()


def test_names_the_remote_code_does_not_map_are_refused(released, tmp_path):
  hf = _remote(released, tmp_path / "hf_pr_names")
  (path,) = [p for p in hf.iterdir() if p.suffix == ".safetensors"]
  tensors = load_file(str(path))
  tensors["model.language_model.norm.weight"] = tensors.pop("model.norm.weight")   # the PR spelling
  save_file(tensors, str(path), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"does not load this checkpoint completely: 1 missing weights "
                                            r"\(model.norm.weight\); 1 unexpected weights "
                                            r"\(model.language_model.norm.weight\)"):
    golden_from_hf(str(hf), CFG)


def test_an_unfilled_rotary_buffer_is_refused(released, tmp_path):
  hf = _remote(released, tmp_path / "hf_unfilled", "FakeKeyeUnfilled", UNFILLED)
  with pytest.raises(CheckpointError, match=r"uninitialised buffers \(legacy_rope.inv_freq\)"):
    golden_from_hf(str(hf), CFG)
