"""HF safetensors <-> converted Orbax checkpoint directories.

A converted checkpoint directory:
  keye_checkpoint.json   format marker, parameter groups, dtype
  config.json            the released config (HF layout), plus tokenizer / preprocessor files copied as-is
  params/<group>/        one Orbax PyTree checkpoint per group: the embedding, each decoder layer, each vision
                         layer, the rest. Grouping per layer is what lets an 8B checkpoint stream through a
                         24 GiB machine in both directions.
  unused/                release tensors the model does not use (kept to write them back on export)
Keys inside a group are canonical parameter paths (keye_jax.params) with '/' spelled '.'.
Every writer builds into `OUT.partial` and renames at the end, so a failure leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import time

import numpy as np
import orbax.checkpoint as ocp

from checkpoints_convert import rules
from checkpoints_convert.safetensors_io import CheckpointError, SafetensorsReader, ShardedWriter
from keye_jax import config as config_lib

FORMAT = "keye-jax-converted-v1"
META = "keye_checkpoint.json"
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".tiktoken")
_SKIP_FILES = {"model.safetensors.index.json", META}


def _dtype(name: str | None):
  if name is None:
    return None
  import ml_dtypes
  table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
  if name not in table:
    raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
  return np.dtype(table[name])


def expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """Canonical path -> shape for the model `cfg` describes (abstract: no memory is allocated)."""
  from flax import nnx
  from keye_jax.model import KeyeVL
  from keye_jax.params import canonical_shapes
  abstract = nnx.eval_shape(lambda: KeyeVL(cfg, rngs=nnx.Rngs(0)))
  return {k: shape for k, (shape, _) in canonical_shapes(abstract).items()}


def _hf_shape(our_shape: tuple[int, ...], transform: str, cfg) -> tuple[int, ...]:
  if transform == "id":
    return tuple(our_shape)
  if transform == "t":
    return tuple(reversed(our_shape))
  v = cfg.vision  # conv: (C*p*p, Dv) -> (Dv, C, p, p)
  return (our_shape[1], v.num_channels, v.patch_size, v.patch_size)


@contextlib.contextmanager
def _atomic_dir(out_dir: str):
  """Yields a scratch directory that becomes `out_dir` only if the block succeeds."""
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise CheckpointError(f"{out_dir}: output directory exists and is not empty")
  tmp = out_dir.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(out_dir):
    os.rmdir(out_dir)
  os.rename(tmp, out_dir)


_BLOCK_BYTES = 256 << 20
_BLOCK = "::rows"


def _save_group(ckptr, path: str, arrays: dict[str, np.ndarray]) -> None:
  """Orbax serialisation briefly needs about twice an array's size, so arrays over 256 MiB are stored
  as blocks of rows (`name::rows00000`, ...) and saved one block at a time."""
  small = {k.replace("/", "."): v for k, v in arrays.items() if v.nbytes <= _BLOCK_BYTES}
  if small:
    ckptr.save(path, small)
  for k, v in arrays.items():
    if v.nbytes > _BLOCK_BYTES:
      rows = max(1, _BLOCK_BYTES // (v.nbytes // v.shape[0]))
      for i, start in enumerate(range(0, v.shape[0], rows)):
        ckptr.save(os.path.join(path + ".blocks", f"{k.replace('/', '.')}{_BLOCK}{i:05d}"),
                   {"x": v[start:start + rows]})


def _release_memory() -> None:
  """Hands freed buffers back to the OS: serialisation threads leave them in glibc's per-thread arenas,
  which would otherwise add up across groups."""
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:  # not glibc
    pass


def _restore_group(ckptr, path: str) -> dict[str, np.ndarray]:
  out = {}
  if os.path.isdir(path):
    out = {k.replace(".", "/"): np.asarray(v) for k, v in ckptr.restore(path).items()}
  blocks_dir = path + ".blocks"
  if os.path.isdir(blocks_dir):
    parts: dict[str, list[str]] = {}
    for name in sorted(os.listdir(blocks_dir)):
      parts.setdefault(name.split(_BLOCK)[0], []).append(name)
    for key, names in parts.items():
      out[key.replace(".", "/")] = np.concatenate(
          [np.asarray(ckptr.restore(os.path.join(blocks_dir, n))["x"]) for n in names])
  return out


def _copy_side_files(src: str, dst: str) -> None:
  for name in os.listdir(src):
    p = os.path.join(src, name)
    if os.path.isfile(p) and name.endswith(_COPY_SUFFIXES) and name not in _SKIP_FILES:
      shutil.copy2(p, os.path.join(dst, name))


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: missing (a checkpoint directory needs its config.json)")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def write_converted(out_dir: str, cfg, hf_config: dict, groups, unused=(), side_files_from: str | None = None,
                    dtype: str | None = None) -> dict:
  """Writes a converted checkpoint from `groups`: an iterable of (group name, {canonical path: array}),
  consumed one group at a time. Returns {"tensors", "parameters", "seconds"}."""
  t0 = time.time()
  n_tensors = n_params = 0
  names = []
  ckptr = ocp.PyTreeCheckpointer()
  with _atomic_dir(out_dir) as tmp:
    if side_files_from:
      _copy_side_files(side_files_from, tmp)
    for group, arrays in groups:
      _save_group(ckptr, os.path.join(tmp, "params", group), arrays)
      names.append(group)
      n_tensors += len(arrays)
      n_params += sum(int(a.size) for a in arrays.values())
      del arrays  # hold one group at a time
      _release_memory()
    unused = dict(unused)
    if unused:
      ckptr.save(os.path.join(tmp, "unused"), dict(unused))
      n_tensors += len(unused)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(config_lib.to_hf_config(cfg, hf_config), f, indent=2)
    with open(os.path.join(tmp, META), "w") as f:
      json.dump({"format": FORMAT, "groups": names, "dtype": dtype, "unused": sorted(unused),
                 "keye_config": config_lib.to_dict(cfg)}, f, indent=2)
  return {"tensors": n_tensors, "parameters": n_params, "seconds": round(time.time() - t0, 3)}


def to_orbax(hf_dir: str, out_dir: str, dtype: str | None = None) -> dict:
  """Released (or transformers-PR, or plain Qwen3) HF checkpoint -> converted Orbax directory."""
  np_dtype = _dtype(dtype)
  hf_config = read_hf_config(hf_dir)
  cfg = config_lib.from_hf_config(hf_config)
  reader = SafetensorsReader(hf_dir)
  present = {rules.canonical_name(k): k for k in reader.keys()}      # original spelling -> stored name
  plan = rules.expand(cfg)

  wanted = {hf for hf, _, _, _ in plan}
  if cfg.text.tie_word_embeddings:
    wanted.add("lm_head.weight")  # tied: may be present, ignored
  missing = [hf for hf in sorted(wanted) if hf not in present and hf != "lm_head.weight"]
  if missing:
    raise CheckpointError(f"{hf_dir}: missing tensor {missing[0]} ({len(missing)} missing in all)")
  unused_names = [n for n in present if rules.is_unused(n)]
  extra = sorted(n for n in present if n not in wanted and n not in unused_names)
  if extra:
    raise CheckpointError(f"{reader.files[present[extra[0]]]}: unexpected tensor {present[extra[0]]} "
                          f"(not part of a model with this config.json)")

  unused = {n: reader.get(present[n]) for n in unused_names}
  source = lambda hf: (reader, present[hf])
  return write_converted(out_dir, cfg, hf_config, stream_groups(cfg, plan, source, np_dtype), unused,
                         side_files_from=hf_dir, dtype=dtype)


def stream_groups(cfg, plan, source, np_dtype=None, fresh=None):
  """Yields (group, {canonical path: array}) for `plan`, reading each tensor from `source(hf_name) ->
  (SafetensorsReader, stored name)` and checking its shape; `fresh` supplies arrays for paths that have
  no source (a newly initialised projector)."""
  shapes = expected_shapes(cfg)
  by_group: dict[str, list] = {}
  for hf, ours, tr, group in plan:
    by_group.setdefault(group, []).append((hf, ours, tr))
  for group, items in by_group.items():
    arrays = {}
    for hf, ours, tr in items:
      if fresh is not None and ours in fresh:
        x = fresh[ours]
      else:
        reader, stored = source(hf)
        got, want = reader.shape(stored), _hf_shape(shapes[ours], tr, cfg)
        if tuple(got) != tuple(want):
          raise CheckpointError(f"{reader.files[stored]}: tensor {stored} has shape {tuple(got)}, "
                                f"expected {tuple(want)} from config.json")
        x = rules.to_ours(reader.get(stored), tr)
      arrays[ours] = x.astype(np_dtype) if np_dtype is not None else x
    yield group, arrays
    del arrays, x  # let the group go before reading the next one


# ---- reading converted checkpoints ------------------------------------------------------------------


def read_meta(ckpt_dir: str) -> dict:
  path = os.path.join(ckpt_dir, META)
  if not os.path.exists(path):
    raise CheckpointError(f"{ckpt_dir}: not a converted keye-jax checkpoint (no {META})")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT}")
  return meta


def load_config(ckpt_dir: str, **runtime) -> config_lib.KeyeConfig:
  meta = read_meta(ckpt_dir)
  cfg = config_lib.from_dict(config_lib.KeyeConfig, meta["keye_config"])
  return config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in runtime.items()]) if runtime else cfg


def iter_groups(ckpt_dir: str):
  """Yields (group, {canonical path: numpy array}) one group at a time."""
  meta = read_meta(ckpt_dir)
  ckptr = ocp.PyTreeCheckpointer()
  for group in meta["groups"]:
    yield group, _restore_group(ckptr, os.path.join(ckpt_dir, "params", group))


def read_unused(ckpt_dir: str) -> dict[str, np.ndarray]:
  path = os.path.join(ckpt_dir, "unused")
  if not os.path.exists(path):
    return {}
  return {k: np.asarray(v) for k, v in ocp.PyTreeCheckpointer().restore(path).items()}


def load_flat(ckpt_dir: str) -> dict[str, np.ndarray]:
  flat = {}
  for _, arrays in iter_groups(ckpt_dir):
    flat.update(arrays)
  return flat


def load_model(ckpt_dir: str, overrides: list[str] | tuple[str, ...] = ()):
  """(cfg, KeyeVL) from a converted checkpoint; `overrides` like ["dtype=bfloat16", "scan_layers=false"]."""
  from flax import nnx
  from keye_jax.model import KeyeVL
  from keye_jax.params import set_flat
  cfg = config_lib.apply_overrides(load_config(ckpt_dir), list(overrides))
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  set_flat(model, load_flat(ckpt_dir))
  return cfg, model


def to_hf(ckpt_dir: str, out_dir: str, max_shard_bytes: int = 2 << 30) -> dict:
  """Converted Orbax directory -> released layout and names (config, tokenizer files, unused tensors)."""
  t0 = time.time()
  meta = read_meta(ckpt_dir)
  cfg = load_config(ckpt_dir)
  plan = {ours: (hf, tr) for hf, ours, tr, _ in rules.expand(cfg)}
  n_tensors = n_params = 0
  with _atomic_dir(out_dir) as tmp:
    _copy_side_files(ckpt_dir, tmp)
    writer = ShardedWriter(tmp, max_shard_bytes)
    for group, arrays in iter_groups(ckpt_dir):
      for ours, x in arrays.items():
        if ours not in plan:
          raise CheckpointError(f"{ckpt_dir}/params/{group}: unexpected parameter {ours}")
        hf, tr = plan[ours]
        writer.add(hf, rules.to_hf(x, tr, _hf_shape(x.shape, tr, cfg)))
        n_tensors += 1
        n_params += int(x.size)
    for name, x in read_unused(ckpt_dir).items():
      writer.add(name, x)
      n_tensors += 1
    writer.close()
    if meta.get("dtype"):
      path = os.path.join(tmp, "config.json")
      with open(path) as f:
        hf_config = json.load(f)
      hf_config["torch_dtype"] = meta["dtype"]
      with open(path, "w") as f:
        json.dump(hf_config, f, indent=2)
  return {"tensors": n_tensors, "parameters": n_params, "seconds": round(time.time() - t0, 3)}
