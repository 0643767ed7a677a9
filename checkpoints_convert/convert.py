"""HF safetensors <-> converted Orbax checkpoint directories (the layout is described in
keye_jax/checkpoint_io.py, which reads and writes it).

Every tensor read from a release is checked: shape against config.json, floating-point dtype, finite values.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from checkpoints_convert import rules
from checkpoints_convert.safetensors_io import SafetensorsReader, ShardedWriter
from keye_jax import config as config_lib
from keye_jax.checkpoint_io import (FORMAT, META, CheckpointError, atomic_dir, check_array,  # noqa: F401
                                    copy_side_files, copy_tokenizer, iter_groups, load_canonical, load_config,
                                    load_flat, load_model, model_config, progress, read_meta, read_unused,
                                    resolve, write_converted)


def dtype_of(name: str | None):
  """The numpy dtype of a `--dtype` name (None: keep the stored dtypes)."""
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


def read_hf_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: missing (a checkpoint directory needs its config.json)")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def to_orbax(hf_dir: str, out_dir: str, dtype: str | None = None) -> dict:
  """Released (or transformers-PR, or plain Qwen3) HF checkpoint -> converted Orbax directory."""
  np_dtype = dtype_of(dtype)
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
                         side_files_from=hf_dir, dtype=dtype, what="to-orbax")


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
        x = reader.get(stored)
        check_array(stored, x, reader.files[stored])
        x = rules.to_ours(x, tr)
      arrays[ours] = x.astype(np_dtype) if np_dtype is not None else x
    yield group, arrays
    del arrays, x  # let the group go before reading the next one


def to_hf(ckpt: str, out_dir: str, max_shard_bytes: int = 2 << 30) -> dict:
  """Any checkpoint (converted dir or run dir) -> released layout and names (config, tokenizer files,
  unused tensors)."""
  t0 = time.time()
  ref = resolve(ckpt)
  cfg = model_config(ref)
  if ref.kind == "converted":
    dtype, groups, unused = read_meta(ref.path).get("dtype"), iter_groups(ref.path), read_unused(ref.path)
  else:
    dtype, groups, unused = None, [("all", load_canonical(ref)[1])], {}
  plan = {ours: (hf, tr) for hf, ours, tr, _ in rules.expand(cfg)}
  n_tensors = n_params = 0
  with atomic_dir(out_dir) as tmp:
    if ref.kind == "converted":
      copy_side_files(ref.path, tmp)
    else:
      if ref.tokenizer_dir:
        copy_tokenizer(ref.tokenizer_dir, tmp)
      with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_lib.to_hf_config(cfg, default_hf_config(cfg)), f, indent=2)
    writer = ShardedWriter(tmp, max_shard_bytes)
    for group, arrays in groups:
      for ours, x in arrays.items():
        if ours not in plan:
          raise CheckpointError(f"{ref.path}/params/{group}: unexpected parameter {ours}")
        hf, tr = plan[ours]
        writer.add(hf, rules.to_hf(x, tr, _hf_shape(x.shape, tr, cfg)))
        n_tensors += 1
        n_params += int(x.size)
      progress(f"to-hf: {group}, {n_tensors} tensors, {time.time() - t0:.0f} s")
    for name, x in unused.items():
      writer.add(name, x)
      n_tensors += 1
    writer.close()
    if dtype:
      path = os.path.join(tmp, "config.json")
      with open(path) as f:
        hf_config = json.load(f)
      hf_config["torch_dtype"] = dtype
      with open(path, "w") as f:
        json.dump(hf_config, f, indent=2)
  return {"tensors": n_tensors, "parameters": n_params, "seconds": round(time.time() - t0, 3)}


def default_hf_config(cfg) -> dict:
  """The released config fields our config does not hold, for checkpoints made here (runs, merges)."""
  if cfg.vision is None:
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
  return {"architectures": ["KeyeVL1_5ForConditionalGeneration"]}
