"""`keye rl CONFIG`: GSPO reinforcement learning, colocated on the trainer's mesh.

One RL step (a rollout batch), in every process for its own prompts:
  prompts     rl.prompts_per_step / processes of the step's rl.prompts_per_step prompts, selected from the
              Grain prompt stream globally: the same prompts whatever the process count (train/rl/prompts.py)
  rollout     G responses per prompt from the current parameters, in place (train/rl/rollouts.py)
  rewards     the configured rewards (train/rewards), correctness by the rule verifier
  hints       a prompt whose whole group fails and has a reference solution is re-sampled with hints
              L1..L5 appended; the first level with a correct response is recorded, its group kept
  advantages  A_i = (r_i - mean) / (std + eps) per group
  update      the responses split into rl.minibatches minibatches, each packed into data.batch_size rows
              (train/rl/batch.py) and one optimizer step with the GSPO loss (train/rl/update.py); the
              rollout policy is the old policy of every minibatch (log-probs from the sampler)
  vision      when the vision tower is frozen (`vision` not in optimizer.trainable), its output for a
              prompt is the same in the rollout, the update and the reference pass: the rows carry the
              rollout's tower features instead of pixel_values, and the update and reference passes run
              only the projector (which may train) on them, never the tower. A trainable tower is re-run
              in the update (its gradients) and in the reference pass (the reference's weights differ).
Then metrics (metrics.jsonl, TensorBoard; with the prompts left out so far, per reason), a checkpoint
every checkpoint.every RL steps (the train state, plus per process the prompt iterator with the pass-rate
and hint records), SIGTERM -> save + exit.

Determinism: a prompt's sampling seed comes from the run seed and the prompt's element in the global
mixture (and the hint level), so a resumed run samples exactly what the uninterrupted one did, and the
responses do not depend on how prompts are spread over processes; a response's minibatch is a function
of that element too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time

import jax
import numpy as np
import yaml

from keye_jax.sharding import make_mesh
from train import distributed
from train.checkpointing import Checkpointer, write_run_files
from train.metrics import MetricsWriter, read_metrics
from train.model_state import ModelShape
from train.rl import hinting
from train.rl.hinting import prompt_hints
from train.rl.advantages import group_advantages
from train.rl.batch import Response, pack_responses, reused_vision_dim
from train.rl.config import RLRunConfig, load_rl_config
from train.rl.prompts import SKIPS
from train.rl.rollouts import Rollouts, prompt_seed, to_prompt
from train.rl.update import make_ref_logprobs, rl_loss_fn, to_global
from train.step import abstract_state, init_state, make_step

log = logging.getLogger("train.rl")


def run(config_path: str, overrides=()) -> dict:
  """`keye rl`: an RL YAML, or a schedule YAML with `phases:` (train/schedule.py)."""
  with open(config_path) as f:
    raw = yaml.safe_load(f) or {}
  if "phases" in raw:
    from train.schedule import run_schedule
    return run_schedule(config_path, overrides)
  return train_rl(load_rl_config(config_path, overrides))


def _host(x):
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def _allsum(values: np.ndarray) -> np.ndarray:
  """Elementwise sum of a small float vector over processes."""
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  # The gather goes through jax (float32 without x64): float64 again before summing, for json and exact counts.
  return np.asarray(multihost_utils.process_allgather(np.asarray(values, np.float64)), np.float64).sum(0)


class RLRun:
  """The state and pieces of one RL run (built once; `step()` runs one RL step)."""

  def __init__(self, cfg: RLRunConfig):
    from keye_jax.processing.tokenizer import load_tokenizer
    from train.data.decode import token_ids
    from train.rewards.registry import combine
    from train.rl.prompts import make_prompt_stream
    self.cfg = cfg
    distributed.initialize(cfg.distributed)
    self.primary = jax.process_index() == 0
    self.run_dir = os.path.abspath(cfg.run_dir)
    if self.primary:
      write_run_files(cfg, self.run_dir)  # config and tokenizer: the run dir is a checkpoint every command reads
    if not cfg.tokenizer:
      raise ValueError("rl: `tokenizer` is empty (the prompts are tokenised with it)")
    if not cfg.data.sources:
      raise ValueError("rl: data.sources is empty (the prompts come from there)")
    n = jax.process_count()
    if cfg.rl.prompts_per_step % n or cfg.data.batch_size % n:
      raise ValueError(f"rl.prompts_per_step={cfg.rl.prompts_per_step} and data.batch_size={cfg.data.batch_size} "
                       f"must be divisible by the {n} processes")
    self.mesh = make_mesh(cfg.mesh)
    self.tokenizer = load_tokenizer(cfg.tokenizer)
    self.ids = token_ids(self.tokenizer)
    r = cfg.rl
    keep = drop = None
    if r.pass_rates_from:
      keep, drop = hinting.round_filter(r.pass_rates_from)
      log.info("new round: %d prompts of %s have a pass rate in (0, 1), %d do not", len(keep), r.pass_rates_from,
               len(drop))
      if r.keep_unmeasured:
        keep = None
    self.stream = make_prompt_stream(cfg.data, self.tokenizer, max_len=r.max_prompt_len,
                                     max_patches=r.max_prompt_patches, keep_ids=keep, drop_ids=drop,
                                     categories=r.categories)
    self.rewards = combine(list(r.rewards))
    self.shape = ModelShape.of(cfg.model)
    self.with_ref = r.kl_coef > 0
    self.vision_dim = reused_vision_dim(cfg.model, cfg.optimizer.trainable)  # > 0: the rollout's features
    self.batch_keys = list(self._pack([]).keys())
    step_cfg = dataclasses.replace(cfg, steps=cfg.optimizer_steps())
    self.fns = make_step(step_cfg, self.shape, self.mesh, 1, self.batch_keys,
                         loss_fn=rl_loss_fn(r, cfg.loss_chunk))
    self.ckpt = Checkpointer(self.run_dir, cfg.checkpoint.every, cfg.checkpoint.keep)
    start = self.ckpt.latest_step()
    if start is not None:
      self.state = self.ckpt.restore(start, abstract_state(self.fns), self.stream)
      log.info("resumed %s at RL step %d", self.run_dir, start)
    else:
      from train.loop import _init_params
      self.state = init_state(self.fns, cfg.seed, _init_params(cfg, self.fns, self.shape))
      start = 0
    self.step_num = start
    self.records = hinting.Records.from_state(self.stream.host_state, r.hints.max_level)
    self.ref_params = None
    if self.with_ref:
      # The frozen reference: the starting policy (init_from), as the run's first parameters.
      from train.loop import _init_params
      self.ref_params = _init_params(cfg, self.fns, self.shape)
      if self.ref_params is None:
        raise ValueError("rl.kl_coef > 0 needs init_from (the frozen reference policy)")
      self.ref_fn = make_ref_logprobs(self.shape, self.mesh, self.batch_keys, cfg.loss_chunk,
                                      temperature=r.temperature)
    self.rollouts = Rollouts(self.shape, self.tokenizer, self.mesh, r, keep_features=self.vision_dim > 0)

  # -- one step ---------------------------------------------------------------------------------------

  def _pack(self, responses):
    d = self.cfg.data
    return pack_responses(responses, d.seq_len, d.num_patches, d.batch_size // jax.process_count(), self.ids,
                          with_ref=self.with_ref, vision_dim=self.vision_dim)

  def _score(self, metas, texts):
    total, parts = self.rewards(metas, texts)
    thr = self.cfg.rl.correct_threshold
    # A prompt without a reference answer (an instruction prompt) is passed when its reward is.
    correct = np.asarray([hinting.is_correct(m, t, thr) if m.get("reference") is not None else r > thr
                          for m, t, r in zip(metas, texts, total)])
    return np.asarray(total, np.float32), correct, parts

  def step(self) -> dict:
    cfg, r = self.cfg, self.cfg.rl
    g = r.group_size
    t0 = time.perf_counter()
    prompts = self.stream.take(r.prompts_per_step)  # this process's share, in key order
    t_data = time.perf_counter() - t0
    # Rollout with the current parameters, in place.
    t1 = time.perf_counter()
    tok0, sec0 = self.rollouts.tokens, self.rollouts.seconds
    self.rollouts.set_weights(self.state["params"])
    groups = self.rollouts.sample([to_prompt(p) for p in prompts], [prompt_seed(cfg.seed, p["key"]) for p in prompts], g)
    features = list(self.rollouts.features) if self.vision_dim else [None] * len(prompts)  # per prompt
    t_rollout = t_first_rollout = time.perf_counter() - t1
    # Rewards, correctness, pass rates; progressive hints for groups that failed entirely.
    t2 = time.perf_counter()
    arrays = [dict(p) for p in prompts]
    rewards, corrects, hint_levels, parts = [], [], [], []
    tracker = self.records.tracker
    for i, (p, grp) in enumerate(zip(prompts, groups)):
      rew, ok, part = self._score([p["meta"]] * g, [x.text for x in grp])
      corrects.append(ok)
      pid = p["meta"]["id"]
      hints = prompt_hints(p["meta"], r.hints) if r.hints.enabled else None
      decision = tracker.observe(pid, ok, has_hints=hints is not None)
      level = 0
      while decision.action == "escalate":
        lv = decision.level
        hinted = self.stream.encode(p, r.hints.template.format(hint=hints[lv - 1]))
        t_h = time.perf_counter()
        hgrp = self.rollouts.sample([to_prompt(hinted)], [prompt_seed(cfg.seed, p["key"], lv)], g)[0]
        t_rollout += time.perf_counter() - t_h
        hrew, hok, hpart = self._score([p["meta"]] * g, [x.text for x in hgrp])
        decision = tracker.observe(pid, hok, has_hints=True)
        if decision.action == "update":  # the first level with a correct response: its group is used
          level, groups[i], rew, part, arrays[i] = lv, hgrp, hrew, hpart, {**p, **hinted}
          if self.vision_dim:
            features[i] = self.rollouts.features[0]
      hint_levels.append(level)
      rewards.append(rew)
      parts.append(part)
    t_reward = time.perf_counter() - t2 - (t_rollout - t_first_rollout)  # hint rollouts count as rollout
    # Advantages and the minibatches (a response's minibatch depends on its prompt's element only).
    t3 = time.perf_counter()
    m = r.minibatches
    per_mb: list[list[Response]] = [[] for _ in range(m)]
    for p, a, grp, rew, feats in zip(arrays, prompts, groups, rewards, features):
      adv = group_advantages(rew, np.zeros(len(rew), np.int32), eps=r.advantage_eps)
      for k, x in enumerate(grp):
        if not len(x.tokens):
          continue
        per_mb[(a["key"] * g + k) % m].append(Response(
            p["input_ids"], p["position_ids"], p.get("pixel_values"), p.get("grids_hw"),
            np.asarray(x.tokens, np.int32), np.asarray(x.logprobs, np.float32), float(adv[k]), feats))
    batches = [to_global(self._pack(resp), self.mesh) for resp in per_mb]
    if self.with_ref:
      batches = [dict(b, ref_logprobs=self.ref_fn(self.ref_params, b)) for b in batches]
    sums, losses, norms, skipped = {}, [], [], 0
    for b in batches:
      self.state, sm = self.fns.step(self.state, b)
      sm = jax.tree.map(_host, sm)
      losses.append(float(sm["loss"]))
      norms.append(float(sm["grad_norm"]))
      skipped += int(bool(sm["skipped_step"]))
      for k in ("responses", "response_tokens", "clip_sum", "clip_low_sum", "clip_high_sum", "ratio_sum",
                "log_ratio_token_sum", "kl_sum"):
        if k in sm:
          sums[k] = sums.get(k, 0.0) + float(sm[k])
    t_update = time.perf_counter() - t3
    self.step_num += 1
    # Metrics over every process's groups.
    all_r = np.concatenate(rewards) if rewards else np.zeros(0)
    lengths = np.asarray([len(x.tokens) for grp in groups for x in grp], np.float64)
    old_lp = np.concatenate([np.asarray(x.logprobs, np.float64) for grp in groups for x in grp] or [np.zeros(0)])
    no_signal = sum(float(np.all(rw == rw[0])) for rw in rewards)
    hinted = sum(1 for lv in hint_levels if lv > 0)
    names = [name for name, _, _ in self.rewards.parts]  # each reward's own mean, unweighted (TRL's rewards/<name>)
    part_sums = [sum(float(np.sum(pt[name])) for pt in parts) for name in names]
    sums_here = [all_r.sum(), np.square(all_r).sum(), len(all_r), sum(c.sum() for c in corrects), len(prompts),
                 no_signal, lengths.sum(), -old_lp.sum(), len(old_lp), hinted, self.rollouts.tokens - tok0,
                 self.rollouts.seconds - sec0]
    seen = self.stream.stats()  # prompts left out so far (cumulative), this process's
    skips = [seen["skipped"].get(reason, 0) for reason in SKIPS] + [sum(seen["bad"].values())]
    a, b = len(sums_here), len(sums_here) + len(skips)
    tot = _allsum(np.asarray(sums_here + skips + part_sums, np.float64))  # one collective for all of them
    (r_sum, r_sq, n_resp, n_correct, n_groups, n_flat, len_sum, nlp_sum, n_tok, n_hinted, gen_tokens,
     gen_seconds), skip_tot, part_tot = tot[:a], tot[a:b], tot[b:]
    n_proc = jax.process_count()
    step_seconds = time.perf_counter() - t0
    mean = r_sum / max(n_resp, 1)
    rec = {"step": self.step_num, "loss": float(np.mean(losses)), "grad_norm": float(np.mean(norms)),
           "reward_mean": mean, "reward_std": float(np.sqrt(max(r_sq / max(n_resp, 1) - mean ** 2, 0.0))),
           "pass_rate": n_correct / max(n_resp, 1), "no_signal_share": n_flat / max(n_groups, 1),
           "hinted_groups": n_hinted, "clip_fraction": sums.get("clip_sum", 0.0) / max(sums.get("responses", 1), 1),
           "clip_fraction_low": sums.get("clip_low_sum", 0.0) / max(sums.get("responses", 1), 1),
           "clip_fraction_high": sums.get("clip_high_sum", 0.0) / max(sums.get("responses", 1), 1),
           "ratio_mean": sums.get("ratio_sum", 0.0) / max(sums.get("responses", 1), 1),
           "response_length": len_sum / max(n_resp, 1), "entropy": nlp_sum / max(n_tok, 1),
           "rollout_tokens_per_second": gen_tokens / max(gen_seconds / n_proc, 1e-9),
           "tokens_per_second": gen_tokens / max(gen_seconds / n_proc, 1e-9),
           "rollout_share": t_rollout / step_seconds, "step_seconds": step_seconds, "rollout_seconds": t_rollout,
           "reward_seconds": max(t_reward, 0.0), "update_seconds": t_update, "data_seconds": t_data,
           "skipped_steps": int(_host(self.state["skipped"])), "skipped_updates": skipped,
           "optimizer_steps": int(_host(self.state["step"]))}
    rec.update({f"reward/{name}": float(v) / max(n_resp, 1) for name, v in zip(names, part_tot)})
    rec.update({f"prompts_skipped/{SKIPS[reason][0]}": int(v) for reason, v in zip(SKIPS, skip_tot)})
    rec["prompts_bad"] = int(skip_tot[-1])
    if "kl_sum" in sums:
      rec["kl"] = sums["kl_sum"] / max(sums["responses"], 1)
    if self.records.reward_before is None:
      self.records.reward_before = mean
    self.records.reward_after = mean
    return rec

  def save(self, force: bool = False):
    self.stream.host_state = self.records.state()
    return self.ckpt.maybe_save(self.step_num, self.state, self.stream, force=force)


def train_rl(cfg: RLRunConfig) -> dict:
  from train.loop import NonFiniteError, _Preemption
  rl = RLRun(cfg)
  writer = MetricsWriter(rl.run_dir, cfg.steps, rl.primary, resume_step=rl.step_num)
  try:
    with _Preemption() as preempt:
      while rl.step_num < cfg.steps:
        rec = rl.step()
        step = rl.step_num
        if step % cfg.log_every == 0 or step == cfg.steps or rec["skipped_updates"]:
          writer.write(rec)
          if rl.primary:
            print(f"  rl step {step}: reward {rec['reward_mean']:.3f}  pass {rec['pass_rate']:.2f}  "
                  f"no-signal {rec['no_signal_share']:.2f}  clip {rec['clip_fraction']:.3f}  "
                  f"len {rec['response_length']:.0f}  rollout {100 * rec['rollout_share']:.0f}% of "
                  f"{rec['step_seconds']:.1f}s", file=sys.stderr, flush=True)
        nonfinite = int(_host(rl.state["nonfinite"]))
        if rec["skipped_updates"]:
          log.warning("RL step %d: %d non-finite update(s) skipped", step, rec["skipped_updates"])
        if nonfinite >= cfg.max_nonfinite:
          raise NonFiniteError(
              f"{nonfinite} consecutive optimizer steps (up to RL step {step}) had a non-finite loss or gradient; "
              f"stopping (max_nonfinite={cfg.max_nonfinite}). The last good checkpoint is step "
              f"{rl.ckpt.latest_step()} in {rl.ckpt.dir}. Lower the learning rate or check the rewards.")
        rl.save(force=step == cfg.steps or preempt.requested)
        if preempt.requested:
          rl.ckpt.wait()
          log.warning("checkpoint of RL step %d saved; exiting after SIGTERM", step)
          return _result(rl, preempted=True)
      if rl.ckpt.latest_step() != rl.step_num:
        rl.save(force=True)
  finally:
    rl.ckpt.close()
    writer.close()
    rl.records.write(rl.run_dir, jax.process_index())
  return _result(rl)


def _result(rl: RLRun, preempted: bool = False) -> dict:
  recs = read_metrics(rl.run_dir) if rl.primary else []
  before = recs[0]["reward_mean"] if recs else rl.records.reward_before
  after = recs[-1]["reward_mean"] if recs else rl.records.reward_after
  out = {"run_dir": rl.run_dir, "final_step": rl.step_num, "reward_before": before, "reward_after": after}
  if preempted:
    out["preempted"] = True
  return out
