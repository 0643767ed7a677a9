"""The RL prompt stream: the Grain pipeline of train/data (sources, weighted mixture, seeded shuffle,
per-process sharding, decoding in worker processes), yielding each step's tokenised prompts, selected
globally (below).

A prompt record is a conversation manifest row (or ArrayRecord/TFDS record) whose last turn is the
user's, plus what the rewards and hints read:

  {"id": "q17", "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                           {"type": "text", "text": "How many? /think"}]}],
   "reference": "3", "kind": "number", "options": [...], "hints": ["L1", ..., "L5"], "solution": "..."}

A trailing assistant turn (an SFT record) is dropped; its text is the reference solution, and the
reference answer when the record has neither `reference` nor `answer`.

Each prompt: input_ids (Sp,), position_ids (3, Sp), pixel_values (Pp, 588) or None, grids_hw (n, 2) or
None, `meta` (the fields above plus `prompt`, the last user turn's text), `key` (the prompt's element in
the global mixture: the same whatever the number of processes; it seeds the prompt's sampling) and `raw`
(the source item, to re-encode the prompt with a hint appended).

Global selection (`PromptStream.take(K)`): a step's K prompts are the next K valid elements of the global
mixture, whatever the number of processes n. Process j decodes (in its Grain workers) only its shard, the
elements e = j (mod n). A step reads in rounds: the next `need` global elements [cursor, cursor + need),
each process its own of them, and the processes allgather one flag per element (valid, skipped, or past
the end); the valid ones are selected, the cursor moves past the range, need = K - selected, until K.
Only elements a step selects or skips are ever read, so after a step every process's Grain position is
exactly the global cursor: the checkpoint holds both, and a resumed run continues identically. Then each
process takes K/n of the selected prompts (`assign`): its own first, the surplus of others going to those
short of K/n; a moved prompt is decoded again by its new process (main thread, random access into the
mixture). With nothing skipped in a step no prompt moves. A process's prompts come in key order (so the
global batch holds the groups process by process, not in key order as on one process: the loss, a sum over
packed segments, changes only by float summation order).

The iterator's checkpoint state is Grain's read position, the global cursor, and `host_state`, a JSON dict
the RL loop keeps there (pass rates, hint records), so all are saved per process with the data, and
restored with it.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile

import grain
import numpy as np

from train.data.config import DataConfig
from train.data.decode import PATCH_DIM, _reason
from train.data.mixture import build_dataset
from train.data.pipeline import iterate
from train.data.records import RecordError, materialize, unpack_record
from train.data.sources import open_source

log = logging.getLogger("train.rl")


def _text(content) -> str:
  if isinstance(content, str):
    return content
  return "".join(e.get("text", "") for e in content or [] if isinstance(e, dict) and e.get("type", "text") == "text"
                 and "text" in e)


MODE_SUFFIXES = ("/no_think", "/think")


def _insert(text: str, hint: str) -> str:
  """`text` + `hint`, the hint going before a trailing /think or /no_think (which selects the mode)."""
  stripped = text.rstrip()
  for suffix in MODE_SUFFIXES:
    if stripped.endswith(suffix):
      head = stripped[:-len(suffix)].rstrip()
      return head + hint + " " + suffix
  return text + hint


def with_hint(messages: list[dict], hint: str) -> list[dict]:
  """The messages with `hint` appended to the last user turn's text (after the query)."""
  messages = copy.deepcopy(messages)
  last = messages[-1]
  if isinstance(last["content"], str):
    last["content"] = _insert(last["content"], hint)
    return messages
  content = list(last["content"])
  texts = [k for k, e in enumerate(content) if isinstance(e, dict) and e.get("type", "text") == "text" and "text" in e]
  if texts and texts[-1] == len(content) - 1:
    content[-1] = {**content[-1], "text": _insert(content[-1]["text"], hint)}
  else:
    content.append({"type": "text", "text": hint.lstrip()})
  last["content"] = content
  return messages


# Why a prompt is left out (filters, not errors): the metric it is counted under (metrics.jsonl
# `prompts_skipped/<name>`, cumulative) and the config field that decides it. The last two mean the prompt
# does not fit the run's limits, which a user would want to hear about: logged once per reason.
PASS_RATE, CATEGORY, TOO_LONG, TOO_MANY_PATCHES = (
    "pass rate not in (0, 1)", "category not selected", "prompt too long", "too many patches")
SKIPS = {PASS_RATE: ("pass_rate", "rl.pass_rates_from"), CATEGORY: ("category", "rl.categories"),
         TOO_LONG: ("too_long", "rl.max_prompt_len"), TOO_MANY_PATCHES: ("too_many_patches", "rl.max_prompt_patches")}
_TOLD = (TOO_LONG, TOO_MANY_PATCHES)


class PromptDecoder:
  """Picklable: raw source item -> prompt dict, or {"_bad": reason, ...} / {"_skip": reason}."""

  def __init__(self, tokenizer, source_id: int, vision_kwargs: dict | None = None, *, max_len: int = 1 << 30,
               max_patches: int = 1 << 30, keep_ids: frozenset | None = None, drop_ids: frozenset | None = None,
               categories: tuple = (), encode=None):
    self.categories = frozenset(categories)
    self.tokenizer, self.source_id = tokenizer, source_id
    self.vision_kwargs = dict(vision_kwargs or {})
    self.max_len, self.max_patches, self.keep_ids, self.drop_ids = max_len, max_patches, keep_ids, drop_ids
    self.encode_fn = encode

  def __call__(self, raw: dict) -> dict:
    where = raw.get("where", "?")
    try:
      out = self._decode(raw)
    except Exception as e:  # one bad record costs one prompt, reported with its file
      return {"_bad": _reason(e), "_error": f"{type(e).__name__}: {e}", "_where": where, "_source": self.source_id}
    out.update(_where=where, _source=self.source_id)
    return out

  def _decode(self, raw: dict) -> dict:
    try:
      record, _ = unpack_record(raw["data"])
    except json.JSONDecodeError as e:
      raise RecordError(str(e)) from e
    messages, meta = split_record(record, raw.get("where", "?"))
    if (self.keep_ids is not None and meta["id"] not in self.keep_ids) or (
        self.drop_ids is not None and meta["id"] in self.drop_ids):
      return {"_skip": PASS_RATE}
    if self.categories and meta["category"] not in self.categories:
      return {"_skip": CATEGORY}
    p = self.encode(raw, None)
    if len(p["input_ids"]) > self.max_len:
      return {"_skip": TOO_LONG, "_detail": f"{len(p['input_ids'])} tokens > {self.max_len}"}
    if p["pixel_values"] is not None and len(p["pixel_values"]) > self.max_patches:
      return {"_skip": TOO_MANY_PATCHES, "_detail": f"{len(p['pixel_values'])} patches > {self.max_patches}"}
    p["meta"] = meta
    p["raw"] = {"data": bytes(raw["data"]), "base_dir": raw.get("base_dir", ""), "where": raw.get("where", "?")}
    return p

  def encode(self, raw: dict, hint: str | None) -> dict:
    """The prompt's arrays, with `hint` appended to the last user turn when given."""
    record, blobs = unpack_record(raw["data"])
    messages, _ = split_record(record, raw.get("where", "?"))
    if hint:
      messages = with_hint(messages, hint)
    if blobs:
      with tempfile.TemporaryDirectory(prefix="keye-prompt-") as tmp:
        record = materialize({**record, "messages": messages}, blobs, tmp)
        ex = self._encode(record["messages"], tmp)
    else:
      ex = self._encode(messages, raw.get("base_dir") or None)
    vision = len(ex["grids_hw"]) > 0
    return {"input_ids": np.asarray(ex["input_ids"], np.int32),
            "position_ids": np.asarray(ex["position_ids"], np.int32),
            "pixel_values": np.asarray(ex["pixel_values"], np.float32).reshape(-1, PATCH_DIM) if vision else None,
            "grids_hw": np.asarray(ex["grids_hw"], np.int32).reshape(-1, 2) if vision else None}

  def _encode(self, messages, base_dir):
    if self.encode_fn is not None:
      return self.encode_fn(messages, self.tokenizer, base_dir=base_dir, **self.vision_kwargs)
    from keye_jax.processing.chat import encode_prompt
    return encode_prompt(messages, self.tokenizer, base_dir=base_dir, **self.vision_kwargs)


def split_record(record: dict, where: str) -> tuple[list[dict], dict]:
  """(the prompt's messages, ending with the user's turn; meta for rewards and hints)."""
  messages = record.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RecordError("no messages")
  solution = record.get("solution")
  if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
    solution = solution if solution is not None else _text(messages[-1].get("content"))
    messages = messages[:-1]
  if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
    raise RecordError("the conversation does not end with a user turn")
  reference = record.get("reference", record.get("answer"))
  if reference is None and "instruction_id_list" not in record:  # instructions are judged by their constraints
    reference = solution
  elif record.get("solution") is None and solution is not None and solution.strip() == str(reference).strip():
    solution = None  # an SFT turn that only states the answer is no solution to cut hints from
  # The record's other fields (instruction_id_list, kwargs, format, context, ...) are there for the rewards.
  meta = {**{k: v for k, v in record.items() if k != "messages"},
          "id": str(record.get("id", where)), "prompt": _text(messages[-1].get("content")),
          "reference": reference, "answer": reference, "kind": record.get("kind"),
          "answer_kind": record.get("kind"),
          "options": record.get("options"), "hints": record.get("hints"), "solution": solution,
          "category": record.get("category")}
  return messages, meta


MAX_SKIPPED_IN_A_ROW = 10000
VALID, SKIPPED, ENDED, UNREAD = 1, 0, -1, -2  # an element's flag in a selection round


def first_element(start: int, n: int, j: int) -> int:
  """Process j's first global element at or after `start` (process j holds the elements e = j mod n)."""
  return start + (j - start) % n


def elements_of(start: int, need: int, n: int, j: int) -> range:
  """Process j's global elements in [start, start + need), in order."""
  return range(first_element(start, n, j), start + need, n)


def assign(selected: list[int], n: int) -> list[list[int]]:
  """The selected global elements (len a multiple of n) -> per process its len/n elements, in key order:
  each process keeps its own (element mod n) lowest first; the surplus, lowest first, fills the processes
  short of len/n, lowest process first."""
  q = len(selected) // n
  own = [sorted(e for e in selected if e % n == j) for j in range(n)]
  surplus = sorted(e for o in own for e in o[q:])
  out = []
  for o in own:
    take = q - min(len(o), q)
    out.append(sorted(o[:q] + surplus[:take]))
    surplus = surplus[take:]
  return out


def _allgather(flags: np.ndarray) -> np.ndarray:
  """(L,) int32 of this process -> (n, L): every process's."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, len(flags))


class PromptStream(grain.DatasetIterator):
  """This process's share of the globally selected prompts (module docstring); bad and filtered prompts of
  its shard are counted in `stats`. `take(K)` is collective: every process calls it with the same K.
  `fetch(key)` decodes global element `key` here (moved prompts); `allgather` exchanges the round flags."""

  def __init__(self, parent: grain.DatasetIterator, decoders: list[PromptDecoder], names: list[str],
               process_index: int, process_count: int, *, fetch=None, allgather=None):
    super().__init__(parent)
    self.decoders, self.names = decoders, names
    self.process_index, self.process_count = process_index, process_count
    self.fetch, self.allgather = fetch, allgather or _allgather
    self.cursor = 0  # the next global element no step has read
    self.host_state: dict = {}
    self._stats = {"prompts": 0, "bad": {}, "skipped": {}, "moved_in": 0}

  def __next__(self) -> dict:
    """One prompt of this process (collective: `take` of one prompt per process)."""
    return self.take(self.process_count)[0]

  def take(self, k: int) -> list[dict]:
    """This process's k/n of the next k globally selected prompts, in key order."""
    n, j = self.process_count, self.process_index
    if k % n:
      raise ValueError(f"{k} prompts per step cannot be split evenly over {n} processes")
    selected, mine, run = [], {}, 0  # run: elements skipped in a row
    while len(selected) < k:
      need = k - len(selected)
      elements = elements_of(self.cursor, need, n, j)
      flags = np.full(-(-need // n), UNREAD, np.int32)
      for p, e in enumerate(elements):
        item = self._read(e)
        flags[p] = ENDED if item is None else SKIPPED if item is False else VALID
        if isinstance(item, dict):
          mine[e] = item
      every = flags[None] if n == 1 else self.allgather(flags)
      for e in range(self.cursor, self.cursor + need):
        owner = e % n
        f = every[owner][(e - first_element(self.cursor, n, owner)) // n]
        if f == ENDED:
          raise StopIteration
        if f == VALID:
          selected.append(e)
          run = 0
        else:
          run += 1
          if run > MAX_SKIPPED_IN_A_ROW:
            raise ValueError(f"the prompt sources yielded {MAX_SKIPPED_IN_A_ROW} bad or filtered prompts in a row "
                             f"(skipped here: {self._stats['skipped']}, bad: {self._stats['bad']}); check "
                             f"data.sources, rl.max_prompt_len / rl.max_prompt_patches, rl.categories and "
                             f"rl.pass_rates_from")
      self.cursor += need
    out = []
    for e in assign(selected, n)[j]:
      out.append(mine[e] if e in mine else self._moved(e))
    self._stats["prompts"] += len(out)
    return out

  def _read(self, element: int):
    """This process's next item (global `element`): the prompt, False when skipped, None past the end."""
    try:
      item = next(self._parent)
    except StopIteration:
      return None
    if "_bad" in item:
      self._stats["bad"][item["_bad"]] = self._stats["bad"].get(item["_bad"], 0) + 1
      log.warning("skipping bad prompt %s: %s", item.get("_where"), item.get("_error"))
      return False
    if "_skip" in item:
      reason = item["_skip"]
      self._stats["skipped"][reason] = self._stats["skipped"].get(reason, 0) + 1
      if reason in _TOLD and self._stats["skipped"][reason] == 1:
        name, field = SKIPS[reason]
        log.warning("skipping prompts that exceed %s (first: %s, %s); every one is counted in metrics.jsonl as "
                    "prompts_skipped/%s", field, item.get("_where"), item.get("_detail"), name)
      return False
    # Element i of this process's shard is element i * n + j of the global mixture (mixture.py).
    key = int(item["_index"]) * self.process_count + self.process_index
    if key != element:
      raise AssertionError(f"prompt stream out of step: read element {key}, expected {element}")
    item["key"] = key
    return item

  def _moved(self, key: int) -> dict:
    """Global element `key`, another process's valid prompt, decoded here."""
    item = dict(self.fetch(key))
    if "_bad" in item or "_skip" in item:
      raise ValueError(f"prompt {item.get('_where')} (global element {key}) decoded as valid in its own process "
                       f"but not here: {item.get('_error') or item.get('_skip') or item.get('_bad')}")
    item["key"] = key
    self._stats["moved_in"] += 1
    return item

  def encode(self, prompt: dict, hint: str | None) -> dict:
    """`prompt` re-encoded with `hint` appended after the query (same source decoder)."""
    return self.decoders[prompt["_source"]].encode(prompt["raw"], hint)

  def get_state(self) -> dict:
    return {"parent": self._parent.get_state(), "cursor": self.cursor, "stats": copy.deepcopy(self._stats),
            "host": copy.deepcopy(self.host_state)}

  def set_state(self, state: dict):
    if "cursor" not in state:
      raise ValueError("the checkpoint's prompt iterator state has no global cursor (written before prompts were "
                       "selected globally); start the RL run in a new run_dir")
    self._parent.set_state(state["parent"])
    self.cursor = int(state["cursor"])
    self._stats = {"moved_in": 0, **copy.deepcopy(state["stats"])}
    self.host_state = copy.deepcopy(state.get("host", {}))

  def stats(self) -> dict:
    return copy.deepcopy(self._stats)


def make_prompt_stream(cfg: DataConfig, tokenizer, *, max_len: int, max_patches: int,
                       keep_ids: frozenset | None = None, drop_ids: frozenset | None = None, categories=(),
                       encode=None, process_index: int | None = None, process_count: int | None = None,
                       allgather=None) -> PromptStream:
  """This process's prompt stream (see the module docstring). `allgather` (tests): (L,) -> (n, L) flags."""
  if process_index is None or process_count is None:
    import jax
    process_index, process_count = jax.process_index(), jax.process_count()
  sources = [open_source(s) for s in cfg.sources]
  decoders = [PromptDecoder(tokenizer, i, cfg.vision, max_len=max_len, max_patches=max_patches, keep_ids=keep_ids,
                            drop_ids=drop_ids, categories=categories, encode=encode) for i in range(len(sources))]
  ds = build_dataset(cfg, sources, decoders, process_index, process_count)
  everything = build_dataset(cfg, sources, decoders, 0, 1)  # the whole mixture, for moved prompts (lazy)
  return PromptStream(iterate(ds, cfg.workers, cfg.worker_buffer_size), decoders,
                      [s.display_name for s in cfg.sources], process_index, process_count,
                      fetch=everything.__getitem__, allgather=allgather)
