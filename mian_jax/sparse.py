"""Row-sparse embedding gradients: the gradient of each embedding table as the rows a batch
looked up (`optim.IndexedRows`), never as a dense [V, D] array.

For each categorical field the train step
1. collects the N ids the global batch looks up in it (candidate field, and the behaviour
   sequence for an item field) and numbers the distinct ones in order of first occurrence,
   without sorting; a field with vocabulary V gets min(N, V) slots, the unused ones marked with
   the out-of-range id V (`localize_ids`);
2. gathers those rows of every table the field indexes into small "row tables", and
   replaces each id in the batch by the slot of its first occurrence;
3. runs the model with the row tables in the "sparse_rows" collection, which
   `layers.GroupEmbedding` looks ids up in instead of its full tables, and differentiates with
   respect to the row tables, not the full ones.
The forward pass is unchanged (same rows, same order of operations on them), and the gradient
of a row table is exactly the dense gradient's rows at the distinct ids
(tests/test_optim.py, test_row_sparse_gradients_are_the_dense_gradients_rows).

Which ids index which table follows the layout of `layers.InputEmbedding`: a table at
`.../<group>_embedding/embed_<field>/embedding` is indexed by `batch[<group>][<field>]` and, for
an item field that is also a behaviour field, by `batch["hist"][<field>]`.
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
  tables = []
  for path in traverse_util.flatten_dict(params):
    if (len(path) >= 3 and path[-1] == "embedding" and path[-2].startswith("embed_")
        and path[-3] in tuple(f"{g}_embedding" for g in _GROUPS)):
      tables.append(Table(path, path[-3][:-len("_embedding")], path[-2][len("embed_"):]))
  return tables


def _id_arrays(batch, group: str, field: str) -> list[tuple[str, str]]:
  keys = [(group, field)]
  if group == "item" and field in batch.get("hist", {}):
    keys.append(("hist", field))
  return keys


def first_occurrence(ids: jax.Array, vocab_size: int) -> jax.Array:
  """For each position n of `ids` [N], the first position m with ids[m] == ids[n]; [N] int32.

  Uses a [vocab_size] scatter-min instead of a sort: on CPU, XLA's sort of the B·(T+1) ids of a
  batch cost more than the rest of DIN's step at batch 1024 (docs/performance.md). The
  scatter-min is deterministic on every backend.
  """
  n = ids.shape[0]
  positions = jnp.arange(n, dtype=jnp.int32)
  first = jnp.full((vocab_size,), n, jnp.int32).at[ids].min(positions, mode="drop")
  return first[ids]


def localize_ids(batch, fields: dict[tuple[str, str], int]):
  """The ids each field looks up, deduplicated, and the batch with ids replaced by slots.

  Every id array of a field is flattened into one list of N ids. The distinct ids get slots
  0, 1, ... in order of first occurrence; the row table has min(N, V) slots (static), and the
  slots past the number of distinct ids are unused.

  Args:
    batch: a model batch (see `pipeline.gather_batch`).
    fields: {(group, field): vocabulary size V} of the fields to localise.
  Returns:
    (batch with each id replaced by the slot of its first occurrence,
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
