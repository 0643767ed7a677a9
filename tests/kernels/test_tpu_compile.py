"""Ahead-of-time compilation through libtpu of the Pallas attention forward + backward at real shapes
(vision 16 heads x 72 over 16K patches, bidirectional; text 32/8 heads x 128 over 8K tokens, causal)
for v5e, v5p and v6e. Each compile takes about 1-2 s on CPU."""

import pytest

from kernels import aot

TOPOLOGIES = ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"]
SHAPES = {
    "vision": dict(seq=16384, q_heads=16, kv_heads=16, head_dim=72, causal=False),
    "text": dict(seq=8192, q_heads=32, kv_heads=8, head_dim=128, causal=True),
}


@pytest.fixture(scope="module", params=TOPOLOGIES)
def mesh(request):
  return aot.tpu_mesh(request.param)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_and_backward_compile_for_tpu(mesh, shape):
  compiled = aot.compile_attention_step(mesh, **SHAPES[shape])
  text = compiled.as_text()
  assert "tpu_custom_call" in text  # the Mosaic kernels themselves, not interpret-mode loops
  for kernel in ("segment_flash_fwd", "segment_flash_dq", "segment_flash_dkv"):
    assert kernel in text, kernel
  used = aot.per_chip_bytes(compiled)
  assert used["argument"] + used["output"] + used["temp"] < 4 * 2**30
