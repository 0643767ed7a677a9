"""Logical axis names -> mesh axes.

Parameters and main activations are annotated with logical names ("embed", "heads", "batch", ...).
A rules table maps each name to mesh axes (`data`, `fsdp`, `tensor`, `context`) or None; the model
never names mesh axes itself and never writes collectives: XLA's SPMD partitioner inserts them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")

# (logical name, mesh axes). The first matching rule wins; unknown names are replicated.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # Vocabulary-sized work (embedding lookup, loss) is split over every axis the parameters are
    # split across, with the tokens gathered over those axes: no device ever holds a whole table.
    ("batch_replicas", "data"),
    ("param_shards", ("fsdp", "context", "tensor")),
)


def logical_to_spec(names, rules=DEFAULT_RULES, mesh_axes=None) -> P:
  """PartitionSpec for a tuple of logical names; a mesh axis is used at most once per spec."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name in names:
    axes = table.get(name)
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and (mesh_axes is None or a in mesh_axes))
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def constrain(x, names, rules=DEFAULT_RULES):
  """with_sharding_constraint by logical names; a no-op when no mesh is set (single device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh.axis_names))


def embedding_lookup(table_vd, ids_bs, dtype):
  """table[ids] as `dtype` (B, S, D), laid out like the activations ("batch", "length", "act_embed"),
  without gathering the vocabulary-sized table: the ids are gathered instead, every device looks up all
  tokens in its slice of dims (split over the parameter axes), then all-to-alls give each device its
  own tokens' full rows. The gradient is scattered into the slice alone. The all-to-alls move one
  mesh axis at a time: asked to move several at once, XLA gathers the whole (B, S, D) instead.
  (A table split on both dims would make XLA replicate the whole output.)"""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1 or ids_bs.ndim != 2:
    return jnp.take(table_vd, ids_bs, axis=0).astype(dtype)
  big = lambda a: a in mesh.axis_names and mesh.shape[a] > 1
  dims = [a for a in ("fsdp", "context", "tensor") if big(a)]
  batch, length = ["data"] if big("data") else [], None
  spec = lambda: P(tuple(batch) or None, length, tuple(dims) or None)
  table = jax.lax.with_sharding_constraint(table_vd, P(None, tuple(dims) or None))
  ids = jax.lax.with_sharding_constraint(ids_bs, P(tuple(batch) or None, None))
  rows = jax.lax.with_sharding_constraint(jnp.take(table, ids, axis=0).astype(dtype), spec())
  for a in list(dims):
    dims.remove(a)
    if a == "fsdp":
      batch.append(a)
    elif a == "context":
      length = a
    rows = jax.lax.with_sharding_constraint(rows, spec())
  return constrain(rows, ("batch", "length", "act_embed"))


def param_specs(state, rules=DEFAULT_RULES, mesh_axes=None):
  """PartitionSpec tree for an nnx.State; stacked (scanned) params get a leading "layers" axis."""

  def spec(v):
    names = tuple(v.get_metadata().get("logical_axes") or ())
    names = ("layers",) * (v.get_value().ndim - len(names)) + names
    return logical_to_spec(names, rules, mesh_axes)

  return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_mesh(shape: dict[str, int], devices=None) -> Mesh:
  """Mesh over `devices` (default all) with axes data, fsdp, tensor, context; one size may be -1."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if unknown:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
    sizes[unknown[0]] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def shard_model(model, mesh: Mesh, rules=DEFAULT_RULES):
  """Places every parameter of `model` on `mesh` by its logical axes (in place)."""
  state = nnx.state(model)
  specs = param_specs(state, rules, mesh.axis_names)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  nnx.update(model, jax.device_put(state, shardings))
  return model
