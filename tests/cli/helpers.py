"""Running `keye` as a user does: a subprocess in a working directory, with stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from tests.train.helpers import REPO, TEXT_MODEL, env


def keye(*args, cwd, timeout: int = 600, extra_env=None, prelude: str = "") -> subprocess.CompletedProcess:
  """`keye ARGS...` from `cwd`; `prelude`: Python run first (e.g. hiding a package)."""
  code = f"{prelude}\nimport sys\nfrom keye_jax.cli import main\nsys.exit(main(sys.argv[1:]))"
  return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=str(cwd),
                        env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout)


def last_json(p: subprocess.CompletedProcess) -> dict:
  line = p.stdout.strip().splitlines()[-1]
  return json.loads(line, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} in JSON")))


def one_line_error(p: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
  """Asserts the command failed with exit code `rc`, no traceback, and one error line holding `needles`."""
  assert p.returncode == rc, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  lines = [line for line in p.stderr.splitlines() if "error:" in line]
  assert len(lines) == 1, p.stderr[-3000:]
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


def demo_tokenizer(path) -> str:
  from keye_jax.processing.tokenizer import build_demo_tokenizer
  build_demo_tokenizer(str(path))
  return str(path)


def converted_text_model(out, *, seed: int = 0, tokenizer: str | None = None, **text) -> dict:
  """A tiny text-only converted checkpoint (demo vocabulary) written with the checkpoint IO; returns its
  canonical parameters."""
  from flax import nnx

  from keye_jax import checkpoint_io
  from keye_jax.config import KeyeConfig, from_dict
  from keye_jax.model import KeyeVL
  from keye_jax.params import get_flat
  model = {**TEXT_MODEL, "text": {**TEXT_MODEL["text"], "vocab_size": 1024, **text}, "image_token_id": 5,
           "video_token_id": 6, "vision_start_token_id": 3, "vision_end_token_id": 4, "bos_token_id": 0,
           "eos_token_id": 2}
  cfg = from_dict(KeyeConfig, model)
  flat = get_flat(KeyeVL(cfg, rngs=nnx.Rngs(seed)))
  checkpoint_io.write_converted(str(out), cfg, {}, [("all", dict(flat))], tokenizer_from=tokenizer)
  return {k: np.asarray(v) for k, v in flat.items()}


__all__ = ["REPO", "keye", "last_json", "one_line_error", "demo_tokenizer", "converted_text_model"]
