"""`keye data check SOURCE`: decode every sample of a source, report the bad ones with file and reason.

Uses exactly the decoding the training pipeline uses (decode.Decoder), so a source that checks clean
will not lose samples during training (over-long examples aside: they depend on the run's S and P).
"""

from __future__ import annotations

import sys
import time

import grain

from train.data.config import SourceConfig
from train.data.decode import Decoder, is_bad
from train.data.pipeline import iterate
from train.data.sources import open_source


def _report_to_stderr(where: str, reason: str, error: str):
  print(f"{where}: {reason}: {error}", file=sys.stderr)


def default_tokenizer():
  """The demo tokenizer (text only matters for token counts; media decoding is what is checked)."""
  import tempfile

  from keye_jax.processing.tokenizer import build_demo_tokenizer
  with tempfile.TemporaryDirectory(prefix="keye-tok-") as tmp:
    return build_demo_tokenizer(tmp)


def check_source(source: SourceConfig | str, tokenizer=None, *, encode=None, vision: dict | None = None,
                 workers: int = 0, report=_report_to_stderr, progress: bool = True) -> dict:
  """Decodes every sample; calls `report(where, reason, error)` for each bad one.

  Returns {"total": N, "ok": N, "bad": {reason: N}}. `tokenizer` defaults to the demo tokenizer,
  `encode` to keye_jax.processing.encode_example, `vision` are its keyword arguments. `progress`: a line
  on stderr every 5 seconds."""
  src = open_source(source)
  tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
  ds = grain.MapDataset.source(src).map(Decoder(tokenizer, 0, encode=encode, vision_kwargs=vision))
  stream = iterate(ds, workers)
  total, bad = 0, {}
  t0 = last = time.time()
  for item in stream:
    total += 1
    if is_bad(item):
      bad[item["_bad"]] = bad.get(item["_bad"], 0) + 1
      report(item["_where"], item["_bad"], item["_error"])
    if progress and time.time() - last >= 5:
      last = time.time()
      print(f"data check: {total} of {len(src)} samples, {sum(bad.values())} bad, {last - t0:.0f} s",
            file=sys.stderr, flush=True)
  return {"total": total, "ok": total - sum(bad.values()), "bad": dict(sorted(bad.items()))}
