"""`keye eval`: run a benchmark through the sampler, score, and write the results.

out_dir/predictions.jsonl   one line per finished item (output, extracted answer, score, categories); an
                            interrupted run starts again after the last complete line
out_dir/results.json        {"benchmark", "accuracy" (fraction), "n", "scored", "errors", "categories": {group:
                            {category: {"accuracy", "n"}}}, ...}
out_dir/results.md          the same as a Markdown table (accuracy in percent)
out_dir/media/              images that came as bytes inside the benchmark files
Progress with an ETA goes to stderr after every batch.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

from keye_jax.evaluate import scoring
from keye_jax.evaluate.items import Item


def _adapters():
  from keye_jax.evaluate import demo, mia_bench, mmmu, mvbench, video_mmmu
  mods = (demo, mmmu, video_mmmu, mvbench, mia_bench)
  table = {m.NAME: m for m in mods}
  table.update({"mmmu_val": mmmu, "mmmu-val": mmmu, "video-mmmu": video_mmmu, "videommmu": video_mmmu,
                "mia-bench": mia_bench, "mia": mia_bench})
  return table


def adapter(name: str):
  table = _adapters()
  key = name.lower()
  if key not in table:
    raise ValueError(f"unknown benchmark {name!r}; known: {sorted(m.NAME for m in table.values())}")
  return table[key]


def read_predictions(path: str) -> dict[str, dict]:
  """id -> record from a predictions file; a torn last line (interrupted write) is ignored."""
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue
        done[r["id"]] = r
  return done


def drop_torn_tail(path: str) -> None:
  """Cuts an incomplete last line (a run killed mid-write) so appended records start on a fresh line."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def summarize(benchmark: str, records: list[dict]) -> dict:
  scored = [r for r in records if r.get("score") is not None]
  accuracy = sum(r["score"] for r in scored) / len(scored) if scored else 0.0
  groups: dict = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in scored:
    for group, cat in (r.get("categories") or {}).items():
      groups[group][cat].append(r["score"])
  categories = {g: {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())}
                for g, cats in groups.items()}
  return {"benchmark": benchmark, "accuracy": accuracy, "n": len(records), "scored": len(scored),
          "errors": sum(1 for r in records if r.get("error")), "categories": categories}


def markdown(results: dict) -> str:
  lines = [f"# {results['benchmark']}", "",
           f"Accuracy **{100 * results['accuracy']:.2f}%** over {results['scored']} scored items "
           f"({results['n']} run, {results['errors']} errors).", "",
           "| group | category | n | accuracy (%) |", "|---|---|---:|---:|"]
  for group, cats in results["categories"].items():
    for cat, v in cats.items():
      lines.append(f"| {group} | {cat} | {v['n']} | {100 * v['accuracy']:.2f} |")
  return "\n".join(lines) + "\n"


def _eta(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
      f"{seconds // 60}m{seconds % 60:02d}s"


def run_eval(model, tokenizer, benchmark: str, data_path: str, out_dir: str, *, batch_size: int = 8,
             max_new_tokens: int | None = None, temperature: float = 0.0, judge_cmd: str | None = None,
             limit: int | None = None, sampler=None, encode=None, mesh=None, thinking: bool | None = None,
             vision_kwargs: dict | None = None, log=sys.stderr) -> dict:
  """Scores `model` on a benchmark; returns {"benchmark", "accuracy", "n"} (all of results.json in
  "results"). `encode(messages) -> Prompt` and `sampler` default to the processing chat template and a
  `Sampler` over `mesh`; tests pass their own."""
  from keye_jax.generate import Sampler, SamplingParams, encode_messages
  mod = adapter(benchmark)
  os.makedirs(out_dir, exist_ok=True)
  items: list[Item] = mod.load(data_path, os.path.join(out_dir, "media"))
  if limit is not None:
    items = items[:limit]
  pred_path = os.path.join(out_dir, "predictions.jsonl")
  drop_torn_tail(pred_path)
  done = read_predictions(pred_path)
  todo = [it for it in items if it.id not in done]
  print(f"[eval {mod.NAME}] {len(items)} items, {len(items) - len(todo)} already done, batch {batch_size}",
        file=log, flush=True)

  sampler = sampler or Sampler(model, tokenizer, mesh=mesh)
  encode = encode or (lambda messages: encode_messages(messages, tokenizer, thinking=thinking,
                                                       **(vision_kwargs or {})))
  judge = None
  if judge_cmd:
    from keye_jax.evaluate.mia_bench import command_judge
    judge = command_judge(judge_cmd)
  score_fn = getattr(mod, "score", scoring.score)
  params = SamplingParams(max_new_tokens=max_new_tokens or mod.MAX_NEW_TOKENS, temperature=temperature)

  t0, finished = time.time(), 0
  with open(pred_path, "a") as out:
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      records, prompts, rows = {}, [], []
      for it in chunk:
        base = {"id": it.id, "categories": it.categories, "gold": it.answer}
        try:
          prompts.append(encode(it.messages))
          rows.append(it)
        except Exception as e:  # unreadable media: the item counts as wrong, the run goes on
          records[it.id] = {**base, "error": f"{type(e).__name__}: {e}", "output": "", "pred": None,
                            "score": 0.0}
      for it, g in zip(rows, sampler.generate(prompts, params) if prompts else []):
        s = score_fn(it, g.text, judge) if judge is not None else score_fn(it, g.text)
        records[it.id] = {"id": it.id, "categories": it.categories, "gold": it.answer, "output": g.text,
                          "tokens": len(g.tokens), "finish_reason": g.finish_reason, **s}
      for it in chunk:
        out.write(json.dumps(records[it.id], default=str) + "\n")
        done[it.id] = records[it.id]
      out.flush()
      finished += len(chunk)
      rate = finished / max(time.time() - t0, 1e-9)
      partial = summarize(mod.NAME, [done[i.id] for i in items if i.id in done])
      print(f"[eval {mod.NAME}] {len(items) - len(todo) + finished}/{len(items)}  accuracy so far "
            f"{100 * partial['accuracy']:.1f}%  {rate:.2f} items/s  ETA {_eta((len(todo) - finished) / rate)}",
            file=log, flush=True)

  results = summarize(mod.NAME, [done[i.id] for i in items if i.id in done])
  results.update(data=os.path.abspath(data_path), max_new_tokens=params.max_new_tokens,
                 temperature=temperature, judge=bool(judge_cmd))
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(results))
  return {"benchmark": mod.NAME, "accuracy": results["accuracy"], "n": results["n"]}
