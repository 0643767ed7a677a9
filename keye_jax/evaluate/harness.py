"""`keye eval`: run a benchmark through the sampler, score, and write the results.

out_dir/run.json            what the predictions were made by: benchmark, data, checkpoint identity (path +
                            a fingerprint of its files), sampling settings, judge. Predictions of another
                            checkpoint or other settings are never reused: run_eval refuses (or, with
                            overwrite=True / --overwrite, recomputes); an in-memory model with no
                            `checkpoint` identity is always recomputed.
out_dir/predictions.jsonl   one line per finished item (output, extracted answer, score, categories); an
                            interrupted run of the same checkpoint and settings starts again after the last
                            complete line
out_dir/results.json        {"benchmark", "accuracy" (fraction), "n", "scored", "errors", "categories": {group:
                            {category: {"accuracy", "n"}}}, ...}; "unscored" (judge benchmarks), "ifeval"
                            (strict/loose), "diagnostics" (adapter-specific)
out_dir/results.md          the same as a Markdown table (accuracy in percent)
out_dir/media/              images that came as bytes inside the benchmark files
Progress with an ETA goes to stderr after every batch. Bad input (no items, malformed files, unknown
benchmark, a judge benchmark without a judge) is a ValueError / FileNotFoundError naming the file, line and
key; a failed run leaves no output directory it created behind.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import sys
import time

from keye_jax.evaluate import scoring
from keye_jax.evaluate.items import Item, need, read_jsonl


def _adapters():
  from keye_jax.evaluate import demo, ifeval, mia_bench, mmmu, mvbench, video_mmmu
  mods = (demo, mmmu, video_mmmu, mvbench, mia_bench, ifeval)
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
  """id -> record from a predictions file (a torn last line must be cut first: `drop_torn_tail`); a bad
  line is a ValueError naming the file and line."""
  if not os.path.exists(path):
    return {}
  return {need(r, "id", f"{path} line {n}"): r for n, r in read_jsonl(path)}


def drop_torn_tail(path: str) -> None:
  """Cuts an incomplete last line (a run killed mid-write) so appended records start on a fresh line."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    data = f.read()
    if data and not data.endswith(b"\n"):
      f.truncate(data.rfind(b"\n") + 1)


def checkpoint_identity(path: str) -> str:
  """'ABS_PATH#fingerprint': the path and a hash of every file's relative name, size and mtime under it, so
  a checkpoint rewritten in place (or a run dir whose latest checkpoint moved on) is another identity."""
  path = os.path.abspath(path)
  h = hashlib.sha1()
  if os.path.isfile(path):
    st = os.stat(path)
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
  for d, dirs, files in os.walk(path):
    dirs.sort()
    for f in sorted(files):
      st = os.stat(os.path.join(d, f))
      h.update(f"{os.path.relpath(os.path.join(d, f), path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
  return f"{path}#{h.hexdigest()[:16]}"


def _run_key(key: dict) -> str:
  return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_reuse(out_dir: str, key: dict, overwrite: bool, log) -> None:
  """Refuses (or, with overwrite, clears) predictions in out_dir that another checkpoint/settings made."""
  pred_path = os.path.join(out_dir, "predictions.jsonl")
  run_path = os.path.join(out_dir, "run.json")
  if not (os.path.exists(pred_path) and os.path.getsize(pred_path) > 0):
    return
  old = None
  if os.path.exists(run_path):
    with open(run_path) as f:
      try:
        old = json.load(f).get("key")
      except json.JSONDecodeError:
        old = None
  if key["checkpoint"] is not None and old == key:
    return
  if key["checkpoint"] is None:
    why = "the model has no checkpoint identity"
  elif old is None:
    why = f"{run_path} is missing, so what made them is unknown"
  else:
    diff = [k for k in sorted(set(key) | set(old)) if key.get(k) != old.get(k)]
    why = "; ".join(f"{k}: {old.get(k)!r} there, {key.get(k)!r} now" for k in diff)
  if not overwrite and key["checkpoint"] is not None:
    raise ValueError(f"{pred_path} holds predictions of another run ({why}); pass --overwrite to recompute or "
                     f"choose another --out")
  print(f"[eval] recomputing: {why}", file=log, flush=True)
  for name in ("predictions.jsonl", "results.json", "results.md"):
    if os.path.exists(os.path.join(out_dir, name)):
      os.remove(os.path.join(out_dir, name))


def summarize(benchmark: str, records: list[dict], mod=None) -> dict:
  scored = [r for r in records if r.get("score") is not None]
  accuracy = sum(r["score"] for r in scored) / len(scored) if scored else 0.0
  groups: dict = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in scored:
    for group, cat in (r.get("categories") or {}).items():
      groups[group][cat].append(r["score"])
  categories = {g: {c: {"accuracy": sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())}
                for g, cats in groups.items()}
  out = {"benchmark": benchmark, "accuracy": accuracy, "n": len(records), "scored": len(scored),
         "errors": sum(1 for r in records if r.get("error")), "categories": categories}
  if any("unscored" in r for r in records):
    out["unscored"] = sum(1 for r in records if r.get("unscored"))
  if any("strict_list" in r for r in records):
    from keye_jax.evaluate import ifeval
    out["ifeval"] = ifeval.summarize(records)
  if mod is not None and hasattr(mod, "diagnostics"):
    out["diagnostics"] = mod.diagnostics(records)
  return out


def markdown(results: dict) -> str:
  lines = [f"# {results['benchmark']}", "",
           f"Accuracy **{100 * results['accuracy']:.2f}%** over {results['scored']} scored items "
           f"({results['n']} run, {results['errors']} errors"
           + (f", {results['unscored']} the judge could not score, counted as 0" if results.get("unscored") else "")
           + ").", "",
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
             max_new_tokens: int | None = None, temperature: float = 0.0, seed: int = 0,
             judge_cmd: str | None = None, judge=None, judge_name: str | None = None, limit: int | None = None,
             sampler=None, encode=None, mesh=None, thinking: bool | None = None, vision_kwargs: dict | None = None,
             checkpoint: str | None = None, overwrite: bool = False, load_model=None, log=sys.stderr) -> dict:
  """Scores `model` on a benchmark; returns {"benchmark", "accuracy", "n"} (the rest is in results.json).
  `checkpoint` identifies the model (`checkpoint_identity(path)`); predictions already in `out_dir` are
  reused only when they were made by the same checkpoint and settings. `limit` scores the first N items.
  `seed` seeds sampling (temperature > 0): item i's sample is the same for a seed, so runs with different
  seeds give the independent samples of pass@k or a mean over k.
  `judge(prompt, image_paths) -> reply` (or `judge_cmd`, a shell command) grades judge benchmarks.
  `encode(messages) -> Prompt` and `sampler` default to the processing chat template and the rollout
  engine over `mesh` with `batch_size` slots; tests pass their own. `load_model() -> (model, tokenizer)`
  (with model=None) loads the model only once the data has loaded and something is left to generate."""
  mod = adapter(benchmark)
  if limit is not None and limit < 1:
    raise ValueError(f"--limit must be at least 1, got {limit}")
  if batch_size < 1:
    raise ValueError(f"batch size must be at least 1, got {batch_size}")
  if max_new_tokens is not None and max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
  if not temperature >= 0:
    raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
  if judge is None and judge_cmd:
    from keye_jax.evaluate.mia_bench import command_judge
    judge, judge_name = command_judge(judge_cmd), judge_name or f"cmd:{judge_cmd}"
  if getattr(mod, "NEEDS_JUDGE", False) and judge is None:
    raise ValueError(f"{mod.NAME} is scored by a judge: give --judge-cmd CMD or --judge-ckpt CKPT")
  max_new_tokens = max_new_tokens or mod.MAX_NEW_TOKENS
  key = {"benchmark": mod.NAME, "data": os.path.abspath(data_path), "checkpoint": checkpoint,
         "max_new_tokens": max_new_tokens, "temperature": temperature, "thinking": thinking,
         "vision_kwargs": vision_kwargs or {}, "judge": (judge_name or "judge") if judge is not None else None}
  if seed and temperature > 0:  # greedy ignores it; seed 0 keeps the keys predictions had before seeds
    key["seed"] = seed
  created = not os.path.isdir(out_dir)
  try:
    return _run(mod, model, tokenizer, data_path, out_dir, key, batch_size=batch_size, limit=limit,
                sampler=sampler, encode=encode, mesh=mesh, judge=judge, overwrite=overwrite,
                load_model=load_model, log=log)
  except BaseException:
    pred_path = os.path.join(out_dir, "predictions.jsonl")
    if created and not (os.path.exists(pred_path) and os.path.getsize(pred_path) > 0):
      shutil.rmtree(out_dir, ignore_errors=True)  # nothing worth resuming: leave no empty output dir
    raise


class _EngineSampler:
  """`generate(prompts, params) -> [Generation]` through the rollout engine: a row that has finished
  (a one-letter answer) hands its slot to the next prompt instead of waiting for the batch's longest."""

  def __init__(self, model, tokenizer, slots: int, mesh):
    from keye_jax.rollout import RolloutEngine
    self.engine = RolloutEngine(model, tokenizer, slots=slots, mesh=mesh)

  def generate(self, prompts, params):
    from keye_jax.rollout import Request
    return [group[0] for group in self.engine.generate([Request(p, params) for p in prompts]).groups]


def _run(mod, model, tokenizer, data_path, out_dir, key, *, batch_size, limit, sampler, encode, mesh, judge,
         overwrite, load_model, log) -> dict:
  from keye_jax.generate import SamplingParams, encode_messages
  items: list[Item] = mod.load(data_path, os.path.join(out_dir, "media"))
  if not items:
    raise ValueError(f"no {mod.NAME} items in {data_path}")
  if limit is not None:
    items = items[:limit]
  os.makedirs(out_dir, exist_ok=True)
  _check_reuse(out_dir, key, overwrite, log)
  run_id = _run_key(key)
  with open(os.path.join(out_dir, "run.json"), "w") as f:
    json.dump({"key": key, "id": run_id}, f, indent=1)
  pred_path = os.path.join(out_dir, "predictions.jsonl")
  drop_torn_tail(pred_path)
  done = read_predictions(pred_path)
  todo = [it for it in items if it.id not in done]
  print(f"[eval {mod.NAME}] {len(items)} items, {len(items) - len(todo)} already done, batch {batch_size}",
        file=log, flush=True)

  thinking, vision_kwargs = key["thinking"], key["vision_kwargs"]
  if todo and model is None and sampler is None and load_model is not None:
    model, tokenizer = load_model()
  sampler = sampler or (_EngineSampler(model, tokenizer, batch_size, mesh) if todo else None)
  encode = encode or (lambda messages: encode_messages(messages, tokenizer, thinking=thinking, **vision_kwargs))
  score_fn = getattr(mod, "score", scoring.score)
  params = SamplingParams(max_new_tokens=key["max_new_tokens"], temperature=key["temperature"],
                          seed=key.get("seed", 0))

  t0, finished = time.time(), 0
  with open(pred_path, "a") as out:
    for start in range(0, len(todo), batch_size):
      chunk = todo[start:start + batch_size]
      records, prompts, rows = {}, [], []
      for it in chunk:
        base = {"id": it.id, "run": run_id, "categories": it.categories, "gold": it.answer}
        try:
          if it.error:
            raise FileNotFoundError(it.error)
          prompts.append(encode(it.messages))
          rows.append(it)
        except Exception as e:  # unreadable media: the item counts as wrong, the run goes on
          records[it.id] = {**base, "error": f"{type(e).__name__}: {e}", "output": "", "pred": None,
                            "score": 0.0}
      for it, g in zip(rows, sampler.generate(prompts, params) if prompts else []):
        s = score_fn(it, g.text, judge) if judge is not None else score_fn(it, g.text)
        records[it.id] = {"id": it.id, "run": run_id, "categories": it.categories, "gold": it.answer,
                          "output": g.text, "tokens": len(g.tokens), "finish_reason": g.finish_reason, **s}
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

  results = summarize(mod.NAME, [done[i.id] for i in items if i.id in done], mod)
  results.update(data=key["data"], checkpoint=key["checkpoint"], limit=limit, max_new_tokens=key["max_new_tokens"],
                 temperature=key["temperature"], judge=key["judge"])
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(out_dir, "results.md"), "w") as f:
    f.write(markdown(results))
  return {"benchmark": mod.NAME, "accuracy": results["accuracy"], "n": results["n"]}
