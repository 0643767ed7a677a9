import pytest


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
  from keye_jax.processing import build_demo_tokenizer
  return build_demo_tokenizer(str(tmp_path_factory.mktemp("demo_tokenizer")))
