"""The RL rollout engine: G samples per prompt through a fixed number of decode slots.

  engine = RolloutEngine(model, tokenizer, slots=32)
  engine.set_weights(model_or_state)                       # every RL step; no rebuild, no recompile
  out = engine.generate([Request(prompt, SamplingParams(temperature=1.0, seed=s), n=8), ...])
  out.groups[i][j]                                         # Generation j of request i
  out.vision_encodes, out.prefills, out.trace_counts      # counters (tests and benchmarks read them)

How a rollout runs:
  vision   each prompt's images/frames go through the vision tower and projector once (`_encode`); the
           tower's features and the projected tokens are kept (`Rollout.vision_features`,
           `Rollout.vision_tokens`) for later log-prob passes;
  prefill  once per prompt, at batch 1 in the prompt's own length bucket (`_prefill`): its K/V (heads-major,
           (L, 1, Hkv, S, hd)) and the logits of its last token stay on the device until its G samples
           have all entered a slot;
  insert   a sample entering slot r copies its prompt's K/V into cache row r (slots 0..S-1, the rest of
           the row marked empty) and draws its first token from the prompt's logits (`_insert`);
  decode   one jitted `lax.while_loop` over all slots (`_decode`): every row has its own cache index,
           position, sampling knobs, key, stop ids and token budget. It returns to the host as soon as a
           row finishes while samples are waiting (or after `chunk` steps when stop strings need looking
           at); the host collects the finished rows and refills their slots, and the loop goes on.
Every jitted function has fixed shapes: slots, the cache length T = (largest prompt bucket) + (largest
new-token bucket), the prompt and vision-patch buckets. A stream of rollouts compiles each once: the slot
state is kept between calls and reused while it is large enough (it only grows).

Reproducibility: sample j of a request with seed s draws its t-th token with
fold_in(fold_in(key(s), j), t), from logits that depend on its own row only (every cache row is laid out
the same whatever the slot; empty and padding slots are masked to an exact zero weight), so its tokens
do not depend on which slot it ran in or what ran beside it.

Log-probs are those of the sampled distribution (see `keye_jax.generate.sample_token`): at temperature 1
without top-k/top-p, the model's own log_softmax of the chosen tokens.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keye_jax import rope
from keye_jax.generate import (LENGTH_BUCKETS, MAX_STOP_IDS, NEW_TOKEN_BUCKETS, PATCH_BUCKETS, Generation, Prompt,
                               SamplingParams, bucket, constrain_cache, decode_text, default_stop_ids,
                               finish_generation, mesh_context, pack_prompts, put_weights, sample_token)
from keye_jax.model import KeyeVL, scatter_vision
from keye_jax.sharding import constrain, logical_to_spec


@dataclasses.dataclass(frozen=True)
class Request:
  """`n` samples of one prompt, all with `params` or each with its own (a sequence of n SamplingParams,
  e.g. per-sample token budgets). Sample j is seeded by fold_in(key(seed), j), seed from its params."""

  prompt: Prompt
  params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
  n: int = 1

  def sample_params(self, j: int) -> SamplingParams:
    return self.params if isinstance(self.params, SamplingParams) else self.params[j]

  def all_params(self) -> list[SamplingParams]:
    return [self.sample_params(j) for j in range(self.n)]


@dataclasses.dataclass
class Rollout:
  """Per request, its n Generations (in sample order), plus what it cost."""

  groups: list[list[Generation]]
  vision_encodes: int               # vision tower + projector calls (one per prompt with images/videos)
  prefills: int                     # prompt prefills (one per prompt, whatever n)
  decode_steps: int                 # iterations of the decode loop (all slots at once)
  busy_slot_steps: int              # sum over those steps of the slots holding a running sample
  slots: int
  trace_counts: dict                # jitted function -> times traced (compiled) so far by this engine
  vision_tokens: list               # per request: projected vision tokens (1, T, D) on the device, or None
  vision_features: list = dataclasses.field(default_factory=list)  # per request: tower output (1, P, Dv) or None
  slot_steps: int = 0               # sum over decode steps of the slots computed (fewer in the tail phase)
  decode_seconds: float = 0.0       # wall time inside the decode loop (incl. reading back its results)

  @property
  def slot_utilisation(self) -> float:
    """Running rows over rows computed, per decode step."""
    return self.busy_slot_steps / max(1, self.slot_steps or self.decode_steps * self.slots)

  def __len__(self):
    return len(self.groups)

  def __getitem__(self, i):
    return self.groups[i]

  def __iter__(self):
    return iter(self.groups)


class RolloutEngine:
  """Continuous batching over `slots` decode rows for a KeyeVL model (weights are arguments, never
  constants). `chunk`: decode steps between host looks when a request has stop strings. With `mesh`,
  the slots are split over its data/fsdp axes and the cache follows the model's sharding rules.

  `tail_slots`: smaller slot counts the last running rows move to once nothing waits (each a compiled
  decode of its own). On the CPU a step costs in proportion to its rows, and a long-tailed rollout
  spends most of its steps on a few long samples (bench_rollout: 401 of 694 steps with <= 8 of 32 rows
  running); on a TPU a decode step streams the weights whatever its rows and the ragged kernel skips
  finished rows' cache, so the default there is none (on the CPU: slots/4 and slots/16 from 16 slots)."""

  def __init__(self, model: KeyeVL, tokenizer=None, *, slots: int = 32, mesh=None,
               stop_token_ids: Sequence[int] | None = None, length_buckets=LENGTH_BUCKETS,
               new_token_buckets=NEW_TOKEN_BUCKETS, patch_buckets=PATCH_BUCKETS, chunk: int = 32,
               tail_slots: Sequence[int] | None = None):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    self._shardings = jax.tree.map(lambda a: a.sharding, self.state)
    self.tokenizer, self.mesh, self.slots, self.chunk = tokenizer, mesh, int(slots), int(chunk)
    self.length_buckets, self.new_token_buckets = tuple(length_buckets), tuple(new_token_buckets)
    self.patch_buckets = tuple(patch_buckets)
    self.stop_token_ids = tuple(default_stop_ids(self.cfg, tokenizer) if stop_token_ids is None
                                else stop_token_ids)
    vision_ids = {self.cfg.image_token_id, self.cfg.video_token_id}
    self.pad_id = next(i for i in range(len(vision_ids) + 1) if i not in vision_ids)
    self.merge = self.cfg.vision.spatial_merge_size if self.cfg.vision is not None else 2
    self.trace_counts: collections.Counter = collections.Counter()
    self._encode = jax.jit(self._encode_fn)
    self._prefill = jax.jit(self._prefill_fn)
    self._new_carry = jax.jit(self._new_carry_fn, static_argnames=("cache_len", "new_len"))
    self._insert = jax.jit(self._insert_fn, static_argnames=("greedy",), donate_argnums=(0,))
    self._decode = jax.jit(self._decode_fn, static_argnames=("greedy",), donate_argnums=(1,))
    self._shrink = jax.jit(self._shrink_fn, static_argnames=("slots",))
    self._carry, self._carry_shape = None, ()
    # Later prompt shapes and the tail phase compile on a background thread (`_warm_up`).
    self._warm_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-warm")
    self._warm: set = set()
    rows = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    if tail_slots is None:
      # (below 16 slots the saving is smaller than the extra compiles)
      tail_slots = ((self.slots // 4, self.slots // 16) if jax.default_backend() == "cpu" and self.slots >= 16
                    else ())
    self.tail_slots = tuple(sorted({int(n) for n in tail_slots if 0 < n < self.slots and n % rows == 0},
                                   reverse=True))

  def set_weights(self, model_or_state) -> None:
    """New weights (a KeyeVL or its nnx.State, same structure/shapes/dtypes), put onto the engine's
    shardings in one device_put (no copy where they already lie there); nothing recompiles."""
    self.state = put_weights(model_or_state, self.state, self._shardings)

  # ---- jitted bodies ----------------------------------------------------------------------------

  def _encode_fn(self, state, vision):
    """Vision tower + projector for one prompt: (1, P, C*p*p) patches -> the tower's features (1, P, Dv)
    and the (1, T, D) text-space tokens."""
    self.trace_counts["encode"] += 1
    model = nnx.merge(self.graphdef, state)
    feats = model.vision(vision["pixel_values"], vision["patch_segment_ids"], vision["patch_pos"])
    return feats, model.projector(feats, vision["merge_index"])

  def _prefill_fn(self, state, batch, vision_tokens):
    """One prompt (1, S): its K/V (L, 1, Hkv, S, hd), segment ids (1, S) and last-token logits (1, V)."""
    self.trace_counts["prefill"] += 1
    model = nnx.merge(self.graphdef, state)
    dec = model.decoder
    x = dec.embed(batch["input_ids"])
    if vision_tokens is not None:
      x = scatter_vision(x, vision_tokens, model.vision_token_mask(batch["input_ids"]))
    s = batch["input_ids"].shape[1]
    h, cache = dec.prefill(x, batch["position_ids"], batch["segment_ids"], dec.init_cache(1, s))
    return cache["k"], cache["v"], cache["segment_ids"], dec.logits(h[:, -1]).astype(jnp.float32)

  def _new_carry_fn(self, state, *, cache_len, new_len):
    self.trace_counts["new_carry"] += 1
    model = nnx.merge(self.graphdef, state)
    b = self.slots
    cache = model.decoder.init_cache(b, cache_len)
    cache["index"] = jnp.zeros((b,), jnp.int32)
    # One array per layer, scanned model or not: the decode step runs its layers unrolled (`_layers`) and
    # each layer's attention reads its own array where it lies (a slice of a stacked cache is copied for the
    # kernel, and the stacked cache's per-row writes make XLA re-lay it out around the loop).
    cache["k"], cache["v"] = list(cache["k"]), list(cache["v"])
    zi, zf, no = jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool)
    return _constrain_carry(dict(
        cache=cache, tokens=jnp.zeros((b, new_len), jnp.int32), logprobs=jnp.zeros((b, new_len), jnp.float32),
        length=zi, pos=zi, max_new=zi, active=no, stopped=no, key=jnp.zeros((b, 2), jnp.uint32),
        temperature=zf, top_k=zi, top_p=jnp.ones((b,), jnp.float32),
        stop_ids=jnp.full((b, MAX_STOP_IDS), -1, jnp.int32),
        steps=jnp.zeros((), jnp.int32), busy=jnp.zeros((), jnp.int32)))

  def _insert_fn(self, carry, k, v, seg, logits, slot, key, temperature, top_k, top_p, max_new, stop_ids, pos,
                 *, greedy):
    """Sample `key` (a raw (2,) key) of a prefilled prompt enters `slot`: prompt K/V into cache row
    `slot` (slots 0..S-1, the rest empty), first token drawn from the prompt's logits."""
    self.trace_counts["insert"] += 1
    cache = carry["cache"]
    s, t = k.shape[3], cache["segment_ids"].shape[1]
    at = (0, slot, 0, 0, 0)
    last = lambda a: jnp.swapaxes(a[:, :, :, -1:], 2, 3).astype(cache["pending_k"].dtype)   # (L, 1, 1, Hkv, hd)
    row_seg = jnp.zeros((1, t), jnp.int32).at[:, :s].set(seg)
    cache = dict(cache, k=_put_row(cache["k"], k, slot), v=_put_row(cache["v"], v, slot),
                 segment_ids=jax.lax.dynamic_update_slice(cache["segment_ids"], row_seg, (slot, 0)),
                 pending_k=jax.lax.dynamic_update_slice(cache["pending_k"], last(k), at),
                 pending_v=jax.lax.dynamic_update_slice(cache["pending_v"], last(v), at),
                 index=cache["index"].at[slot].set(s))
    one = lambda a: jnp.asarray(a)[None]
    keys = jax.random.fold_in(jax.random.wrap_key_data(key), 0)[None]
    tok, logp = sample_token(logits, keys, one(temperature), one(top_k), one(top_p), greedy=greedy)
    hit = jnp.any(tok[0] == stop_ids)
    n = carry["tokens"].shape[1]
    c = dict(carry, cache=cache)
    c["tokens"] = jax.lax.dynamic_update_slice(carry["tokens"], jnp.zeros((1, n), jnp.int32).at[0, 0].set(tok[0]),
                                               (slot, 0))
    c["logprobs"] = jax.lax.dynamic_update_slice(
        carry["logprobs"], jnp.zeros((1, n), jnp.float32).at[0, 0].set(logp[0]), (slot, 0))
    for name, value in (("length", 1), ("pos", pos), ("max_new", max_new), ("active", ~hit & (max_new > 1)),
                        ("stopped", hit), ("key", key), ("temperature", temperature), ("top_k", top_k),
                        ("top_p", top_p), ("stop_ids", stop_ids)):
      c[name] = carry[name].at[slot].set(value)
    return _constrain_carry(c)

  def _decode_fn(self, state, carry, limit, refill, stop_below, *, greedy):
    """At most `limit` steps of every slot; with `refill`, stops as soon as a running row finishes;
    stops too once at most `stop_below` rows are running (they then move to fewer slots)."""
    self.trace_counts["decode"] += 1
    model = nnx.merge(self.graphdef, state)
    dec, t = model.decoder, model.decoder.cfg
    b = carry["tokens"].shape[0]
    rows = jnp.arange(b)
    running_at_entry = jnp.sum(carry["active"])

    def body(c):
      cache, live = c["cache"], c["active"]
      idx = cache["index"]
      prev = c["tokens"][rows, jnp.maximum(c["length"] - 1, 0)]                        # (B,)
      # The previous token's K/V (pending) go to slot index-1 of each row before anything reads the cache.
      at = jnp.maximum(idx - 1, 0)
      k_cache = _put_pending(cache["k"], cache["pending_k"], at)
      v_cache = _put_pending(cache["v"], cache["pending_v"], at)
      per_layer = list(zip(k_cache, v_cache)) if isinstance(k_cache, list) else (k_cache, v_cache)
      pos = jnp.broadcast_to(c["pos"][None, :, None], (3, b, 1))
      cos, sin = rope.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section)
      h, (k, v) = _layers(dec.layers, dec.embed(prev[:, None]), per_layer, cos=cos, sin=sin, segment_ids=None,
                          kv_segment_ids=cache["segment_ids"], kv_lengths=idx, return_kv=True)
      logits = dec.logits(dec.norm(h)[:, 0])
      keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(c["key"]), c["length"])
      tok, logp = sample_token(logits, keys, c["temperature"], c["top_k"], c["top_p"], greedy=greedy)
      write = jnp.where(live, c["length"], c["tokens"].shape[1])                         # out of range: dropped
      hit = live & jnp.any(tok[:, None] == c["stop_ids"], axis=1)
      length = c["length"] + live
      keep = lambda new, old: jnp.where(live[None, :, None, None, None], new.astype(old.dtype), old)
      cache = dict(cache, k=k_cache, v=v_cache, index=idx + live,
                   pending_k=keep(k, cache["pending_k"]), pending_v=keep(v, cache["pending_v"]),
                   segment_ids=cache["segment_ids"].at[rows, jnp.where(live, idx, cache["segment_ids"].shape[1])]
                   .set(1, mode="drop"))
      return _constrain_carry(dict(
          c, cache=cache, tokens=c["tokens"].at[rows, write].set(tok, mode="drop"),
          logprobs=c["logprobs"].at[rows, write].set(logp, mode="drop"), length=length, pos=c["pos"] + live,
          active=live & ~hit & (length < c["max_new"]), stopped=c["stopped"] | hit, steps=c["steps"] + 1,
          busy=c["busy"] + jnp.sum(live), loop=c["loop"] + 1))

    def cond(c):
      running = jnp.sum(c["active"])
      return ((c["loop"] < limit) & (running > 0) & ~(refill & (running < running_at_entry))
              & ~((running <= stop_below) & (running < running_at_entry)))

    out = jax.lax.while_loop(cond, body, dict(carry, loop=jnp.zeros((), jnp.int32)))
    out.pop("loop")
    return out

  def _shrink_fn(self, carry, rows, *, slots):
    """The slot state of rows `rows` (slots,) of `carry`, as a carry of `slots` rows (the tail phase)."""
    self.trace_counts["shrink"] += 1
    take = lambda a, axis=0: jnp.take(a, rows, axis=axis)
    cache = carry["cache"]
    kv = lambda x: [take(a) for a in x] if isinstance(x, list) else take(x, 1)
    small = {k: (v if jnp.ndim(v) == 0 else take(v)) for k, v in carry.items() if k != "cache"}
    small["cache"] = dict(k=kv(cache["k"]), v=kv(cache["v"]), segment_ids=take(cache["segment_ids"]),
                          index=take(cache["index"]), pending_k=take(cache["pending_k"], 1),
                          pending_v=take(cache["pending_v"], 1))
    return _constrain_carry(small)

  # ---- host loop --------------------------------------------------------------------------------

  def generate(self, requests: Sequence[Request | tuple]) -> Rollout:
    """Runs every request's n samples; a request may be a `Request` or a (prompt, params, n) tuple."""
    reqs = [r if isinstance(r, Request) else Request(*r) for r in requests]
    for r in reqs:
      if r.n < 1 or (not isinstance(r.params, SamplingParams) and len(r.params) != r.n):
        raise ValueError(f"a request needs n >= 1 and one SamplingParams or n of them, got n={r.n}")
      for p in r.all_params():
        if len(self._stop_ids(p)) > MAX_STOP_IDS:
          raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(self._stop_ids(p))}")
        if p.max_new_tokens < 1:
          raise ValueError(f"max_new_tokens must be >= 1, got {p.max_new_tokens}")
    every = [p for r in reqs for p in r.all_params()]
    seq_lens = [bucket(len(r.prompt.input_ids), self.length_buckets) for r in reqs]
    new_len = bucket(max(p.max_new_tokens for p in every), self.new_token_buckets)
    cache_len = max(seq_lens) + new_len
    greedy = all(p.temperature <= 0 for p in every)
    counts = collections.Counter()
    groups: list[list[Generation | None]] = [[None] * r.n for r in reqs]
    vision_tokens: list = [None] * len(reqs)
    vision_features: list = [None] * len(reqs)
    queue = collections.deque((i, j) for i, r in enumerate(reqs) for j in range(r.n))
    left = [r.n for r in reqs]                       # samples of request i not yet in a slot
    prompts: dict[int, tuple] = {}                   # prefilled prompts with samples still waiting
    owner: list[tuple[int, int] | None] = [None] * self.slots
    watch = any(p.stop_strings for p in every)

    with mesh_context(self.mesh):
      # The slot state is kept between calls and reused while it is large enough (no recompile).
      carry, shape = self._carry, self._carry_shape
      self._carry = None
      if carry is None or shape[0] < cache_len or shape[1] < new_len:
        shape = (max(cache_len, shape[0] if shape else 0), max(new_len, shape[1] if shape else 0))
        carry = self._new_carry(self.state, cache_len=shape[0], new_len=shape[1])
      warm_prompts, warm = self._warm_up(reqs, seq_lens, carry, greedy)
      steps0, busy0 = (int(x) for x in jax.device_get((carry["steps"], carry["busy"])))
      big, slot_steps, decode_s, tails = None, 0, 0.0, list(self.tail_slots)   # big: the full state, once shrunk
      last_steps = steps0
      while queue or any(o is not None for o in owner):
        for slot in range(len(owner)):
          if owner[slot] is not None or not queue:
            continue
          i, j = queue.popleft()
          if i not in prompts:
            prompt_shape = self._prompt_shape(reqs[i], seq_lens[i])
            if prompt_shape in warm_prompts:
              warm_prompts.pop(prompt_shape).result()   # compiled in the background: wait, never twice
            prompts[i] = self._prefill_prompt(reqs[i], seq_lens[i], vision_features, vision_tokens, i, counts)
          carry = self._insert(carry, *prompts[i][:4], jnp.int32(slot), *self._sample_knobs(reqs[i], j),
                               prompts[i][4], greedy=greedy)
          owner[slot] = (i, j)
          left[i] -= 1
          if left[i] == 0:
            del prompts[i]                            # its K/V are no longer needed
        limit = self.chunk if watch else shape[1]
        tails = [n for n in tails if n < len(owner)]
        t0 = time.perf_counter()
        carry = self._decode(self.state, carry, jnp.int32(limit), jnp.bool_(bool(queue)),
                             jnp.int32(tails[0] if tails and not queue else 0), greedy=greedy)
        active, length, stopped, n = jax.device_get((carry["active"], carry["length"], carry["stopped"],
                                                     carry["steps"]))
        decode_s += time.perf_counter() - t0
        slot_steps, last_steps = slot_steps + (int(n) - last_steps) * len(owner), int(n)
        finished = [s for s in range(len(owner)) if owner[s] is not None and not active[s]]
        if watch:
          carry, finished = self._stop_strings(carry, reqs, owner, active, length, finished)
          stopped = np.asarray(jax.device_get(carry["stopped"]))
        if finished:
          tokens, logprobs = jax.device_get((carry["tokens"], carry["logprobs"]))
          for s in finished:
            i, j = owner[s]
            p = reqs[i].sample_params(j)
            groups[i][j] = finish_generation(self.decode, tokens[s, :length[s]], logprobs[s, :length[s]],
                                             bool(stopped[s]), p.stop_strings, self._stop_ids(p))
            owner[s] = None
        running = [s for s in range(len(owner)) if owner[s] is not None]
        if not queue and tails and running and len(running) <= tails[0]:
          # Nothing waits: the running rows move to a smaller slot state (the full one is kept for reuse).
          n = min(m for m in tails if m >= len(running))
          rows = running + [s for s in range(len(owner)) if owner[s] is None][:n - len(running)]
          if big is None:
            big = carry
          if n in warm:
            warm[n].result()                          # its compile, started in the background, is done
          carry = self._shrink(carry, jnp.asarray(rows, jnp.int32), slots=n)
          owner = [owner[r] for r in rows]
          tails = [m for m in tails if m < n]
      steps, busy = (int(x) for x in jax.device_get((carry["steps"], carry["busy"])))
      for f in [*warm_prompts.values(), *warm.values()]:   # no compile outlives the call that started it
        f.result()
      if big is not None:                             # its rows moved on: none runs there any more
        big = dict(big, steps=carry["steps"], busy=carry["busy"], active=jnp.zeros_like(big["active"]))
    self._carry, self._carry_shape = (carry if big is None else big), shape
    return Rollout(groups=groups, vision_encodes=counts["encode"], prefills=counts["prefill"],
                   decode_steps=steps - steps0, busy_slot_steps=busy - busy0, slots=self.slots,
                   slot_steps=slot_steps, decode_seconds=decode_s,
                   trace_counts=dict(self.trace_counts), vision_tokens=vision_tokens,
                   vision_features=vision_features)

  def _warm_up(self, reqs, seq_lens, carry: dict, greedy: bool) -> tuple[dict, dict]:
    """Compiles ahead, on a background thread, what this call will need after its start: the encode,
    prefill and insert of every prompt shape but the first request's (which the call compiles right
    away), then the tail phase's shrinks and decode steps. XLA compiles outside the GIL, so these overlap
    the first prompts' compiles and the full slot state's decoding instead of adding to the call's time
    (bench_rollout: ~15 s of compiles, 8.6 s of them the three decode sizes). Returns ({prompt shape:
    Future}, {tail slots: Future}); the call waits on a future before it uses what it compiles."""
    carry_key = tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(carry))
    abstract = lambda tree, shardings: jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree, shardings)
    big = abstract(carry, jax.tree.map(lambda a: a.sharding, carry))
    uncommitted = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    knobs = uncommitted(self._sample_knobs(reqs[0], 0))
    if self.mesh is None:
      replicated = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
      replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def compile_prompt(req, seq_len):
      batch = self._prompt_batch(req, seq_len)
      batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=replicated) for k, v in batch.items()}
      with mesh_context(self.mesh):
        tokens = None
        if req.prompt.pixel_values is not None:
          vision = {k: batch[k] for k in ("pixel_values", "patch_segment_ids", "patch_pos", "merge_index")}
          lowered = self._encode.lower(self.state, vision)
          tokens = abstract(lowered.out_info, lowered.compile().output_shardings)[1]
        text = {k: batch[k] for k in ("input_ids", "segment_ids", "position_ids")}
        lowered = self._prefill.lower(self.state, text, tokens)
        kv = abstract(lowered.out_info, lowered.compile().output_shardings)
        self._insert.lower(big, *kv, scalar, *knobs, scalar, greedy=greedy).compile()

    def compile_tail(n):
      nonlocal big
      with mesh_context(self.mesh):
        lowered = self._shrink.lower(big, jax.ShapeDtypeStruct((n,), jnp.int32), slots=n)
        big = abstract(lowered.out_info, lowered.compile().output_shardings)
        self._decode.lower(self.state, big, scalar, jax.ShapeDtypeStruct((), jnp.bool_), scalar,
                           greedy=greedy).compile()

    prompts, tails = {}, {}
    first = self._prompt_shape(reqs[0], seq_lens[0])
    self._warm.add((first, carry_key, greedy))        # the call compiles it itself, first thing
    for req, seq_len in zip(reqs, seq_lens):
      shape = self._prompt_shape(req, seq_len)
      if (shape, carry_key, greedy) not in self._warm:
        self._warm.add((shape, carry_key, greedy))
        prompts[shape] = self._warm_pool.submit(compile_prompt, req, seq_len)
    if self.tail_slots and ("tails", carry_key, greedy) not in self._warm:
      self._warm.add(("tails", carry_key, greedy))
      # In order (one worker): each tail size shrinks from the one before.
      tails = {n: self._warm_pool.submit(compile_tail, n) for n in self.tail_slots}
    return prompts, tails

  def _prompt_shape(self, req: Request, seq_len: int) -> tuple:
    """What a prompt's encode/prefill/insert compiles depend on: (length bucket, patch bucket or None)."""
    p = req.prompt
    return seq_len, (bucket(len(p.pixel_values), self.patch_buckets) if p.pixel_values is not None else None)

  def _prompt_batch(self, req: Request, seq_len: int) -> dict:
    """The prompt as a one-row batch on the host (pack_prompts' keys)."""
    return pack_prompts([req.prompt], seq_len=seq_len, batch_size=1, num_patches=self._prompt_shape(req, seq_len)[1],
                        merge=self.merge, pad_id=self.pad_id)

  def _prefill_prompt(self, req: Request, seq_len: int, vision_features: list, vision_tokens: list, i: int,
                      counts) -> tuple:
    has_vision = req.prompt.pixel_values is not None
    batch = self._prompt_batch(req, seq_len)
    pos_next = int(batch["rope_delta"][0]) + seq_len
    batch = self._put_replicated(batch)
    tokens = None
    if has_vision:
      vision = {k: batch[k] for k in ("pixel_values", "patch_segment_ids", "patch_pos", "merge_index")}
      vision_features[i], tokens = self._encode(self.state, vision)
      counts["encode"] += 1
      vision_tokens[i] = tokens
    text = {k: batch[k] for k in ("input_ids", "segment_ids", "position_ids")}
    k, v, seg, logits = self._prefill(self.state, text, tokens)
    counts["prefill"] += 1
    return k, v, seg, logits, jnp.int32(pos_next)

  def _put_replicated(self, batch: dict) -> dict:
    """A one-prompt batch: on the default device, or replicated over the mesh."""
    if self.mesh is None:
      return jax.device_put(batch)            # (jnp.asarray traces a conversion per array: ~50 ms a prompt)
    from jax.sharding import NamedSharding, PartitionSpec as P
    return {k: jax.device_put(v, NamedSharding(self.mesh, P())) for k, v in batch.items()}

  def _sample_knobs(self, req: Request, j: int) -> tuple:
    p = req.sample_params(j)
    stop = list(self._stop_ids(p))
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(p.seed), j))
    return (key, jnp.float32(p.temperature), jnp.int32(p.top_k), jnp.float32(p.top_p),
            jnp.int32(p.max_new_tokens), jnp.asarray(stop + [-1] * (MAX_STOP_IDS - len(stop)), jnp.int32))

  def _stop_ids(self, p: SamplingParams) -> tuple[int, ...]:
    return self.stop_token_ids if p.stop_token_ids is None else tuple(p.stop_token_ids)

  def _stop_strings(self, carry, reqs, owner, active, length, finished):
    """Running rows whose text holds one of their stop strings finish now (their slots free up)."""
    tokens = None
    hits = []
    for s in range(len(owner)):
      if owner[s] is None or not active[s] or not reqs[owner[s][0]].sample_params(owner[s][1]).stop_strings:
        continue
      if tokens is None:
        tokens = jax.device_get(carry["tokens"])
      p = reqs[owner[s][0]].sample_params(owner[s][1])
      stop_ids = set(self._stop_ids(p))
      text = self.decode([t for t in tokens[s, :length[s]] if int(t) not in stop_ids])
      if any(x in text for x in p.stop_strings):
        hits.append(s)
    if not hits:
      return carry, finished
    mask = np.zeros(len(owner), bool)
    mask[hits] = True
    mask = jnp.asarray(mask)
    carry = dict(carry, active=carry["active"] & ~mask, stopped=carry["stopped"] | mask)
    return carry, finished + hits

  def decode(self, ids) -> str:
    return decode_text(self.tokenizer, ids)


def _layers(stack, x, per_layer, **shared):
  """`stack(x, per_layer, **shared)` (keye_jax.stack.Stack), its layers unrolled when `per_layer` is a list
  (one cache entry per layer), scanned model or not: layer i runs on its slice of the stacked parameters
  and its own cache arrays, so nothing slices (copies) a stacked cache."""
  if not (stack.scan and isinstance(per_layer, list)):
    return stack(x, per_layer, **shared)
  graphdef, state = nnx.split(stack.layers)
  outs = []
  for i in range(stack.num_layers):
    x, out = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(x, per_layer[i], **shared)
    outs.append(out)
  return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def _put_row(cache_kv, kv_l1hsd, slot):
  """A prefilled prompt's K/V (L, 1, Hkv, S, hd) into slots 0..S-1 of cache row `slot` (stacked or per layer)."""
  if isinstance(cache_kv, list):
    return [jax.lax.dynamic_update_slice(c, kv_l1hsd[l].astype(c.dtype), (slot, 0, 0, 0))
            for l, c in enumerate(cache_kv)]
  return jax.lax.dynamic_update_slice(cache_kv, kv_l1hsd.astype(cache_kv.dtype), (0, slot, 0, 0, 0))


SLOT_BLOCK = 8   # cache slots a pending write reads and writes back (the TPU tile's second-minor extent)


def _put_pending(cache_kv, pending_lb1hd, at):
  """Each row's pending K/V (L, B, 1, Hkv, hd) into its slot at[row] (written before anything reads).

  Per row, the aligned block of SLOT_BLOCK slots holding at[row] is read, the slot replaced, and the block
  written back in place (dynamic_update_slice). A one-slot write (a scatter of the rows' (Hkv, hd) windows,
  or a one-slot dynamic_update_slice) makes XLA TPU lay the cache out heads-minor to write whole tiles, so
  it copies the cache around the loop and copies each layer back to the attention kernel's layout. Under a
  mesh the rows are written per shard (shard_map)."""
  per_layer = isinstance(cache_kv, list)
  t = (cache_kv[0] if per_layer else cache_kv).shape[-2]
  n = math.gcd(t, SLOT_BLOCK)

  def put_one(a, u, b, at_b):            # a (B, Hkv, T, hd), u (1, Hkv, 1, hd)
    base = at_b // n * n
    blk = jax.lax.dynamic_slice(a, (b, 0, base, 0), (1, a.shape[1], n, a.shape[3]))
    blk = jnp.where((jnp.arange(n) == at_b - base)[None, None, :, None], u.astype(a.dtype), blk)
    return jax.lax.dynamic_update_slice(a, blk, (b, 0, base, 0))

  def put(cache_kv, pending, at):
    def row(b, c):
      u = jnp.swapaxes(jax.lax.dynamic_slice_in_dim(pending, b, 1, axis=1), 2, 3)            # (L, 1, Hkv, 1, hd)
      if per_layer:
        return [put_one(a, u[l], b, at[b]) for l, a in enumerate(c)]
      return jnp.stack([put_one(c[l], u[l], b, at[b]) for l in range(c.shape[0])])
    return jax.lax.fori_loop(0, at.shape[0], row, cache_kv)

  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return put(cache_kv, pending_lb1hd, at)
  spec = lambda names: logical_to_spec(names, mesh_axes=mesh.axis_names)
  kv = ([spec(("batch", "act_heads", None, None))] * len(cache_kv) if per_layer
        else spec(("layers", "batch", "act_heads", None, None)))
  return jax.shard_map(put, in_specs=(kv, spec(("layers", "batch", None, "act_heads", None)), spec(("batch",))),
                       out_specs=kv, check_vma=False)(cache_kv, pending_lb1hd, at)


def _constrain_carry(c: dict) -> dict:
  c = dict(c, cache=constrain_cache(c["cache"]))
  c["cache"]["index"] = constrain(c["cache"]["index"], ("batch",))
  return c
