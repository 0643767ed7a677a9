"""The model as a flat dict of arrays, laid out on a mesh.

Training handles parameters as {"decoder/layers/layers/mlp/up_proj/kernel": array, ...} (the model's
own layout, scanned or not) plus a static graphdef and an abstract state to rebuild the module inside
jitted functions. Nothing here materialises unsharded parameters: `init_params` creates every array
directly in its shard, which is what lets an 8B model start on a pod (or be planned without one).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from keye_jax import batch_layout
from keye_jax.config import KeyeConfig
from keye_jax.model import KeyeVL
from keye_jax.sharding import DEFAULT_RULES, param_specs

# Parameters (and so optimizer state) are sharded over the context axis too: a long-context mesh
# (context 16 x fsdp 8) then holds 1/128 of them per chip, not 1/8. Activations keep DEFAULT_RULES.
PARAM_RULES = tuple((name, ("fsdp", "context")) if name == "embed" else (name, axes) for name, axes in DEFAULT_RULES)


def _key(path) -> str:
  return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What is static about a model: its graphdef, abstract state and parameter keys in order."""

  cfg: KeyeConfig
  graphdef: object
  abstract: nnx.State

  @staticmethod
  def of(cfg: KeyeConfig) -> "ModelShape":
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: KeyeVL(cfg, rngs=nnx.Rngs(0))))
    for path, var in nnx.to_flat_state(abstract):
      if not isinstance(var, nnx.Param):
        raise TypeError(f"{_key(path)}: training expects only nnx.Param state, got {type(var).__name__}")
    return ModelShape(cfg, graphdef, abstract)

  def shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    return {_key(p): v.get_value() for p, v in nnx.to_flat_state(self.abstract)}

  def build(self, params: dict) -> KeyeVL:
    """The module over `params` (a flat dict; works on tracers inside jit)."""
    flat = [(p, v.replace(params[_key(p)])) for p, v in nnx.to_flat_state(self.abstract)]
    return nnx.merge(self.graphdef, nnx.from_flat_state(flat))

  def flatten(self, model: KeyeVL) -> dict:
    return {_key(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  def specs(self, mesh_axes, rules=PARAM_RULES) -> dict[str, P]:
    specs = param_specs(self.abstract, rules, mesh_axes)
    return {_key(p): s for p, s in nnx.to_flat_state(specs)}

  def shardings(self, mesh, rules=PARAM_RULES) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, s) for k, s in self.specs(mesh.axis_names, rules).items()}


def init_params(shape: ModelShape, seed: int, shardings: dict) -> dict:
  """Fresh parameters, each created directly in its shard."""

  def make():
    return shape.flatten(KeyeVL(shape.cfg, rngs=nnx.Rngs(seed)))

  return jax.jit(make, out_shardings=shardings)()


def like_shardings(tree, param_shardings: dict, mesh):
  """Shardings for a tree derived from parameters (optimizer moments): a leaf under a parameter's key
  with that parameter's shape gets its sharding, anything else (counts, scalars) is replicated."""
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    for k in path:
      key = getattr(k, "key", None)
      if key in param_shardings and getattr(leaf, "ndim", 0) > 0:
        return param_shardings[key]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_shardings(batch_keys, mesh) -> dict[str, NamedSharding]:
  """Rows split over the mesh's batch axes (keye_jax.batch_layout)."""
  return batch_layout.shardings(batch_keys, mesh)


def count_params(shapes: dict) -> int:
  return int(sum(math.prod(s.shape) for s in shapes.values()))
