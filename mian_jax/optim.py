"""Optimisers: optax Adam (§4.3), and a lazy Adam that updates only the embedding rows a batch
used (docs/performance.md, "Lazy Adam"), each table's gradient being those rows (`IndexedRows`).

`value_and_grad` deduplicates each field's ids (`localize_ids`), gathers those rows into small
"row tables" the model reads from the "sparse_rows" collection, and differentiates the loss with
respect to them: each row table's gradient is exactly the dense gradient's rows. A table
`.../<group>_embedding/embed_<field>/embedding` is indexed by `batch[<group>][<field>]` and, for
an item field, `batch["hist"][<field>]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from ml_collections import ConfigDict

from mian_jax.models.layers import SPARSE_ROWS


class IndexedRows(NamedTuple):
  """A row-sparse array: `values` [N, D] are rows `indices` [N] (int32, distinct; >= V marks an
  unused slot, dropped on scatter) of a [V, D] array."""
  indices: jax.Array
  values: jax.Array


def _is_rows(x) -> bool:
  return isinstance(x, IndexedRows)


def lazy_adam(learning_rate: float | optax.Schedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam that updates only the rows of `IndexedRows` gradient leaves (dense leaves: plain Adam),
  with optax.adam's state; its updates are of the same kinds, applied with `apply_updates`."""

  def init(params):
    zeros = optax.tree.zeros_like
    return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), zeros(params), zeros(params))

  def update(grads, state, params=None):
    del params
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_increment(state.count)
    c1, c2 = 1.0 - b1 ** count.astype(jnp.float32), 1.0 - b2 ** count.astype(jnp.float32)

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
    return pick(2), optax.ScaleByAdamState(count, pick(0), pick(1))

  return optax.GradientTransformation(init, update)


def apply_updates(params, updates):
  """`optax.apply_updates` that also adds `IndexedRows` updates to their rows."""

  def leaf(p, u):
    return (p.at[u.indices].add(u.values.astype(p.dtype), mode="drop") if _is_rows(u) else
            (p + u).astype(p.dtype))

  return jax.tree.map(leaf, params, updates, is_leaf=_is_rows)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm that also takes `IndexedRows` leaves (of distinct rows)."""

  def update(grads, state, params=None):
    del params
    values = lambda g: g.values if _is_rows(g) else g  # noqa: E731
    norm = optax.tree.norm(jax.tree.map(values, grads, is_leaf=_is_rows))
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))

    def leaf(g):
      return (IndexedRows(g.indices, (g.values * scale).astype(g.values.dtype)) if _is_rows(g)
              else (g * scale).astype(g.dtype))

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


class Table(NamedTuple):
  path: tuple[str, ...]  # key of the table in the flattened params, ends with "embedding"
  group: str  # "item" | "user" | "context"
  field: str


def find_tables(params) -> list[Table]:
  """Every embedding table of `params` that `InputEmbedding` looks batch ids up in."""
  return [Table(path, path[-3][:-len("_embedding")], path[-2][len("embed_"):])
          for path in traverse_util.flatten_dict(params)
          if len(path) >= 3 and path[-1] == "embedding" and path[-2].startswith("embed_")
          and path[-3] in ("item_embedding", "user_embedding", "context_embedding")]


def first_occurrence(ids: jax.Array, vocab_size: int) -> jax.Array:
  """[N] int32: for each position n of `ids` [N], the first m with ids[m] == ids[n]. A
  [vocab_size] scatter-min, not a sort, which cost more than DIN's step on CPU."""
  n = ids.shape[0]
  positions = jnp.arange(n, dtype=jnp.int32)
  return jnp.full((vocab_size,), n, jnp.int32).at[ids].min(positions, mode="drop")[ids]


def localize_ids(batch, fields: dict[tuple[str, str], int]):
  """The distinct ids of each of `fields` ({(group, field): V}), numbered in order of first
  occurrence among its N ids. Returns (the batch with each id replaced by its slot,
  {(group, field): the id of each slot [min(N, V)] int32, V at unused slots})."""
  new = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
  distinct = {}
  for (group, field), vocab_size in fields.items():
    keys = [(group, field)] + ([("hist", field)] if group == "item" and
                               field in batch.get("hist", {}) else [])
    arrays = [batch[g][f] for g, f in keys]
    flat = jnp.concatenate([a.reshape(-1) for a in arrays]).astype(jnp.int32)
    first = first_occurrence(flat, vocab_size)
    is_first = first == jnp.arange(flat.shape[0], dtype=jnp.int32)
    rank = jnp.cumsum(is_first, dtype=jnp.int32) - 1  # slot of each first occurrence
    slots = rank[first]
    size = min(flat.shape[0], vocab_size)  # static: at most this many distinct ids
    for (g, f), a, part in zip(keys, arrays, jnp.split(slots, [arrays[0].size])):
      new[g][f] = part.reshape(a.shape).astype(a.dtype)
    distinct[(group, field)] = jnp.full((size,), vocab_size, jnp.int32).at[
        jnp.where(is_first, rank, size)].set(flat, mode="drop")
  return new, distinct


def value_and_grad(loss_fn, params, batch):
  """`jax.value_and_grad(has_aux=True)` of `loss_fn(variables, batch)` with respect to
  `params`, each embedding table's gradient as `IndexedRows` of the rows `batch` looks up."""
  tables = find_tables(params)
  flat = traverse_util.flatten_dict(params)
  local_batch, distinct = localize_ids(
      batch, {(t.group, t.field): flat[t.path].shape[0] for t in tables})
  ids = {t.path: distinct[(t.group, t.field)] for t in tables}
  dense = {k: v for k, v in flat.items() if k not in ids}
  rows = {path: flat[path].at[i].get(mode="fill", fill_value=0) for path, i in ids.items()}

  def sparse_loss_fn(dense, rows):
    variables = {"params": traverse_util.unflatten_dict({**flat, **dense}),  # tables unread
                 SPARSE_ROWS: traverse_util.unflatten_dict({p[:-1]: r for p, r in rows.items()})}
    return loss_fn(variables, local_batch)

  out, (dense_grads, row_grads) = jax.value_and_grad(
      sparse_loss_fn, argnums=(0, 1), has_aux=True)(dense, rows)
  row_grads = {path: IndexedRows(ids[path], g) for path, g in row_grads.items()}
  return out, traverse_util.unflatten_dict({**dense_grads, **row_grads})
