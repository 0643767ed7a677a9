"""Stand-in "remote code" for `keye verify --hf-dir`: a transformers PreTrainedModel under the released
tensor names, computing the reference forward of tests/convert/keye_reference.py. (No released Keye
checkpoint or its modeling code can be downloaded here; this exercises the trust_remote_code path.)"""

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from keye_jax.config import from_hf_config
from tests.convert.keye_reference import Projector, keye_logits
from tests.model.hf_reference import hf_paddle_vision, hf_qwen3


class FakeKeyeConfig(PretrainedConfig):
  model_type = "fake_keye"


class FakeKeye(PreTrainedModel):
  config_class = FakeKeyeConfig
  base_model_prefix = ""

  def __init__(self, config):
    super().__init__(config)
    self.cfg = from_hf_config(config.to_dict())
    self.visual = hf_paddle_vision(self.cfg.vision)
    self.mlp_AR = Projector(self.cfg.vision.hidden_size, self.cfg.text.hidden_size)
    qwen = hf_qwen3(self.cfg.text)
    self.model, self.lm_head = qwen.model, qwen.lm_head
    self.post_init()

  def _init_weights(self, module):  # weights come from the checkpoint
    pass

  def forward(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, **kwargs):
    logits, _ = keye_logits(self.cfg, self.visual, self.mlp_AR, self.model, self.lm_head, input_ids[0].numpy(),
                            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    return CausalLMOutput(logits=torch.as_tensor(logits)[None])
