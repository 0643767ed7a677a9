import pytest

from tests.processing.media import load_reference


@pytest.fixture(scope="session")
def ref():
  """The reference package keye_vl_utils (see media.load_reference for the torchvision stand-in)."""
  return load_reference()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  from keye_jax.processing import build_demo_tokenizer
  return build_demo_tokenizer(str(tmp_path_factory.mktemp("demo_tokenizer")))
