"""The `keye cot` driver: the five steps (mode "cot") or rejection sampling (mode "rft"), resumable and
sharded over hosts.

Files in `out/`:
  prompts.P-of-N.jsonl   step 1 for host P (collection is deterministic; each host keeps its shard,
                         prompts[P::N], rewritten when `rewrite.enabled`)
  traces.P-of-N.jsonl    step 2, appended one batch of prompts at a time; a rerun keeps the complete
                         batches and samples the rest (each batch has its own seed, so the result does not
                         depend on where a run was interrupted); `.done` marks a finished shard
  assessed.jsonl         step 3 (host 0, once every shard is done)
  review/queue.jsonl     step 4 export; review/reviewed.jsonl, when present, is imported (written by the
                         `reviewer` command when one is configured, else by a person)
  sft.jsonl              step 5: the SFT manifest; report.json, lengths.png, confidence.png
RFT keeps the traces whose answer verifies (no judge, no review) and writes them the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time

from train.cot import assess as assess_mod
from train.cot import report, review, score
from train.cot.collect import collect, rewrite, with_mode
from train.cot.traces import SamplerBackend, trace_record


class Progress:
  """`label done/total (pct) rate ETA` on stderr, at most every `every` seconds."""

  def __init__(self, label: str, total: int, done: int = 0, every: float = 2.0, stream=None):
    self.label, self.total, self.done, self.every = label, total, done, every
    self.start_done, self.t0, self.last = done, time.monotonic(), 0.0
    self.stream = stream or sys.stderr

  def update(self, n: int = 1, force: bool = False):
    self.done += n
    now = time.monotonic()
    if not force and now - self.last < self.every and self.done < self.total:
      return
    self.last = now
    rate = (self.done - self.start_done) / max(now - self.t0, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
    print(f"[cot] {self.label} {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%) "
          f"{rate:.2f}/s ETA {eta_s}", file=self.stream, flush=True)


def _read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          break                              # a line cut by an interruption: everything after is redone
  return out


def _write_jsonl(path: str, items) -> None:
  with open(path + ".tmp", "w") as f:
    for x in items:
      f.write(json.dumps(x) + "\n")
  os.replace(path + ".tmp", path)


def _make_backend(cfg):
  if not cfg.checkpoint:
    raise ValueError("cot: `checkpoint` is not set (a converted checkpoint or a training run dir)")
  from keye_jax.processing.tokenizer import load_tokenizer
  try:                                       # a converted checkpoint or a run dir (its latest checkpoint)
    from keye_jax import checkpoint_io
    ref = checkpoint_io.resolve(cfg.checkpoint)
    model, tokenizer = checkpoint_io.load_model(ref)[1], load_tokenizer(checkpoint_io.tokenizer_dir(ref))
  except ImportError:
    from checkpoints_convert import load_model
    model, tokenizer = load_model(cfg.checkpoint)[1], load_tokenizer(cfg.checkpoint)
  return SamplerBackend(model, tokenizer, vision_kwargs=cfg.vision,
                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                        top_p=cfg.top_p)


def _step1(cfg, backend, pi, pc, log):
  path = os.path.join(cfg.out, f"prompts.{pi}-of-{pc}.jsonl")
  if os.path.exists(path):
    return _read_jsonl(path), json.load(open(path + ".meta"))
  prompts, skipped = collect(cfg.manifests, min_task_size=cfg.min_task_size, max_prompts=cfg.max_prompts)
  if skipped:
    print(f"[cot] skipped records: {skipped}", file=log)
  total = len(prompts)
  mine = prompts[pi::pc]
  if cfg.rewrite.enabled and mine:
    mine = rewrite(mine, lambda asks: backend().texts(asks, cfg.rewrite.max_new_tokens), cfg.rewrite.prompt)
  with open(path + ".meta", "w") as f:
    json.dump({"total": total, "skipped": skipped}, f)
  _write_jsonl(path, mine)
  return mine, {"total": total, "skipped": skipped}


def _step2(cfg, backend, prompts, pi, pc, log):
  path = os.path.join(cfg.out, f"traces.{pi}-of-{pc}.jsonl")
  n, bs = cfg.samples_per_prompt, cfg.batch_size
  chunks = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
  have = _read_jsonl(path) if os.path.exists(path) else []
  by_chunk = {}
  for t in have:
    by_chunk.setdefault(t["chunk"], []).append(t)
  complete = {c for c, ts in by_chunk.items() if c < len(chunks) and len(ts) == len(chunks[c]) * n}
  traces = [t for t in have if t["chunk"] in complete]
  _write_jsonl(path, traces)                 # drop partial batches of an interrupted run
  if len(complete) == len(chunks):
    open(path + ".done", "w").close()
    return traces
  mode = cfg.sample_thinking or cfg.thinking
  progress = Progress("traces: prompts", len(prompts), sum(len(chunks[c]) for c in complete), stream=log)
  b = backend()
  decode = lambda ids: b.tokenizer.decode(ids, skip_special_tokens=True)
  with open(path, "a") as f:
    for c, chunk in enumerate(chunks):
      if c in complete:
        continue
      requests = [(with_mode(p["messages"], mode), p["base_dir"]) for p in chunk]
      samples = b.generate(requests, n, cfg.seed * 1_000_003 + pi * 10_007 + c)
      for p, row in zip(chunk, samples):
        for k, s in enumerate(row):
          t = {**trace_record(p, k, s, decode), "chunk": c}
          f.write(json.dumps(t) + "\n")
          traces.append(t)
      f.flush()
      progress.update(len(chunk))
  open(path + ".done", "w").close()
  return traces


def _wait_for_shards(cfg, pc, log, timeout_s=7 * 24 * 3600):
  t0 = time.monotonic()
  while True:
    missing = [i for i in range(pc) if not os.path.exists(os.path.join(cfg.out, f"traces.{i}-of-{pc}.jsonl.done"))]
    if not missing:
      return
    if time.monotonic() - t0 > timeout_s:
      raise TimeoutError(f"cot: host shards {missing} never finished")
    print(f"[cot] waiting for host shards {missing}", file=log, flush=True)
    time.sleep(10)


def run(cfg, *, backend=None, process_index: int | None = None, process_count: int | None = None,
        log=None) -> dict:
  """Runs (or resumes) `cfg`; returns the result line {"prompts", "traces", "grades", "out", ...}.
  `backend`: an object with `generate(requests, n, seed)`, `texts(message_lists, max_new_tokens)` and
  `tokenizer` (default: the sampler over `cfg.checkpoint`, built only when sampling is left to do)."""
  log = log or sys.stderr
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  pi, pc = process_index, process_count
  os.makedirs(cfg.out, exist_ok=True)
  cache = {}

  def get_backend():
    if "b" not in cache:
      cache["b"] = backend if backend is not None else _make_backend(cfg)
    return cache["b"]

  mine, meta = _step1(cfg, get_backend, pi, pc, log)
  print(f"[cot] step 1: {len(mine)} of {meta['total']} prompts on host {pi}/{pc}", file=log, flush=True)
  _step2(cfg, get_backend, mine, pi, pc, log)
  if pi != 0:
    return {"prompts": len(mine), "traces": len(mine) * cfg.samples_per_prompt, "grades": {}, "out": cfg.out,
            "host": pi}
  _wait_for_shards(cfg, pc, log)
  prompts = {p["id"]: p for i in range(pc) for p in _read_jsonl(os.path.join(cfg.out, f"prompts.{i}-of-{pc}.jsonl"))}
  traces = [t for i in range(pc) for t in _read_jsonl(os.path.join(cfg.out, f"traces.{i}-of-{pc}.jsonl"))]

  # Step 3.
  assessed_path = os.path.join(cfg.out, "assessed.jsonl")
  assessed = _read_jsonl(assessed_path) if os.path.exists(assessed_path) else []
  if len(assessed) != len(traces):
    judge = cfg.judge
    if cfg.mode == "rft":
      judge = type(judge)(kind="confidence", min_step_confidence=float("-inf"))
    texts = (lambda asks, m: get_backend().texts(asks, m)) if judge.kind == "model" else None
    print(f"[cot] step 3: assessing {len(traces)} traces (judge: {judge.kind})", file=log, flush=True)
    assessed = assess_mod.assess(traces, prompts, judge, texts, cfg.borderline_confidence,
                                 want_thinking=cfg.mode == "cot" and cfg.thinking == "think")
    _write_jsonl(assessed_path, assessed)

  # Step 4.
  counts = {"queued": 0, "kept": 0, "dropped": 0, "pending": 0}
  reviewed = {}
  if cfg.mode == "cot":
    os.makedirs(os.path.join(cfg.out, "review"), exist_ok=True)
    queue = os.path.join(cfg.out, "review", "queue.jsonl")
    counts["queued"] = len(review.queue_items(assessed))
    if not os.path.exists(queue):
      review.export(assessed, prompts, queue)
    done = os.path.join(cfg.out, "review", "reviewed.jsonl")
    if cfg.reviewer and not os.path.exists(done):
      print(f"[cot] step 4: {counts['queued']} traces to the reviewer {cfg.reviewer!r}", file=log, flush=True)
      with open(queue) as f:
        lines = [line.strip() for line in f if line.strip()]
      reply = assess_mod.run_command(cfg.reviewer, lines, "reviewer") if lines else ""
      with open(done + ".tmp", "w") as f:
        f.write(reply)
      os.replace(done + ".tmp", done)
    if os.path.exists(done):
      reviewed, c = review.import_reviewed(done, assessed, prompts)
      counts.update(c)
  kept = []
  for t in assessed:
    if t["id"] in reviewed:
      if reviewed[t["id"]] is not None:
        kept.append(reviewed[t["id"]])
    elif t["grade"] == "A" and not (cfg.mode == "cot" and t.get("borderline")):
      kept.append(t)

  # Step 5.
  scores = score.quality_scores(kept, cfg.borderline_confidence)
  sft = os.path.join(cfg.out, "sft.jsonl")
  upsample = cfg.upsample if cfg.mode == "cot" else 1
  min_score = cfg.min_score if cfg.mode == "cot" else 1
  records = score.write_manifest(kept, scores, prompts, sft, upsample=upsample, min_score=min_score,
                                 mode=cfg.thinking)
  result = report.summary(list(prompts.values()), assessed, kept,
                          {"out": sft, "records": records, "mode": cfg.mode, "review": counts,
                           "skipped": meta["skipped"],
                           "scores": {str(s): scores.count(s) for s in range(1, 6)}})
  report.write(cfg.out, result, assessed)
  print(f"[cot] done: {result['grades']} kept {len(kept)}, {records} SFT records -> {sft}", file=log, flush=True)
  return result
