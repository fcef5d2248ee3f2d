"""Optimisers: optax Adam (§4.3), and a lazy Adam that updates only the embedding rows a batch
used, taking their gradients as `IndexedRows` (docs/performance.md, "Lazy Adam": how it differs
from dense Adam; a row used at every step follows dense Adam exactly)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict


class IndexedRows(NamedTuple):
  """A row-sparse array: `values` [N, D] are rows `indices` [N] (int32, distinct; >= V marks an
  unused slot, dropped on scatter) of a [V, D] array."""
  indices: jax.Array
  values: jax.Array


def _is_rows(x) -> bool:
  return isinstance(x, IndexedRows)


class LazyAdamState(NamedTuple):
  count: jax.Array  # [] int32, steps taken
  mu: Any  # first moments, the structure of params (dense)
  nu: Any  # second moments


def lazy_adam(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam that updates only the rows of `IndexedRows` gradient leaves (dense leaves: plain Adam);
  its updates are of the same kinds, applied with `apply_updates`."""

  def init(params):
    zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
    return LazyAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                         jax.tree.map(zeros, params))

  def update(grads, state, params=None):
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_increment(state.count)
    c1 = 1.0 - b1 ** count.astype(jnp.float32)
    c2 = 1.0 - b2 ** count.astype(jnp.float32)

    def step(m, v, g):
      m = b1 * m + (1.0 - b1) * g
      v = b2 * v + (1.0 - b2) * g * g
      return m, v, -lr * (m / c1) / (jnp.sqrt(v / c2) + eps)

    def leaf(g, mu, nu):
      if not _is_rows(g):
        return step(mu, nu, g)
      m, v, u = step(mu.at[g.indices].get(mode="fill", fill_value=0),
                     nu.at[g.indices].get(mode="fill", fill_value=0), g.values)
      return (mu.at[g.indices].set(m, mode="drop"), nu.at[g.indices].set(v, mode="drop"),
              IndexedRows(g.indices, u))

    out = jax.tree.map(leaf, grads, state.mu, state.nu, is_leaf=_is_rows)
    pick = lambda i: jax.tree.map(lambda _, o: o[i], grads, out, is_leaf=_is_rows)  # noqa: E731
    return pick(2), LazyAdamState(count, pick(0), pick(1))

  return optax.GradientTransformation(init, update)


def apply_updates(params, updates):
  """`optax.apply_updates` that also adds `IndexedRows` updates to their rows."""

  def leaf(p, u):
    if _is_rows(u):
      return p.at[u.indices].add(u.values.astype(p.dtype), mode="drop")
    return (p + u).astype(p.dtype)

  return jax.tree.map(leaf, params, updates, is_leaf=_is_rows)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm that also takes `IndexedRows` leaves (of distinct rows)."""

  def update(grads, state, params=None):
    del params
    values = lambda g: g.values if _is_rows(g) else g  # noqa: E731
    norm = optax.tree.norm(jax.tree.map(values, grads, is_leaf=_is_rows))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))

    def leaf(g):
      if _is_rows(g):
        return IndexedRows(g.indices, (g.values * scale).astype(g.values.dtype))
      return (g * scale).astype(g.dtype)

    return jax.tree.map(leaf, grads, is_leaf=_is_rows), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def learning_rate_schedule(train_config: ConfigDict) -> float | optax.Schedule:
  """`train.learning_rate`, reached linearly over `train.warmup_steps` (0: constant)."""
  lr, warmup = train_config.learning_rate, train_config.warmup_steps
  if not warmup:
    return lr
  return lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)  # step k uses count = k - 1


OPTIMIZERS = ("adam", "lazy_adam")  # config.train.optimizer, read by `create_optimizer`


def create_optimizer(train_config: ConfigDict) -> optax.GradientTransformation:
  """Adam (§4.3), dense ("adam") or row-sparse ("lazy_adam"), with the optional warm-up and
  gradient clipping of the config; the L2 term is in the loss (`steps.l2_penalty`)."""
  adam = lazy_adam if train_config.optimizer == "lazy_adam" else optax.adam
  adam = adam(learning_rate_schedule(train_config), b1=train_config.adam_b1,
              b2=train_config.adam_b2, eps=train_config.adam_eps)
  clip = train_config.grad_clip_norm
  return optax.chain(clip_by_global_norm(clip), adam) if clip else adam
