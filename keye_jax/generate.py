"""Batched, jitted sampling with a preallocated KV cache.

One `Sampler.generate(prompts, params)` call:
  host     left-pads the prompts into a shape bucket (batch, prompt length, vision patches and new tokens
           each rounded up to a few sizes, so a stream of different prompts reuses compiled programs);
  prefill  one jitted call: vision tower + scatter (`model.embed`, once per prompt), the decoder over the
           prompt writing slots 0..S-1 of a fresh cache of length S + N, and the first sampled token;
  decode   one jitted `lax.while_loop` that feeds each token back, one cache slot per step, until every
           row has stopped or the step limit is reached. Streaming and stop strings run the same loop in
           chunks and look at the text on the host in between.

Positions: a prompt carries its own 3D position ids (3, S) (text-only: 0..S-1). Left padding puts the
prompt at the end of the bucket; pad slots get position 1 and segment id 0. After the prompt all three
rows are `cache slot + rope_delta` with rope_delta = max(prompt ids) + 1 - S_bucket (model.md §5).

Sampling: greedy (temperature 0), or temperature then top-k then top-p, seeded by `jax.random.key(seed)`
folded with the step number, so a run is reproducible whatever the chunking.

Log-probs: `Generation.logprobs` are the log-probabilities of the chosen tokens under the distribution
they were SAMPLED from: log_softmax(logits / temperature) restricted to the top-k/top-p support and
renormalised over it. Greedy (temperature 0) keeps the model's own log_softmax of the raw logits. The RL
contract: at temperature 1 with top_k=0 and top_p=1 both are exactly the model's log_softmax of the
chosen tokens, i.e. what the trainer recomputes with a full forward (old-policy log-probs).

Weights: `set_weights(model_or_state)` swaps in new weights (e.g. every RL step) without rebuilding or
recompiling: they are put onto the sampler's own shardings in one `jax.device_put` (a no-op when the
arrays already lie there). The compiled programs take the weights as arguments, never as constants.

The multi-sample RL rollout engine (continuous batching, one prefill per prompt) is `keye_jax.rollout`;
it shares this module's maths (`sample_token`, `pack_prompts`, `bucket`). The `keye generate` command
lives in `keye_jax.cli.generate`.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from keye_jax import batch_layout
from keye_jax.model import KeyeVL
from keye_jax.processing import thinking
from keye_jax.processing.chat import encode_prompt
from keye_jax.processing.vision_layout import vision_layout
from keye_jax.sharding import constrain

LENGTH_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PATCH_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144)
MAX_STOP_IDS = 8          # stop ids are a fixed-size array (padded with -1) so they never recompile
THINK_END = "</think>"
_CONTROL = re.compile(r"<\|[^|<>]*\|>")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_new_tokens: int = 256
  temperature: float = 0.0          # 0 = greedy
  top_k: int = 0                    # 0 = no top-k
  top_p: float = 1.0                # 1 = no top-p
  seed: int = 0
  stop_token_ids: tuple[int, ...] | None = None   # None = the sampler's defaults (EOS, <|im_end|>)
  stop_strings: tuple[str, ...] = ()


@dataclasses.dataclass
class Prompt:
  """One tokenized prompt. position_ids (3, S) default to 0..S-1 on every row. Vision: the patches of
  every image/video frame in text order (n_patches, C*p*p) and one (h, w) patch grid per block."""

  input_ids: np.ndarray
  position_ids: np.ndarray | None = None
  pixel_values: np.ndarray | None = None
  grids_hw: np.ndarray | None = None


@dataclasses.dataclass
class Generation:
  """One sampled continuation. `logprobs[i]` is log p(tokens[i]) under the distribution the token was
  drawn from (temperature-scaled, top-k/top-p renormalised; greedy: the model's log_softmax). At
  temperature 1 without top-k/top-p it is the model's own log_softmax, what a full forward recomputes."""

  tokens: list[int]                 # generated ids, including the stop token if one ended the row
  logprobs: list[float]             # per generated token, under the sampled distribution (see above)
  text: str                         # decoded without special tokens, cut before a stop string
  finish_reason: str                # "stop" (stop token or string) or "length"
  thinking: str = ""                # text inside <think>...</think>, if any
  answer: str = ""                  # text after </think> (the whole text without thinking)


def bucket(n: int, sizes: Sequence[int]) -> int:
  """Smallest bucket >= n (beyond the largest: the next multiple of it)."""
  for s in sizes:
    if n <= s:
      return s
  top = sizes[-1]
  return -(-n // top) * top


def split_thinking(text: str) -> tuple[str, str]:
  """(thinking, answer) in all three thinking modes; an unclosed <think> is thinking with no answer
  (keye_jax.processing.thinking.split_thinking)."""
  return thinking.split_thinking(text)


# --------------------------------------------------------------------------------------------------
# Pure maths: choosing the next token.


def sample_token(logits_bv, key, temperature, top_k, top_p, *, greedy: bool):
  """Next token (B,) and its log-probability (B,) under the distribution it was drawn from.

  greedy: argmax, log-prob = log_softmax(raw logits). Otherwise: logits / temperature, then top-k, then
  top-p (on what top-k kept); the token is drawn from, and its log-prob taken under, that distribution
  renormalised over the kept support. temperature, top_k (0 = off) and top_p (>= 1 = off) are traced
  scalars or per-row (B,) arrays, so changing them never recompiles; a row with temperature <= 0 is
  greedy even on this path (the rollout engine mixes such rows). `key` is one key for the batch or one
  key per row (B,) (a row's draw then depends on its own key only). Without top-k/top-p anywhere in the
  batch the sort is skipped (a `lax.cond`).
  """
  logits_bv = logits_bv.astype(jnp.float32)
  logp_bv = jax.nn.log_softmax(logits_bv, axis=-1)
  # The first index of the row's maximum, as two plain reductions: XLA CPU runs jnp.argmax's (value, index)
  # reduction ~10x slower (3 ms of a 45 ms decode step at 32 x 8192).
  top = jnp.max(logits_bv, axis=-1, keepdims=True)
  iota = jax.lax.broadcasted_iota(jnp.int32, logits_bv.shape, 1)
  argmax = jnp.min(jnp.where(logits_bv == top, iota, logits_bv.shape[-1]), axis=-1)
  if greedy:
    return argmax, jnp.take_along_axis(logp_bv, argmax[:, None], axis=-1)[:, 0]
  row = lambda a: jnp.reshape(jnp.asarray(a), (-1, 1))            # scalar -> (1, 1), (B,) -> (B, 1)
  temperature, top_k, top_p = row(temperature), row(top_k), row(top_p)
  x = logits_bv / jnp.maximum(temperature, 1e-6)
  v = x.shape[-1]

  def threshold():
    desc = -jnp.sort(-x, axis=-1)                                    # (B, V) largest first
    rank = jnp.arange(v)[None, :]
    keep = rank < jnp.where(top_k > 0, top_k, v)                     # top-k on ranks
    p = jax.nn.softmax(jnp.where(keep, desc, -jnp.inf), axis=-1)
    keep &= ((jnp.cumsum(p, axis=-1) - p) < top_p) | (top_p >= 1.0)  # top-p on what top-k kept
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)

  filtered = jnp.any((top_k > 0) | (top_p < 1.0))
  thr = jax.lax.cond(filtered, threshold, lambda: jnp.full((x.shape[0], 1), -jnp.inf, x.dtype))
  masked = jnp.where(x >= thr, x, -jnp.inf)
  if jnp.ndim(key) == 0:
    tok = jax.random.categorical(key, masked, axis=-1)
  else:
    tok = jax.vmap(lambda k, m: jax.random.categorical(k, m))(key, masked)
  sampled_logp = jax.nn.log_softmax(masked, axis=-1)
  is_greedy = temperature[:, 0] <= 0
  tok = jnp.where(is_greedy, argmax, tok.astype(jnp.int32))
  logp = jnp.where(is_greedy[:, None], logp_bv, sampled_logp)
  return tok, jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]


# --------------------------------------------------------------------------------------------------
# Host side: prompts -> one fixed-shape batch.


def pack_prompts(prompts: Sequence[Prompt], *, seq_len: int, batch_size: int, num_patches: int | None,
                 merge: int = 2, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Left-padded batch (model.py keys) plus `rope_delta` (B,) and `dummy` (B,) for filler rows.
  Filler rows (batch rounded up) hold one token and start finished. `pad_id` must be an in-vocabulary
  id that is not a vision pad token (the scatter counts those over the whole row)."""
  ids = np.full((batch_size, seq_len), pad_id, np.int32)
  seg = np.zeros((batch_size, seq_len), np.int32)
  pos = np.ones((3, batch_size, seq_len), np.int32)
  delta = np.zeros(batch_size, np.int32)
  dummy = np.ones(batch_size, bool)
  vision = None
  if num_patches is not None:
    dim = next(p.pixel_values.shape[1] for p in prompts if p.pixel_values is not None)
    vision = dict(pixel_values=np.zeros((batch_size, num_patches, dim), np.float32))
    for k, v in vision_layout(np.zeros((0, 2)), num_patches, merge).items():
      vision[k] = np.broadcast_to(v, (batch_size,) + v.shape).copy()
  for r in range(batch_size):
    if r >= len(prompts):
      seg[r, -1], pos[:, r, -1], delta[r] = 1, 0, 1 - seq_len
      continue
    p = prompts[r]
    n = len(p.input_ids)
    row_pos = (np.broadcast_to(np.arange(n), (3, n)) if p.position_ids is None
               else np.asarray(p.position_ids).reshape(3, n))
    ids[r, seq_len - n:] = p.input_ids
    seg[r, seq_len - n:] = 1
    pos[:, r, seq_len - n:] = row_pos
    delta[r] = int(row_pos.max()) + 1 - seq_len
    dummy[r] = False
    if vision is not None and p.pixel_values is not None:
      vision["pixel_values"][r, :len(p.pixel_values)] = p.pixel_values
      for k, v in vision_layout(p.grids_hw, num_patches, merge).items():
        vision[k][r] = v
  batch = dict(input_ids=ids, segment_ids=seg, position_ids=pos, rope_delta=delta, dummy=dummy)
  if vision is not None:
    batch.update(vision)
  return batch


# --------------------------------------------------------------------------------------------------
# The sampler.


class Sampler:
  """Compiled prefill + decode loop for a KeyeVL model (weights are arguments, never constants).

  `trace_counts` counts how often each jitted function was traced, i.e. compiled: tests use it to
  prove that bucketing avoids recompiles. With `mesh`, batches are split over its data/fsdp axes and
  the cache follows the model's logical sharding rules.
  """

  def __init__(self, model: KeyeVL, tokenizer=None, *, mesh=None, stop_token_ids: Sequence[int] | None = None,
               length_buckets=LENGTH_BUCKETS, new_token_buckets=NEW_TOKEN_BUCKETS,
               batch_buckets=BATCH_BUCKETS, patch_buckets=PATCH_BUCKETS, stream_chunk: int = 16):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    self._shardings = jax.tree.map(lambda a: a.sharding, self.state)
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.length_buckets, self.new_token_buckets = tuple(length_buckets), tuple(new_token_buckets)
    self.patch_buckets = tuple(patch_buckets)
    rows = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    self.batch_buckets = tuple(b for b in batch_buckets if b % rows == 0) or (rows,)
    self.stream_chunk = stream_chunk
    self.stop_token_ids = tuple(default_stop_ids(self.cfg, tokenizer) if stop_token_ids is None
                                else stop_token_ids)
    vision_ids = {self.cfg.image_token_id, self.cfg.video_token_id}
    self.pad_id = next(i for i in range(len(vision_ids) + 1) if i not in vision_ids)
    self.trace_counts: collections.Counter = collections.Counter()
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("cache_len", "new_len", "greedy"))
    self._decode = jax.jit(self._decode_fn, static_argnames=("greedy",), donate_argnums=(1,))

  def set_weights(self, model_or_state) -> None:
    """Swap in new weights: a KeyeVL (e.g. `ModelShape.build(params)` over the trainer's arrays) or its
    `nnx.State`, same structure, shapes and dtypes as the model this sampler was built with. One
    `jax.device_put` onto the sampler's shardings reshards from the training layout (a no-op for arrays
    already there); nothing is rebuilt or recompiled."""
    self.state = put_weights(model_or_state, self.state, self._shardings)

  # ---- jitted bodies ----------------------------------------------------------------------------

  def _prefill_fn(self, state, batch, key, temperature, top_k, top_p, stop_ids, *, cache_len, new_len,
                  greedy):
    self.trace_counts["prefill"] += 1
    model = nnx.merge(self.graphdef, state)
    b = batch["input_ids"].shape[0]
    embeds = model.embed(batch)
    cache = constrain_cache(model.decoder.init_cache(b, cache_len))
    h, cache = model.decoder.prefill(embeds, batch["position_ids"], batch["segment_ids"], cache)
    logits = model.decoder.logits(h[:, -1])                        # only the last slot: (B, V)
    tok, logp = sample_token(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p, greedy=greedy)
    done = batch["dummy"] | jnp.isin(tok, stop_ids)
    return dict(cache=constrain_cache(cache),
                tokens=jnp.zeros((b, new_len), jnp.int32).at[:, 0].set(tok),
                logprobs=jnp.zeros((b, new_len), jnp.float32).at[:, 0].set(logp),
                lengths=jnp.ones((b,), jnp.int32), done=done, stopped=done & ~batch["dummy"],
                rope_delta=batch["rope_delta"], step=jnp.ones((), jnp.int32))

  def _decode_fn(self, state, carry, limit, key, temperature, top_k, top_p, stop_ids, *, greedy):
    """Runs steps carry.step .. limit-1 (or until every row is done); step i writes token i."""
    self.trace_counts["decode"] += 1
    model = nnx.merge(self.graphdef, state)
    dec = model.decoder

    def body(c):
      step, cache = c["step"], c["cache"]
      prev = jax.lax.dynamic_index_in_dim(c["tokens"], step - 1, axis=1, keepdims=False)    # (B,)
      b = prev.shape[0]
      pos = jnp.broadcast_to((cache["index"] + c["rope_delta"])[None, :, None], (3, b, 1))
      h, cache = dec.decode(dec.embed(prev[:, None]), pos, cache)
      tok, logp = sample_token(dec.logits(h[:, 0]), jax.random.fold_in(key, step), temperature, top_k,
                               top_p, greedy=greedy)
      live = ~c["done"]
      tok, logp = jnp.where(live, tok, 0), jnp.where(live, logp, 0.0)
      hit = live & jnp.isin(tok, stop_ids)
      return dict(c, cache=constrain_cache(cache),
                  tokens=jax.lax.dynamic_update_index_in_dim(c["tokens"], tok, step, axis=1),
                  logprobs=jax.lax.dynamic_update_index_in_dim(c["logprobs"], logp, step, axis=1),
                  lengths=c["lengths"] + live.astype(jnp.int32), done=c["done"] | hit,
                  stopped=c["stopped"] | hit, step=step + 1)

    def cond(c):
      return (c["step"] < limit) & ~jnp.all(c["done"])

    return jax.lax.while_loop(cond, body, carry)

  # ---- host loop --------------------------------------------------------------------------------

  def generate(self, prompts: Sequence[Prompt], params: SamplingParams = SamplingParams(),
               stream: Callable[[int, str], None] | None = None) -> list[Generation]:
    """Generations for `prompts` (any number; run in batches of the largest batch bucket).
    `stream(row, text_delta)` receives text as it is produced (chunks of `stream_chunk` tokens)."""
    max_rows = self.batch_buckets[-1]
    out = []
    for start in range(0, len(prompts), max_rows):
      out += self._generate_batch(prompts[start:start + max_rows], params, stream, start)
    return out

  def _generate_batch(self, prompts, params, stream, row_offset):
    n_new = max(1, params.max_new_tokens)
    seq_len = bucket(max(len(p.input_ids) for p in prompts), self.length_buckets)
    new_len = bucket(n_new, self.new_token_buckets)
    b = bucket(len(prompts), self.batch_buckets)
    has_vision = any(p.pixel_values is not None for p in prompts)
    patches = (bucket(max(len(p.pixel_values) for p in prompts if p.pixel_values is not None),
                      self.patch_buckets) if has_vision else None)
    merge = self.cfg.vision.spatial_merge_size if self.cfg.vision is not None else 2
    batch = pack_prompts(prompts, seq_len=seq_len, batch_size=b, num_patches=patches, merge=merge,
                         pad_id=self.pad_id)
    batch = self._put(batch)

    stop_ids = self.stop_token_ids if params.stop_token_ids is None else params.stop_token_ids
    if len(stop_ids) > MAX_STOP_IDS:
      raise ValueError(f"at most {MAX_STOP_IDS} stop token ids, got {len(stop_ids)}")
    stop_arr = jnp.asarray(list(stop_ids) + [-1] * (MAX_STOP_IDS - len(stop_ids)), jnp.int32)
    greedy = params.temperature <= 0
    knobs = (jnp.float32(params.temperature), jnp.int32(params.top_k), jnp.float32(params.top_p), stop_arr)
    key = jax.random.key(params.seed)

    with mesh_context(self.mesh):
      carry = self._prefill(self.state, batch, key, *knobs, cache_len=seq_len + new_len, new_len=new_len,
                            greedy=greedy)
      chunked = stream is not None or bool(params.stop_strings)
      watcher = (_TextWatcher(self, len(prompts), stop_ids, params.stop_strings, stream, row_offset)
                 if chunked else None)
      limit = 1
      while True:
        if watcher is not None:
          carry = watcher.update(carry)
        if limit >= n_new or bool(jnp.all(carry["done"])):
          break
        limit = min(n_new, limit + self.stream_chunk) if chunked else n_new
        carry = self._decode(self.state, carry, jnp.int32(limit), key, knobs[0], knobs[1], knobs[2],
                             knobs[3], greedy=greedy)
    tokens, logprobs, lengths, stopped = jax.device_get(
        (carry["tokens"], carry["logprobs"], carry["lengths"], carry["stopped"]))
    return [self._finish(tokens[r, :lengths[r]], logprobs[r, :lengths[r]], bool(stopped[r]),
                         params.stop_strings, stop_ids) for r in range(len(prompts))]

  def _put(self, batch):
    return put_batch(batch, self.mesh)

  def _finish(self, tokens, logprobs, stopped, stop_strings, stop_ids) -> Generation:
    return finish_generation(self.decode, tokens, logprobs, stopped, stop_strings, stop_ids)

  def decode(self, ids) -> str:
    return decode_text(self.tokenizer, ids)


def decode_text(tokenizer, ids) -> str:
  """Text without the <|...|> control tokens; <think> and </think> stay (they may be special tokens)."""
  if tokenizer is None:
    return ""
  return _CONTROL.sub("", tokenizer.decode([int(i) for i in ids], skip_special_tokens=False))


def finish_generation(decode, tokens, logprobs, stopped: bool, stop_strings, stop_ids) -> Generation:
  """A Generation from a row's generated ids and log-probs: text without the stop token, cut before
  the first stop string (tokens cut to the shortest prefix that produced it), thinking split off."""
  tokens, logprobs = [int(t) for t in tokens], [float(x) for x in logprobs]
  body = tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens
  text = decode(body)
  for s in stop_strings:
    if s in text:
      text, stopped = text[:text.index(s)], True
      for n in range(1, len(tokens) + 1):
        if s in decode(tokens[:n]):
          tokens, logprobs = tokens[:n], logprobs[:n]
          break
  thinking, answer = split_thinking(text)
  return Generation(tokens=tokens, logprobs=logprobs, text=text, thinking=thinking, answer=answer,
                    finish_reason="stop" if stopped else "length")


def put_batch(batch: dict, mesh) -> dict:
  """Host batch -> device arrays, rows split over the mesh's batch axes (`batch_layout` says which axis
  of each key holds the rows)."""
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in batch.items()}
  shardings = batch_layout.shardings(list(batch), mesh)
  return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}


class _TextWatcher:
  """Between decode chunks: streams new text and stops rows whose text contains a stop string."""

  def __init__(self, sampler: Sampler, n_rows: int, stop_ids, stop_strings, stream, row_offset):
    self.sampler, self.n_rows, self.stop_strings = sampler, n_rows, tuple(stop_strings)
    self.stop_ids = set(stop_ids)
    self.stream, self.row_offset = stream, row_offset
    self.sent = [""] * n_rows

  def update(self, carry):
    tokens, lengths, done = jax.device_get((carry["tokens"], carry["lengths"], carry["done"]))
    newly_done = []
    for r in range(self.n_rows):
      ids = [int(t) for t in tokens[r, :lengths[r]] if int(t) not in self.stop_ids]
      text = self.sampler.decode(ids)
      hit = [text.index(s) for s in self.stop_strings if s in text]
      if hit:
        text = text[:min(hit)]
        if not done[r]:
          newly_done.append(r)
      # Hold back a possibly incomplete character or a partial stop string at the end.
      safe = text if (done[r] or hit) else text.rstrip("\ufffd")
      if not (done[r] or hit):
        for s in self.stop_strings:
          for k in range(len(s) - 1, 0, -1):
            if safe.endswith(s[:k]):
              safe = safe[:-k]
              break
      if self.stream is not None and len(safe) > len(self.sent[r]) and safe.startswith(self.sent[r]):
        self.stream(self.row_offset + r, safe[len(self.sent[r]):])
        self.sent[r] = safe
    if newly_done:
      done = np.array(done)
      done[newly_done] = True
      stopped = np.array(jax.device_get(carry["stopped"]))
      stopped[newly_done] = True
      carry = dict(carry, done=jnp.asarray(done), stopped=jnp.asarray(stopped))
    return carry


def constrain_cache(cache: dict) -> dict:
  """The cache's K/V: one stacked (L, B, Hkv, T, hd) array each, or a list of L (B, Hkv, T, hd) arrays."""
  def kv(x):
    if isinstance(x, (list, tuple)):
      return [constrain(a, ("batch", "act_heads", None, None)) for a in x]
    return constrain(x, ("layers", "batch", "act_heads", None, None))
  return dict(cache, k=kv(cache["k"]), v=kv(cache["v"]), segment_ids=constrain(cache["segment_ids"], ("batch", None)))


class _NoMesh:
  def __enter__(self):
    return None

  def __exit__(self, *exc):
    return False


def mesh_context(mesh):
  return _NoMesh() if mesh is None else jax.set_mesh(mesh)


def default_stop_ids(cfg, tokenizer=None) -> tuple[int, ...]:
  """EOS from the config plus <|im_end|> and <|endoftext|> as the tokenizer spells them."""
  ids = [cfg.eos_token_id]
  for name in ("<|im_end|>", "<|endoftext|>"):
    tid = token_id(tokenizer, name)
    if tid is not None:
      ids.append(tid)
  return tuple(dict.fromkeys(ids))


def token_id(tokenizer, name: str) -> int | None:
  """Id of a token by name for a `tokenizers.Tokenizer` or a transformers tokenizer; None if unknown."""
  if tokenizer is None:
    return None
  for attr in ("token_to_id", "convert_tokens_to_ids"):
    fn = getattr(tokenizer, attr, None)
    if fn is not None:
      tid = fn(name)
      unk = getattr(tokenizer, "unk_token_id", None)
      return None if tid is None or (unk is not None and tid == unk) else int(tid)
  return None


def put_weights(model_or_state, like: nnx.State, shardings) -> nnx.State:
  """`model_or_state`'s state checked against `like` (structure, shapes, dtypes) and put onto
  `shardings` in one device_put (arrays already on their target sharding are not copied)."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  got, want = jax.tree.structure(state), jax.tree.structure(like)
  if got != want:
    raise ValueError(f"set_weights: the new weights' tree differs from the sampler's model ({got} vs {want})")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(like)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"set_weights: {jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)}, the sampler's "
                       f"model has {b.dtype}{list(b.shape)}")
  return jax.device_put(state, shardings)


# --------------------------------------------------------------------------------------------------
# Prompts for the CLI and the evaluation harness.


def encode_messages(messages: list[dict], tokenizer, processor=None, thinking: bool | None = None,
                    **vision_kwargs) -> Prompt:
  """Chat messages (Keye format, media paths absolute) -> a generation Prompt (processing.chat)."""
  ex = encode_prompt(messages, tokenizer, processor=processor, thinking=thinking, **vision_kwargs)
  vision = len(ex["grids_hw"]) > 0
  return Prompt(ex["input_ids"], ex["position_ids"], ex["pixel_values"] if vision else None,
                ex["grids_hw"] if vision else None)
