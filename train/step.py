"""One training step: loss and gradients (optionally over microbatches), global-norm clipping, AdamW,
and skipping updates whose loss or gradient is not finite. Jitted once over the mesh with donated state.

The loss is a function `loss_fn(model, batch) -> (sum, denominator, metrics)`:
  sum          scalar, differentiated;
  denominator  scalar the sum is divided by, e.g. the number of target tokens; it must not depend on the
               parameters (no gradient is taken through it);
  metrics      dict of arrays, returned by the step beside its own (loss, grad_norm, ...).
With microbatches, sums, denominators and metrics are summed over them and the loss is sum / denominator
of the whole global batch, so microbatching changes nothing. A zero denominator gives a zero loss. The
default is the chunked next-token cross-entropy (train/losses/cross_entropy.py).

Train state (a pytree, also what checkpoints hold):
  step       int32   steps taken (skipped ones included: their data was consumed)
  params     {key: array}  every parameter, fp32 master copies
  opt        optax state over the trainable parameters only
  rng        PRNG key
  nonfinite  int32   consecutive skipped steps;  skipped  int32  skipped steps in total
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from keye_jax import batch_layout, ops
from train.config import TrainConfig
from train.losses.cross_entropy import cross_entropy_loss
from train.model_state import ModelShape, batch_shardings, init_params, like_shardings
from train.optimizer import clip_by_global_norm, make_optimizer, trainable_keys


@dataclasses.dataclass
class StepFns:
  """The jitted step and what it was built from."""

  step: Callable  # (state, batch) -> (state, metrics)
  shape: ModelShape
  tx: optax.GradientTransformation
  schedules: dict
  train_keys: list
  state_shardings: dict
  mesh: object


def _nonzero(denom):
  return jnp.where(denom != 0, denom, 1.0)


def make_step(cfg: TrainConfig, shape: ModelShape, mesh, num_sources: int, batch_keys,
              loss_fn: Callable | None = None) -> StepFns:
  """The jitted step over `mesh` for batches with `batch_keys`; `loss_fn` (see the module docstring)
  defaults to the cross-entropy with cfg.loss_chunk, cfg.z_loss and per-source sums over `num_sources`."""
  params_abstract = shape.shapes()
  train_keys = trainable_keys(params_abstract, cfg.optimizer)
  if not train_keys:
    raise ValueError(f"optimizer.trainable={cfg.optimizer.trainable} selects no parameters of this model")
  tx, schedules = make_optimizer(cfg.optimizer, train_keys, cfg.steps)
  accum = cfg.grad_accum
  if loss_fn is None:
    loss_fn = cross_entropy_loss(chunk=cfg.loss_chunk, z_loss=cfg.z_loss, num_sources=num_sources)

  compute = jnp.dtype(cfg.model.dtype)

  def to_compute(k, v):
    # Matmul weights go to the compute dtype while still sharded, so FSDP gathers move half the bytes
    # (the layers cast them anyway; norms and other parameters stay fp32).
    cast = k.endswith("kernel") or k == "decoder/embed/embedding"
    return v.astype(compute) if cast and compute.itemsize < v.dtype.itemsize else v

  def model_of(trainable, frozen):
    return shape.build({k: to_compute(k, v) for k, v in {**trainable, **frozen}.items()})

  def mean_loss(trainable, frozen, batch):
    # One batch: the sum is divided inside, so the backward starts from 1 / denominator.
    total, denom, metrics = loss_fn(model_of(trainable, frozen), batch)
    denom = jax.lax.stop_gradient(denom)
    return total / _nonzero(denom), (total, denom, metrics)

  def summed_loss(trainable, frozen, batch):
    total, denom, metrics = loss_fn(model_of(trainable, frozen), batch)
    return total, (jax.lax.stop_gradient(denom), metrics)

  def step(state, batch):
    params = state["params"]
    trainable = {k: params[k] for k in train_keys}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    if accum == 1:
      (loss, (total, denom, metrics)), grads = jax.value_and_grad(mean_loss, has_aux=True)(trainable, frozen, batch)
    else:
      # Gradients of the microbatches' sums, divided once by the whole batch's denominator.
      def body(acc_g, micro):
        (total, (denom, metrics)), g = jax.value_and_grad(summed_loss, has_aux=True)(trainable, frozen, micro)
        return jax.tree.map(jnp.add, acc_g, g), (total, denom, metrics)

      grads, outs = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, trainable), batch_layout.microbatches(batch, accum))
      total, denom, metrics = jax.tree.map(lambda x: x.sum(0), outs)
      inv = 1.0 / _nonzero(denom)
      loss = total * inv
      grads = jax.tree.map(lambda g: g * inv.astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if cfg.optimizer.clip_norm > 0:
      grads = clip_by_global_norm(grads, grad_norm, cfg.optimizer.clip_norm)

    def update(grads, opt, trainable):
      updates, opt = tx.update(grads, opt, trainable)
      return optax.apply_updates(trainable, updates), opt

    # A branch rather than a select over every tensor: a select reads the old values after the update
    # has overwritten their donated buffers, so XLA copied every parameter and moment first.
    new_trainable, new_opt = jax.lax.cond(ok, update, lambda g, opt, t: (t, opt), grads, state["opt"], trainable)
    new_state = dict(
        step=state["step"] + 1,
        params={**params, **new_trainable},
        opt=new_opt,
        rng=jax.random.fold_in(state["rng"], state["step"]),
        nonfinite=jnp.where(ok, 0, state["nonfinite"] + 1),
        skipped=state["skipped"] + (~ok).astype(jnp.int32),
    )
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, loss_denominator=denom,
                   tokens=(batch["segment_ids"] > 0).sum(), skipped_step=~ok,
                   **{f"lr/{m}": s(state["step"]) for m, s in schedules.items()})
    return new_state, metrics

  shardings = shape.shardings(mesh)
  opt_abstract = jax.eval_shape(tx.init, {k: params_abstract[k] for k in train_keys})
  replicated = NamedSharding(mesh, P())
  state_shardings = dict(step=replicated, params=shardings, opt=like_shardings(opt_abstract, shardings, mesh),
                         rng=replicated, nonfinite=replicated, skipped=replicated)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_shardings(batch_keys, mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,),
                   compiler_options=ops.for_platform(mesh.devices.flat[0].platform).compiler_options)

  def run(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  run.lower = lambda state, batch: _lower(jitted, mesh, state, batch)
  return StepFns(run, shape, tx, schedules, train_keys, state_shardings, mesh)


def _lower(jitted, mesh, state, batch):
  with jax.set_mesh(mesh):
    return jitted.lower(state, batch)


def init_state(fns: StepFns, seed: int, params: dict | None = None) -> dict:
  """A fresh train state (new parameters unless `params` is given), laid out by `fns.state_shardings`."""
  sh = fns.state_shardings
  if params is None:
    params = init_params(fns.shape, seed, sh["params"])
  opt = jax.jit(fns.tx.init, out_shardings=sh["opt"])({k: params[k] for k in fns.train_keys})
  put = lambda x: jax.device_put(x, sh["step"])
  return dict(step=put(jnp.zeros((), jnp.int32)), params=params, opt=opt,
              rng=put(jax.random.key_data(jax.random.key(seed))), nonfinite=put(jnp.zeros((), jnp.int32)),
              skipped=put(jnp.zeros((), jnp.int32)))


def abstract_state(fns: StepFns) -> dict:
  """ShapeDtypeStructs with shardings of the train state (for restoring and for AOT compiles)."""
  shapes = fns.shape.shapes()
  opt = jax.eval_shape(fns.tx.init, {k: shapes[k] for k in fns.train_keys})
  tree = dict(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes, opt=opt,
              rng=jax.ShapeDtypeStruct((2,), jnp.uint32), nonfinite=jax.ShapeDtypeStruct((), jnp.int32),
              skipped=jax.ShapeDtypeStruct((), jnp.int32))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                      fns.state_shardings)

