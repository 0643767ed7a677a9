"""Typed configs: YAML, HF config.json and overrides; errors name the key."""

import json

import pytest

from keye_jax import config as c


def test_real_and_tiny_configs_load():
  big = c.load(c.KeyeConfig, "configs/model/keye-vl-1.5-8b.yaml")
  assert (big.text.num_layers, big.text.num_heads, big.text.num_kv_heads, big.text.head_dim) == (36, 32, 8, 128)
  assert big.text.mrope_section == (16, 24, 24) and big.vision.head_dim == 72 and big.vision.grid_size == 27
  tiny = c.load(c.KeyeConfig, "configs/model/tiny.yaml", ["text.rope_theta=8e6", "scan_layers=false"])
  assert tiny.text.rope_theta == 8e6 and tiny.scan_layers is False


@pytest.mark.parametrize("override,message", [
    ("text.nope=1", "unknown config key text.nope"),
    ("text.num_layers=abc", "text.num_layers: expected int"),
    ("scan_layers=3", "scan_layers: expected bool"),
    ("text.mrope_section=[1,2]", "text.mrope_section: expected 3 items"),
    ("text", "not of the form"),
])
def test_override_errors_name_the_key(override, message):
  with pytest.raises(c.ConfigError, match=message.replace("[", r"\[")):
    c.load(c.KeyeConfig, "configs/model/tiny.yaml", [override])


def test_yaml_errors_name_the_file(tmp_path):
  p = tmp_path / "m.yaml"
  p.write_text("text:\n  hidden_sise: 3\n")
  with pytest.raises(c.ConfigError, match=r"m.yaml: unknown config key text.hidden_sise"):
    c.load(c.KeyeConfig, str(p))
  with pytest.raises(c.ConfigError, match="not found"):
    c.load(c.KeyeConfig, str(tmp_path / "missing.yaml"))


def test_hf_config_round_trip():
  hf = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "image_token_id": 151655,
        "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "num_attention_heads": 16, "num_channels": 3, "image_size": 384, "patch_size": 14,
                          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "spatial_merge_size": 2},
        "architectures": ["KeyeVL1_5ForConditionalGeneration"]}
  cfg = c.from_hf_config(hf)
  assert cfg.vision.num_layers == 27 and cfg.text.mrope_section == (16, 24, 24)
  back = c.to_hf_config(cfg, hf)
  assert json.loads(json.dumps(back)) == hf | {"hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645}


def test_overrides_valid_only_together_are_checked_once_after_the_last():
  """More prompts per RL step need more rows: each override alone fails the config's checks, both pass."""
  from train.rl.config import load_rl_config
  cfg = load_rl_config("configs/demo/rl.yaml", ["rl.prompts_per_step=64", "data.batch_size=128"])
  assert (cfg.rl.prompts_per_step, cfg.data.batch_size) == (64, 128)
  with pytest.raises(c.ConfigError, match="data.batch_size=64 rows cannot hold"):
    load_rl_config("configs/demo/rl.yaml", ["rl.prompts_per_step=64"])
  with pytest.raises(ValueError, match="variant"):
    load_rl_config("configs/demo/rl.yaml", ["rl.variant=nope"])    # nested checks still run
