"""Model checkpoints on disk: the one place that reads and writes them, for every command and for training.

Two kinds of directory hold a model, and anything that takes a checkpoint accepts either, as an
absolute or relative path (`resolve` turns the argument into a `CheckpointRef`):

  converted checkpoint   keye_checkpoint.json  format marker, parameter groups, dtype, our config
                         config.json           the released config (HF layout)
                         tokenizer.json, ...   tokenizer / preprocessor files copied as-is
                         params/<group>/       one Orbax PyTree checkpoint per group (the embedding, each
                                               decoder layer, each vision layer, the rest): an 8B checkpoint
                                               streams through a 24 GiB machine in both directions
                         unused/               release tensors the model does not use (kept for export)
  training run dir       config.yaml           the run's whole TrainConfig (model under `model:`)
                         tokenizer/            the run's tokenizer files (absent for synthetic-data runs)
                         checkpoints/<step>/   Orbax train state (params, optimizer, ...) + data state
                         (a schedule's run dir holds schedule.json naming its stage run dirs: its latest
                         checkpoint is the last stage's)

A run dir's `checkpoints/<step>` may also be given to pick a step other than the latest. Keys inside a
converted group are canonical parameter paths (keye_jax.params) with '/' spelled '.'; a run's train
state keeps the model's own layout (scanned or not). Writers build into `OUT.partial` and rename at the
end, so a failure leaves no half-written output.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import sys
import time

import numpy as np

from keye_jax import config as config_lib

FORMAT = "keye-jax-converted-v1"
META = "keye_checkpoint.json"
RUN_CONFIG = "config.yaml"
RUN_CHECKPOINTS = "checkpoints"
RUN_TOKENIZER = "tokenizer"
SCHEDULE = "schedule.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json")
_COPY_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".py", ".tiktoken")
_SKIP_FILES = {"model.safetensors.index.json", META}


class CheckpointError(ValueError):
  """A checkpoint is missing, malformed, or does not match the model; the message names the file/key."""


def progress(message: str) -> None:
  """One progress line on stderr (every command's progress goes there; stdout holds the result)."""
  print(message, file=sys.stderr, flush=True)


# ---- what a checkpoint argument names ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """A resolved checkpoint: `kind` "converted" (path = the directory) or "run" (path = the run dir,
  `step` = the checkpoint read)."""

  kind: str
  path: str
  step: int | None = None

  @property
  def tokenizer_dir(self) -> str | None:
    """The directory holding this checkpoint's tokenizer.json, or None."""
    d = self.path if self.kind == "converted" else os.path.join(self.path, RUN_TOKENIZER)
    return d if os.path.isfile(os.path.join(d, "tokenizer.json")) else None

  def describe(self) -> str:
    return self.path if self.kind == "converted" else f"{self.path} (step {self.step})"


def is_run_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, RUN_CHECKPOINTS))


def run_steps(run_dir: str) -> list[int]:
  """The finished checkpoint steps of a run dir (Orbax renames a step's directory only once complete)."""
  d = os.path.join(run_dir, RUN_CHECKPOINTS)
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def resolve(arg: str) -> CheckpointRef:
  """The checkpoint a command-line argument names: a converted checkpoint dir, a training/RL run dir (its
  latest checkpoint), a run dir's `checkpoints/<step>`, or a schedule's run dir (its last stage's latest
  checkpoint). Relative paths resolve against the current directory."""
  if isinstance(arg, CheckpointRef):
    return arg
  path = os.path.abspath(os.fspath(arg))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{arg}: no such checkpoint directory")
  if os.path.isfile(os.path.join(path, META)):
    return CheckpointRef("converted", path)
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == RUN_CHECKPOINTS:
    return CheckpointRef("run", os.path.dirname(parent), int(os.path.basename(path)))
  if os.path.basename(path) == RUN_CHECKPOINTS and os.path.isfile(os.path.join(parent, RUN_CONFIG)):
    path = parent
  if is_run_dir(path):
    steps = run_steps(path)
    if not steps:
      raise FileNotFoundError(f"{arg}: training run dir without a finished checkpoint yet")
    return CheckpointRef("run", path, steps[-1])
  if os.path.isfile(os.path.join(path, SCHEDULE)):
    with open(os.path.join(path, SCHEDULE)) as f:
      stages = json.load(f).get("stages", [])
    done = [s for s in stages if run_steps(s)]
    if not done:
      raise FileNotFoundError(f"{arg}: schedule run dir whose stages have no checkpoint yet")
    return resolve(done[-1])
  raise CheckpointError(f"{arg}: not a checkpoint: expected a converted checkpoint ({META}) or a training "
                        f"run dir ({RUN_CHECKPOINTS}/)")


def model_config(ref: CheckpointRef | str) -> config_lib.KeyeConfig:
  """The model config stored with a checkpoint."""
  ref = resolve(ref)
  if ref.kind == "converted":
    return config_lib.from_dict(config_lib.KeyeConfig, read_meta(ref.path)["keye_config"])
  return run_model_config(ref.path)


def run_model_config(run_dir: str) -> config_lib.KeyeConfig:
  path = os.path.join(run_dir, RUN_CONFIG)
  data = config_lib.read_yaml(path)
  if not isinstance(data.get("model"), dict):
    raise CheckpointError(f"{path}: no `model:` section")
  try:
    return config_lib.from_dict(config_lib.KeyeConfig, data["model"], prefix="model")
  except config_lib.ConfigError as e:
    raise CheckpointError(f"{path}: {e}") from e


def tokenizer_dir(ref: CheckpointRef | str) -> str:
  """The directory of a checkpoint's tokenizer files; a one-line error when it has none."""
  ref = resolve(ref)
  d = ref.tokenizer_dir
  if d is None:
    where = "" if ref.kind == "converted" else f"/{RUN_TOKENIZER}"
    raise FileNotFoundError(f"{ref.path}{where}: the checkpoint carries no tokenizer.json (a run trained on "
                            "synthetic batches has none; give a converted checkpoint with its tokenizer)")
  return d


def copy_tokenizer(src: str, dst: str) -> bool:
  """Copies the tokenizer files of directory (or tokenizer.json) `src` into `dst`; False when none."""
  src = os.path.dirname(src) if src.endswith(".json") else src
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  if "tokenizer.json" not in names:
    return False
  os.makedirs(dst, exist_ok=True)
  for n in names:
    shutil.copy2(os.path.join(src, n), os.path.join(dst, n))
  return True


# ---- loading a model from either kind ---------------------------------------------------------------


class _DropReadOnlyNotices(logging.Filter):
  NOTICES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

  def filter(self, record):
    return not str(record.getMessage()).startswith(self.NOTICES)


@contextlib.contextmanager
def _quiet_read_only_notices():
  """Orbax warns three times that a read-only manager will not save or create directories: that is what
  read-only asks for, so those notices (and only those) are dropped while the manager is made."""
  drop = _DropReadOnlyNotices()
  logger = logging.getLogger("absl")
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


def restore_run_params(run_dir: str, abstract_params: dict, step: int | None = None) -> tuple[dict, int]:
  """Only the parameters of a run's checkpoint (latest unless `step`), laid out like `abstract_params`
  ({key: ShapeDtypeStruct with sharding}; another stage's trainable set or mesh is fine: optimizer state
  is not read)."""
  import jax
  import orbax.checkpoint as ocp
  directory = os.path.abspath(os.path.join(run_dir, RUN_CHECKPOINTS))
  with _quiet_read_only_notices():
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    target = {"params": abstract_params}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)))
  finally:
    mngr.close()
  return restored["state"]["params"], step


def _run_model(ref: CheckpointRef):
  """(cfg, KeyeVL) of a run's checkpoint, on this process's first device."""
  import jax
  from flax import nnx
  from jax.sharding import SingleDeviceSharding

  from keye_jax.model import KeyeVL
  cfg = run_model_config(ref.path)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: KeyeVL(cfg, rngs=nnx.Rngs(0))))
  flat = nnx.to_flat_state(abstract)
  key = lambda path: "/".join(str(p) for p in path)
  dev = SingleDeviceSharding(jax.local_devices()[0])
  target = {}
  for path, var in flat:
    v = var.get_value()
    target[key(path)] = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=dev)
  params, _ = restore_run_params(ref.path, target, ref.step)
  model = nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(params[key(p)])) for p, v in flat]))
  return cfg, model


def load_canonical(arg) -> tuple[config_lib.KeyeConfig, dict[str, np.ndarray]]:
  """(model config, canonical flat parameters as numpy) of any checkpoint argument."""
  ref = resolve(arg)
  if ref.kind == "converted":
    return model_config(ref), load_flat(ref.path)
  from keye_jax.params import get_flat
  cfg, model = _run_model(ref)
  return cfg, get_flat(model)


def load_model(arg, overrides: list[str] | tuple[str, ...] = ()):
  """(cfg, KeyeVL) from any checkpoint argument; `overrides` like ["dtype=bfloat16", "scan_layers=false"]
  change how the model runs (a layout change re-lays the parameters out through the canonical view)."""
  from flax import nnx

  from keye_jax.model import KeyeVL
  from keye_jax.params import get_flat, set_flat
  ref = resolve(arg)
  stored = model_config(ref)
  cfg = config_lib.apply_overrides(stored, list(overrides))
  if ref.kind == "run":
    _, model = _run_model(ref)
    if cfg == stored:
      return cfg, model
    flat = get_flat(model)
    del model
  else:
    flat = load_flat(ref.path)
  model = KeyeVL(cfg, rngs=nnx.Rngs(0))
  set_flat(model, flat)
  return cfg, model


# ---- converted checkpoints: writing -----------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(out_dir: str):
  """Yields a scratch directory that becomes `out_dir` only if the block succeeds."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
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


def copy_side_files(src: str, dst: str) -> None:
  """Config, tokenizer and preprocessor files (and remote code) of a checkpoint directory."""
  for name in os.listdir(src):
    p = os.path.join(src, name)
    if os.path.isfile(p) and name.endswith(_COPY_SUFFIXES) and name not in _SKIP_FILES:
      shutil.copy2(p, os.path.join(dst, name))


def check_array(name: str, x: np.ndarray, where: str = "") -> None:
  """Parameters are floating point and finite; anything else is named and refused."""
  prefix = f"{where}: " if where else ""
  if x.dtype.kind != "f" and x.dtype.name != "bfloat16":
    raise CheckpointError(f"{prefix}tensor {name} has dtype {x.dtype}, expected a floating-point type")
  finite = np.isfinite(x.astype(np.float32) if x.dtype.name == "bfloat16" else x)
  if not finite.all():
    raise CheckpointError(f"{prefix}tensor {name} has {int((~finite).sum())} non-finite values (NaN/inf)")


def write_converted(out_dir: str, cfg, hf_config: dict, groups, unused=(), side_files_from: str | None = None,
                    dtype: str | None = None, tokenizer_from: str | None = None, what: str = "writing") -> dict:
  """Writes a converted checkpoint from `groups`: an iterable of (group name, {canonical path: array}),
  consumed one group at a time; every array is checked (floating point, finite). `side_files_from`: a
  checkpoint directory whose config/tokenizer files are copied; `tokenizer_from`: a directory whose
  tokenizer files are copied. Warns on stderr when the result has no tokenizer.
  Returns {"tensors", "parameters", "seconds"}."""
  import orbax.checkpoint as ocp
  t0 = time.time()
  out_dir = os.path.abspath(out_dir)
  n_tensors = n_params = 0
  names = []
  ckptr = ocp.PyTreeCheckpointer()
  with atomic_dir(out_dir) as tmp:
    if side_files_from:
      copy_side_files(side_files_from, tmp)
    if tokenizer_from:
      copy_tokenizer(tokenizer_from, tmp)
    for group, arrays in groups:
      for k, x in arrays.items():
        check_array(k, x)
      _save_group(ckptr, os.path.join(tmp, "params", group), arrays)
      names.append(group)
      n_tensors += len(arrays)
      n_params += sum(int(a.size) for a in arrays.values())
      progress(f"{what}: group {len(names)} ({group}), {n_tensors} tensors, {time.time() - t0:.0f} s")
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
    if not os.path.isfile(os.path.join(tmp, "tokenizer.json")):
      progress(f"warning: {out_dir} has no tokenizer.json: `keye generate` and `keye eval` will need one "
               "(copy the tokenizer files into it)")
  return {"tensors": n_tensors, "parameters": n_params, "seconds": round(time.time() - t0, 3)}


# ---- converted checkpoints: reading -----------------------------------------------------------------


def read_meta(ckpt_dir: str) -> dict:
  path = os.path.join(os.path.abspath(ckpt_dir), META)
  if not os.path.exists(path):
    raise CheckpointError(f"{ckpt_dir}: not a converted keye-jax checkpoint (no {META})")
  with open(path) as f:
    try:
      meta = json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: not valid JSON ({e})") from e
  if meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT}")
  return meta


def load_config(ckpt_dir: str, **runtime) -> config_lib.KeyeConfig:
  """Our model config of a converted checkpoint; `runtime` fields (dtype=..., ...) applied over it."""
  meta = read_meta(ckpt_dir)
  cfg = config_lib.from_dict(config_lib.KeyeConfig, meta["keye_config"])
  return config_lib.apply_overrides(cfg, [f"{k}={v}" for k, v in runtime.items()]) if runtime else cfg


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


def iter_groups(ckpt_dir: str):
  """Yields (group, {canonical path: numpy array}) one group at a time."""
  import orbax.checkpoint as ocp
  ckpt_dir = os.path.abspath(ckpt_dir)
  meta = read_meta(ckpt_dir)
  ckptr = ocp.PyTreeCheckpointer()
  for group in meta["groups"]:
    yield group, _restore_group(ckptr, os.path.join(ckpt_dir, "params", group))


def read_unused(ckpt_dir: str) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(ckpt_dir), "unused")
  if not os.path.exists(path):
    return {}
  return {k: np.asarray(v) for k, v in ocp.PyTreeCheckpointer().restore(path).items()}


def load_flat(ckpt_dir: str) -> dict[str, np.ndarray]:
  flat = {}
  for _, arrays in iter_groups(ckpt_dir):
    flat.update(arrays)
  return flat
