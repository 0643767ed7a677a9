"""The pairwise reward model's SFT manifest: preference pairs -> A/B judging conversations.

Each pair becomes `pairwise.pair_sft_records` (the judging prompt in both orders, answered "[[A]]" or
"[[B]]"), without thinking (an empty think block, `/no_think`) and, for pairs that carry a `rationale`,
also with it (`/think`). Training the reward model is then plain SFT on the manifest (`keye train` with an
SFT config whose source is the manifest, e.g. configs/demo/rm.yaml), and using it is
`{name: pairwise, ckpt: RUN_DIR}` in a reward config (train/rewards/model_judge.py).

Pairs: JSONL in either form train/preference_data.py reads ({"prompt", "images", "videos", "chosen",
"rejected"} or {"messages": prompt turns, "chosen", "rejected"}; replies as text). Media paths relative to
the pairs file are written absolute, so the manifest can live anywhere.

  python -m train.rewards.rm_data PAIRS.jsonl OUT.jsonl [--thinking both|no|yes]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train.rewards.pairwise import pair_sft_records

THINKING = ("both", "no", "yes")


def _text(content) -> str:
  if isinstance(content, str):
    return content
  if isinstance(content, dict):
    return _text(content.get("content", ""))
  return "\n".join(e.get("text", "") for e in content or [] if isinstance(e, dict) and e.get("type") == "text")


def _abs(path: str, base: str) -> str:
  return path if os.path.isabs(path) or "://" in path else os.path.join(base, path)


def judge_pair(pair: dict, base_dir: str) -> dict:
  """A pair in the form pair_sft_records takes: prompt text, media paths (absolute), reply texts."""
  out = {k: pair[k] for k in ("id", "rationale") if k in pair}
  if "messages" in pair:
    turns = [m for m in pair["messages"] if isinstance(m, dict)]
    user = [m for m in turns if m.get("role") == "user"]
    if not user:
      raise ValueError(f"pair {pair.get('id', '?')!r}: 'messages' has no user turn")
    out["prompt"] = _text(user[-1].get("content"))
    elements = [e for m in turns if isinstance(m.get("content"), list) for e in m["content"] if isinstance(e, dict)]
    out["images"] = [e["image"] for e in elements if e.get("type") == "image"]
    out["videos"] = [e["video"] for e in elements if e.get("type") == "video"]
  else:
    out.update(prompt=pair.get("prompt"), images=list(pair.get("images") or []), videos=list(pair.get("videos") or []))
  out["images"] = [_abs(p, base_dir) for p in out["images"]]
  out["videos"] = [[_abs(f, base_dir) for f in v] if isinstance(v, list) else _abs(v, base_dir) for v in out["videos"]]
  for side in ("chosen", "rejected"):
    if pair.get(side) is None:
      raise ValueError(f"pair {pair.get('id', '?')!r}: no {side!r}")
    out[side] = _text(pair[side])
  return out


def write_rm_manifest(pairs_path: str, out_path: str, thinking: str = "both") -> dict:
  """Writes the SFT manifest; returns {"pairs": N, "records": M, "out": path}."""
  if thinking not in THINKING:
    raise ValueError(f"thinking={thinking!r} is not one of {', '.join(THINKING)}")
  if not os.path.isfile(pairs_path):
    raise FileNotFoundError(f"{pairs_path}: no such pairs file")
  base = os.path.dirname(os.path.abspath(pairs_path))
  pairs = records = 0
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(pairs_path) as f, open(out_path + ".tmp", "w") as out:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        pair = judge_pair(json.loads(line), base)
      except (ValueError, AttributeError) as e:
        raise ValueError(f"{pairs_path}:{number}: {e}") from None
      modes = {"no": [False], "yes": [True], "both": [False] + ([True] if pair.get("rationale") else [])}[thinking]
      for mode in modes:
        try:
          rows = pair_sft_records(pair, thinking=mode)
        except ValueError as e:
          raise ValueError(f"{pairs_path}:{number}: {e}") from None
        for r in rows:
          out.write(json.dumps(r) + "\n")
        records += len(rows)
      pairs += 1
  os.replace(out_path + ".tmp", out_path)
  return {"pairs": pairs, "records": records, "out": os.path.abspath(out_path)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m train.rewards.rm_data", description=__doc__.splitlines()[0])
  p.add_argument("pairs")
  p.add_argument("out")
  p.add_argument("--thinking", choices=THINKING, default="both")
  args = p.parse_args(argv)
  try:
    print(json.dumps(write_rm_manifest(args.pairs, args.out, args.thinking)))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
