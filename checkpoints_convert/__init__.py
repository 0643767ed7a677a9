"""PyTorch/HF <-> Orbax conversion, the stage-1 starting point, and logit verification."""

from checkpoints_convert.convert import load_model, to_hf, to_orbax  # noqa: F401
from keye_jax.checkpoint_io import CheckpointError  # noqa: F401
