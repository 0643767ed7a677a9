"""Typed, frozen configuration: dataclasses loaded from YAML, HF config.json and `key.sub=value` overrides.

Every config is a frozen dataclass. `from_dict` builds one from nested dicts and rejects unknown keys and
wrong types with an error that names the full dotted key. A YAML value for a dataclass-typed field may be a
path to another YAML file (relative to the including file), which is how stage files compose model files.

Paths: a field declared with `path_field()` holds a filesystem path. A relative path written in a YAML file
resolves against that file's directory; one given as a `key=value` override (the command line) resolves
against the current directory. Loaded configs hold absolute paths.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
  """A config key is unknown, missing or of the wrong type; the message names the dotted key."""


def path_field(default: str = "", *, unless: str = ""):
  """A str field holding a filesystem path (see the module docstring). `unless`: a sibling field that,
  when set, makes this value a name rather than a path (a TFDS dataset name inside `data_dir`)."""
  return dataclasses.field(default=default, metadata={"path": unless or True})


def resolve_path(value: str, base_dir: str | None) -> str:
  """`value` made absolute against `base_dir` (the current directory when None); "" stays ""."""
  if not value:
    return value
  value = os.path.expanduser(value)
  return os.path.normpath(value if os.path.isabs(value) else os.path.join(base_dir or os.getcwd(), value))


def _is_path(field: dataclasses.Field, siblings: dict) -> bool:
  flag = field.metadata.get("path")
  return flag is True or (isinstance(flag, str) and not siblings.get(flag))


# --------------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Qwen3 decoder sizes. Defaults are Keye-VL-1.5-8B's."""

  vocab_size: int = 151936
  hidden_size: int = 4096
  intermediate_size: int = 12288
  num_layers: int = 36
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 40960
  tie_word_embeddings: bool = False


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """SigLIP-so400m vision tower at native resolution. Defaults are Keye-VL-1.5-8B's."""

  hidden_size: int = 1152
  intermediate_size: int = 4304
  num_layers: int = 27
  num_heads: int = 16
  num_channels: int = 3
  image_size: int = 384
  patch_size: int = 14
  layer_norm_eps: float = 1e-6
  spatial_merge_size: int = 2
  rope_theta: float = 10000.0
  position_init_std: float = 0.0  # std of a fresh position table; 0: SigLIP's 1/sqrt(hidden_size)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def grid_size(self) -> int:  # side of the learned position table (27 at 384/14)
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class KeyeConfig:
  """The whole model plus how it runs (layout, remat, dtypes, attention implementation).

  `vision=None` is a text-only Qwen3 model (used for converting a Qwen3 checkpoint and for tests).
  """

  text: TextConfig = TextConfig()
  vision: VisionConfig | None = VisionConfig()
  projector_ln_eps: float = 1e-5
  # Special tokens (released tokenizer ids; the 1.5-only tokens are looked up by name in the tokenizer).
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int = 151643
  eos_token_id: int = 151645
  # How the model runs.
  scan_layers: bool = True
  remat: str = "none"  # none | full | dots
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype: bfloat16 for training/serving on TPU
  attention_impl: str = "auto"  # auto | xla | pallas


# --------------------------------------------------------------------------------------------------
# Generic loading.


def _check_type(value: Any, tp: Any, key: str, base_dir: str | None = None) -> Any:
  """Returns `value` converted to `tp` where that is lossless (int->float, list->tuple), else raises."""
  origin = typing.get_origin(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    args = typing.get_args(tp)
    if value is None and type(None) in args:
      return None
    for arg in args:
      if arg is type(None):
        continue
      try:
        return _check_type(value, arg, key, base_dir)
      except ConfigError:
        pass
    raise ConfigError(f"{key}: {value!r} does not match {tp}")
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
    return from_dict(tp, value, prefix=key, base_dir=base_dir)
  if origin is tuple:
    args = typing.get_args(tp)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_check_type(v, args[0], f"{key}[{i}]", base_dir) for i, v in enumerate(value))
    if len(args) != len(value):
      raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
    return tuple(_check_type(v, a, f"{key}[{i}]", base_dir) for i, (v, a) in enumerate(zip(value, args)))
  if origin is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    _, vt = typing.get_args(tp)
    return {k: _check_type(v, vt, f"{key}.{k}", base_dir) for k, v in value.items()}
  if tp is float:
    if isinstance(value, str):  # PyYAML reads exponents without a dot ("8e6") as strings
      try:
        return float(value)
      except ValueError:
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    return value
  if tp in (str, bool):
    if not isinstance(value, tp):
      raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value
  if isinstance(tp, type) and not isinstance(value, tp):
    raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
  return value


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict, prefix: str = "", base_dir: str | None = None) -> T:
  """Builds dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError. Relative
  paths (path fields, included files) resolve against `base_dir`; with None, path fields stay as given."""
  if not isinstance(data, dict):
    raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {type(data).__name__}")
  hints = _hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  names = set(fields)
  unknown = sorted(set(data) - names)
  if unknown:
    where = f"{prefix}." if prefix else ""
    raise ConfigError(f"unknown config key {where}{unknown[0]} (valid keys of {cls.__name__}: {sorted(names)})")
  kwargs = {}
  for name, value in data.items():
    key = f"{prefix}.{name}" if prefix else name
    tp = hints[name]
    # A string where a dataclass is expected: include another YAML file.
    sub = _dataclass_in(tp)
    if sub is not None and isinstance(value, str):
      path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
      if not os.path.exists(path) and os.path.exists(value):
        path = value
      value = read_yaml(path, key)
      kwargs[name] = from_dict(sub, value, prefix=key, base_dir=os.path.dirname(os.path.abspath(path)))
      continue
    if sub is not None and isinstance(value, dict):
      kwargs[name] = from_dict(sub, value, prefix=key, base_dir=base_dir)
      continue
    kwargs[name] = _check_type(value, tp, key, base_dir)
    if base_dir is not None and isinstance(kwargs[name], str) and _is_path(fields[name], data):
      kwargs[name] = resolve_path(kwargs[name], base_dir)
  return cls(**kwargs)


def _dataclass_in(tp) -> type | None:
  if dataclasses.is_dataclass(tp):
    return tp
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    for arg in typing.get_args(tp):
      if dataclasses.is_dataclass(arg):
        return arg
  return None


def read_yaml(path: str, what: str = "") -> dict:
  """The mapping at the top of a YAML file; a missing file or bad YAML is one ConfigError naming it."""
  if not os.path.exists(path):
    raise ConfigError(f"{what + ': ' if what else ''}config file not found: {path}")
  with open(path) as f:
    try:
      data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
      raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping")
  return data


def _yaml_problem(e: yaml.YAMLError) -> str:
  """PyYAML's multi-line message as one line: the problem and where."""
  mark = getattr(e, "problem_mark", None)
  problem = getattr(e, "problem", None) or str(e).splitlines()[0]
  where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
  return f"{problem}{where}"


def to_dict(cfg) -> dict:
  """Plain nested dict (tuples become lists) suitable for YAML/JSON."""

  def conv(v):
    if dataclasses.is_dataclass(v):
      return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (tuple, list)):
      return [conv(x) for x in v]
    if isinstance(v, dict):
      return {k: conv(x) for k, x in v.items()}
    return v

  return conv(cfg)


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...], base_dir: str | None = None) -> T:
  """Applies `a.b.c=value` strings (values parsed as YAML scalars/lists) to a frozen config. Relative
  paths in them resolve against `base_dir`, by default the current directory (command-line overrides)."""
  base_dir = base_dir or os.getcwd()
  if not overrides:
    return cfg
  for item in overrides:
    key, raw = parse_override(item)
    try:
      value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
      raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(e)}") from None
    cfg = _replace_path(cfg, key.split("."), value, key, base_dir)
  return _validated(cfg)


def _unchecked_replace(cfg, name: str, value):
  """`cfg` with one field changed and its checks not run yet: overrides that are only valid together
  (a bigger batch for more prompts) are checked once, after the last (`_validated`)."""
  new = copy.copy(cfg)
  object.__setattr__(new, name, value)
  return new


def _validated(cfg):
  """Re-runs every (nested) config's __post_init__ checks, innermost first."""
  changes = {f.name: _validated(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
             if dataclasses.is_dataclass(getattr(cfg, f.name))}
  return dataclasses.replace(cfg, **changes)


def parse_override(item: str) -> tuple[str, str]:
  """`key.sub=value` -> (key.sub, raw value); anything else is a ConfigError naming it."""
  key, eq, raw = str(item).partition("=")
  key = key.strip()
  if not eq or not key or any(not part.isidentifier() for part in key.split(".")):
    raise ConfigError(f"override {item!r} is not of the form key.sub=value")
  return key, raw


def _replace_path(cfg, parts: list[str], value, full_key: str, base_dir: str):
  name = parts[0]
  names = {f.name for f in dataclasses.fields(cfg)}
  if name not in names:
    raise ConfigError(f"unknown config key {full_key} ({name!r} is not one of {sorted(names)})")
  tp = _hints(type(cfg))[name]
  if len(parts) == 1:
    sub = _dataclass_in(tp)
    if sub is not None and isinstance(value, dict):
      current = getattr(cfg, name)
      merged = {**to_dict(current), **value} if current is not None else value
      new = from_dict(sub, merged, prefix=full_key, base_dir=base_dir)
    else:
      new = _check_type(value, tp, full_key, base_dir)
      field = next(f for f in dataclasses.fields(cfg) if f.name == name)
      if isinstance(new, str) and _is_path(field, to_dict(cfg)):
        new = resolve_path(new, base_dir)
    return _unchecked_replace(cfg, name, new)
  child = getattr(cfg, name)
  if not dataclasses.is_dataclass(child):
    raise ConfigError(f"unknown config key {full_key} ({name!r} has no sub-keys)")
  return _unchecked_replace(cfg, name, _replace_path(child, parts[1:], value, full_key, base_dir))


def load(cls: type[T], path: str, overrides: list[str] | tuple[str, ...] = ()) -> T:
  """Loads `cls` from a YAML file, then applies `key.sub=value` overrides."""
  data = read_yaml(path)
  try:
    cfg = from_dict(cls, data, base_dir=os.path.dirname(os.path.abspath(path)))
  except ConfigError as e:
    raise ConfigError(f"{path}: {e}") from e
  return apply_overrides(cfg, overrides)


# --------------------------------------------------------------------------------------------------
# The released checkpoint's config.json (flat text fields, nested `vision_config`).

_TEXT_FROM_HF = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
}
_VISION_FROM_HF = {
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_channels": "num_channels",
    "image_size": "image_size",
    "patch_size": "patch_size",
    "layer_norm_eps": "layer_norm_eps",
    "spatial_merge_size": "spatial_merge_size",
}
_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
           "bos_token_id", "eos_token_id")


def _pick(src: dict, table: dict) -> dict:
  out = {}
  for ours, theirs in table.items():
    if theirs in src and src[theirs] is not None:
      out[ours] = src[theirs]
  return out


def from_hf_config(hf: dict, **runtime) -> KeyeConfig:
  """KeyeConfig from a released (or Qwen3) config.json dict. `runtime` sets scan_layers, dtype, ..."""
  text_src = dict(hf)
  if "text_config" in hf and isinstance(hf["text_config"], dict):  # transformers-PR nesting
    text_src = {**hf, **hf["text_config"]}
  text = _pick(text_src, _TEXT_FROM_HF)
  if "head_dim" not in text and "hidden_size" in text and "num_heads" in text:
    text["head_dim"] = text["hidden_size"] // text["num_heads"]
  # rope_theta may live in rope_parameters / rope_scaling in newer transformers configs.
  for k in ("rope_scaling", "rope_parameters"):
    rs = text_src.get(k) or {}
    if isinstance(rs, dict):
      if "mrope_section" in rs:
        text["mrope_section"] = list(rs["mrope_section"])
      if "rope_theta" in rs and "rope_theta" not in text:
        text["rope_theta"] = rs["rope_theta"]
  if "mrope_section" not in text:
    hd = text.get("head_dim", TextConfig.head_dim)
    if hd != 128:  # a plain Qwen3 of another head size: all frequency slots on the temporal axis
      text["mrope_section"] = [hd // 2, 0, 0]
  vision = None
  if isinstance(hf.get("vision_config"), dict):
    vision = from_dict(VisionConfig, _pick(hf["vision_config"], _VISION_FROM_HF),
                       prefix="config.json:vision_config")
  tokens = {k: hf[k] for k in _TOKENS if isinstance(hf.get(k), int)}
  if isinstance(hf.get("eos_token_id"), list) and hf["eos_token_id"]:
    tokens["eos_token_id"] = hf["eos_token_id"][0]
  return KeyeConfig(text=from_dict(TextConfig, text, prefix="config.json"), vision=vision, **tokens,
                    **{k: v for k, v in runtime.items()})


def to_hf_config(cfg: KeyeConfig, base: dict | None = None) -> dict:
  """Writes our config back into the released flat layout, keeping unknown fields of `base`."""
  out = dict(base or {})
  t = cfg.text
  for ours, theirs in _TEXT_FROM_HF.items():
    out[theirs] = getattr(t, ours)
  out.setdefault("hidden_act", "silu")
  if cfg.vision is not None:
    out["rope_scaling"] = {**(out.get("rope_scaling") or {}), "type": "mrope",
                           "mrope_section": list(t.mrope_section)}
    vc = dict(out.get("vision_config") or {})
    for ours, theirs in _VISION_FROM_HF.items():
      vc[theirs] = getattr(cfg.vision, ours)
    vc.setdefault("hidden_act", "gelu_pytorch_tanh")
    out["vision_config"] = vc
    for k in _TOKENS:
      out[k] = getattr(cfg, k)
  return out
