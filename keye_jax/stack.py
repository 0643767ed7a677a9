"""A stack of identical layers: scanned (one compiled body, params with a leading layer axis) or a plain
list (unscanned). Both layouts hold the same numbers; the checkpoint converter maps between them."""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
}


class Stack(nnx.Module):
  """`num_layers` layers made by `make_layer(rngs)`.

  `__call__(x, per_layer=None, **shared)` runs x through every layer as `layer(x, per_layer_i, **shared)
  -> (x, out_i)`; `per_layer` is a pytree with a leading layer axis (e.g. a KV cache), or, unscanned, a
  list with one pytree per layer (a decode cache kept per layer: no per-step slicing copies); the
  stacked `out_i` are returned beside x.
  """

  def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, scan: bool,
               remat: str, rngs: nnx.Rngs):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    self.scan, self.remat, self.num_layers = scan, remat, num_layers
    if scan:
      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def create(r):
        return make_layer(r)
      self.layers = create(rngs)
    else:
      self.layers = nnx.List([make_layer(rngs) for _ in range(num_layers)])

  def __call__(self, x, per_layer=None, **shared):
    def body(x, layer_state, graphdef, extra):
      layer = nnx.merge(graphdef, layer_state)
      return layer(x, extra, **shared)

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], static_argnums=(2,))

    if self.scan:
      graphdef, state = nnx.split(self.layers)
      x, outs = jax.lax.scan(lambda c, xs: body(c, xs[0], graphdef, xs[1]), x, (state, per_layer))
      return x, outs
    outs = []
    for i, layer in enumerate(self.layers):
      graphdef, state = nnx.split(layer)
      extra = (per_layer[i] if isinstance(per_layer, list) else
               None if per_layer is None else jax.tree.map(lambda a: a[i], per_layer))
      x, out = body(x, state, graphdef, extra)
      outs.append(out)
    return x, jax.tree.map(lambda *a: jax.numpy.stack(a), *outs) if outs and outs[0] is not None else None
