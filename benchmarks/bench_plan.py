"""The README's TPU-fit table through `keye plan`: each row's 8B config compiled ahead of time for its
v5p slice through libtpu (no TPU needed), one `keye plan` process at a time (5-17 minutes and up to 4.4 GiB
of host memory each on the loaded 2-core machine; 27 minutes for the three).

  .venv/bin/python benchmarks/bench_plan.py [--only stage2 ...]

Prints each row as the README writes it (stderr) and, last on stdout, one JSON line:
{"rows": [{"name", "config", "topology", "overrides", "per_chip_gib", "params_gib", "optimizer_gib",
"temporaries_gib", "bound_gib", "within_bound", "seconds"}, ...], "ok": all rows fit within their bound}.
Bounds: stage 2 <= 9.5 GiB per chip (issue 20); the others the README's figure + 0.1 GiB.
tests/train/test_plan_table.py (slow) runs it and checks the figures against the README's table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs", "keye-vl-1.5-8b")

# name -> (README row label, config, topology, overrides, bound in GiB per chip)
ROWS = {
    "stage2": ("full Keye 8B, stage 2", "stage2.yaml", "v5p:4x4x4", (), 9.5),
    "stage2_text": ("text-only Qwen3-8B, same settings", "stage2.yaml", "v5p:4x4x4", ("model.vision=null",), 8.26),
    "stage4": ("full Keye 8B, stage 4", "stage4.yaml", "v5p:4x4x8", (), 8.20),
}


def plan_row(config: str, topology: str, overrides=(), timeout: int = 3600) -> dict:
  """`keye plan CONFIG --topology T OVERRIDES` in its own process; its JSON report."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "keye_jax", "plan", config, "--topology", topology, *overrides],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  if r.returncode not in (0, 1) or not r.stdout.strip():  # 1: ran, does not fit (the report says so)
    raise RuntimeError(f"keye plan {config} --topology {topology} failed (exit {r.returncode}): "
                       f"{r.stderr.strip()[-2000:]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def readme_cell(r: dict) -> str:
  """The per-chip cell as the README's table writes it."""
  return (f"{r['per_chip_gib']:.2f} GiB (params {r['params_gib']:.2f}, optimizer {r['optimizer_gib']:.2f}, "
          f"temporaries {r['temporaries_gib']:.2f})")


def run(names) -> dict:
  rows = []
  for name in names:
    label, config, topology, overrides, bound = ROWS[name]
    t0 = time.time()
    rep = plan_row(os.path.join(CONFIGS, config), topology, overrides)
    per_chip = rep.get("per_chip_gib")
    row = {"name": name, "label": label, "config": f"configs/keye-vl-1.5-8b/{config}", "topology": topology,
           "overrides": list(overrides), "fits": rep["fits"], "per_chip_gib": per_chip,
           **{k: rep.get(k) for k in ("params_gib", "optimizer_gib", "temporaries_gib")},
           "bound_gib": bound, "within_bound": bool(rep["fits"] and per_chip is not None and per_chip <= bound),
           "seconds": round(time.time() - t0, 1)}
    rows.append(row)
    cell = readme_cell(row) if rep["fits"] else f"DOES NOT FIT: {rep.get('error')}"
    print(f"| {label} | {topology} | {cell} | bound {bound} GiB: {'ok' if row['within_bound'] else 'OVER'} "
          f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
  return {"rows": rows, "ok": all(r["within_bound"] for r in rows)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", nargs="+", choices=sorted(ROWS), default=list(ROWS))
  args = p.parse_args(argv)
  out = run(args.only)
  print(json.dumps(out))
  return 0 if out["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
