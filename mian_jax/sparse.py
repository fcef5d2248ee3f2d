"""Row-sparse embedding gradients: each table's gradient as the rows a batch looked up
(`optim.IndexedRows`), never a dense [V, D] array (docs/performance.md, "Lazy Adam").

Per field, the batch's ids are deduplicated (`localize_ids`), those rows gathered into small
"row tables" that the model reads from the "sparse_rows" collection, and the loss differentiated
with respect to them: the forward pass is unchanged and each row table's gradient is exactly the
dense gradient's rows. A table `.../<group>_embedding/embed_<field>/embedding` is indexed by
`batch[<group>][<field>]` and, for an item field, by `batch["hist"][<field>]`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from mian_jax.models.layers import SPARSE_ROWS  # noqa: F401  (re-exported for the train step)
from mian_jax.optim import IndexedRows

_GROUPS = ("item", "user", "context")

Path = tuple[str, ...]


class Table(NamedTuple):
  path: Path  # key of the table in the flattened params, ends with "embedding"
  group: str  # "item" | "user" | "context"
  field: str


def find_tables(params) -> list[Table]:
  """Every embedding table of `params` that `InputEmbedding` looks batch ids up in."""
  return [Table(path, path[-3][:-len("_embedding")], path[-2][len("embed_"):])
          for path in traverse_util.flatten_dict(params)
          if len(path) >= 3 and path[-1] == "embedding" and path[-2].startswith("embed_")
          and path[-3] in tuple(f"{g}_embedding" for g in _GROUPS)]


def _id_arrays(batch, group: str, field: str) -> list[tuple[str, str]]:
  keys = [(group, field)]
  if group == "item" and field in batch.get("hist", {}):
    keys.append(("hist", field))
  return keys


def first_occurrence(ids: jax.Array, vocab_size: int) -> jax.Array:
  """[N] int32: for each position n of `ids` [N], the first m with ids[m] == ids[n]. A
  [vocab_size] scatter-min, not a sort, which cost more than DIN's step on CPU."""
  n = ids.shape[0]
  positions = jnp.arange(n, dtype=jnp.int32)
  first = jnp.full((vocab_size,), n, jnp.int32).at[ids].min(positions, mode="drop")
  return first[ids]


def localize_ids(batch, fields: dict[tuple[str, str], int]):
  """The distinct ids of each of `fields` ({(group, field): V}), numbered in order of first
  occurrence among its N ids.

  Returns:
    (the batch with each id replaced by its slot,
     {(group, field): the id of each slot [min(N, V)] int32, V at unused slots}).
  """
  new = {k: (dict(v) if isinstance(v, dict) else v) for k, v in batch.items()}
  distinct = {}
  for (group, field), vocab_size in fields.items():
    keys = _id_arrays(batch, group, field)
    arrays = [batch[g][f] for g, f in keys]
    flat = jnp.concatenate([a.reshape(-1) for a in arrays]).astype(jnp.int32)
    first = first_occurrence(flat, vocab_size)
    is_first = first == jnp.arange(flat.shape[0], dtype=jnp.int32)
    rank = jnp.cumsum(is_first, dtype=jnp.int32) - 1  # slot of each first occurrence
    slots = rank[first]
    size = min(flat.shape[0], vocab_size)  # static: at most this many distinct ids
    start = 0
    for (g, f), a in zip(keys, arrays):
      new[g][f] = slots[start:start + a.size].reshape(a.shape).astype(a.dtype)
      start += a.size
    distinct[(group, field)] = jnp.full((size,), vocab_size, jnp.int32).at[
        jnp.where(is_first, rank, size)].set(flat, mode="drop")
  return new, distinct


def split_params(params, tables: list[Table]):
  """(the params without the tables as a flat dict, the tables as a flat dict)."""
  flat = traverse_util.flatten_dict(params)
  paths = {t.path for t in tables}
  return ({k: v for k, v in flat.items() if k not in paths},
          {k: v for k, v in flat.items() if k in paths})


def gather_rows(table_params: dict[Path, jax.Array], tables: list[Table], distinct):
  """{table path: its rows at the field's slot ids [min(N, V), D]} (zeros at unused slots)."""
  return {t.path: table_params[t.path].at[distinct[(t.group, t.field)]].get(
      mode="fill", fill_value=0) for t in tables}


def rows_collection(rows: dict[Path, jax.Array]):
  """The "sparse_rows" variables: each row table stored under its `embed_<field>` module path."""
  return traverse_util.unflatten_dict({path[:-1]: r for path, r in rows.items()})


def merge_grads(dense_grads: dict[Path, jax.Array], row_grads: dict[Path, jax.Array],
                tables: list[Table], distinct):
  """The gradient tree of the full params: dense leaves, and `IndexedRows` for the tables."""
  flat = dict(dense_grads)
  for t in tables:
    flat[t.path] = IndexedRows(distinct[(t.group, t.field)], row_grads[t.path])
  return traverse_util.unflatten_dict(flat)


def table_fields(tables: list[Table], table_params) -> dict[tuple[str, str], int]:
  """{(group, field): vocabulary size} over `tables` (tables of one field share it)."""
  return {(t.group, t.field): table_params[t.path].shape[0] for t in tables}
