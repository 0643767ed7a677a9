"""Keye-VL 1.5 preprocessing on numpy, Pillow and PyAV: media -> patches, chat -> tokens, 3D positions.

The first four names are drop-in replacements for `keye_vl_utils` 1.5.2 (numpy arrays instead of torch).
"""

from keye_jax.processing.chat import encode_example, encode_prompt
from keye_jax.processing.errors import MediaError
from keye_jax.processing.positions import batch_position_ids, position_ids, reference_position_ids
from keye_jax.processing.processor import Processor, grid_thw, patchify
from keye_jax.processing.tokenizer import KeyeTokenizer, build_demo_tokenizer, load_tokenizer
from keye_jax.processing.vision_process import (extract_vision_info, fetch_image, fetch_video,
                                                process_vision_info, smart_resize)

__all__ = [
    "smart_resize", "fetch_image", "fetch_video", "process_vision_info", "extract_vision_info",
    "MediaError", "Processor", "patchify", "grid_thw", "KeyeTokenizer", "load_tokenizer",
    "build_demo_tokenizer", "encode_example", "encode_prompt", "position_ids", "batch_position_ids",
    "reference_position_ids",
]
