"""PyTorch/HF <-> Orbax conversion, the stage-1 starting point, and logit verification."""

from checkpoints_convert.convert import load_model, to_hf, to_orbax  # noqa: F401
from checkpoints_convert.safetensors_io import CheckpointError  # noqa: F401
