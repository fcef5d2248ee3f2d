"""Where arrays live: the device mesh, the parameters on it, and batches placed on it.

One `jax.jit` over a 2-D device mesh with axes ("data", "model") (docs/training.md): the global
batch is sharded along "data" (each data shard holds batch_size / mesh.shape["data"] rows, the
same rows on every device of its "model" group). Parameters and optimizer state are replicated,
except the embedding tables of the fields `config.sharding` names, which are row-sharded along
"model" (each device holds 1 / mesh.shape["model"] of their rows, and of their Adam moments).
XLA inserts the collectives: the all-reduce of the gradients over "data", and for a row-sharded
table a local gather of the rows a device holds followed by an all-reduce of the looked-up
vectors over "model" (tests/test_sharded_tables.py reads them in the compiled step). With
sharding.model = 1 this is plain data parallelism.

In a multi-process run every process builds its part of the global batch from its own shard of
the data (`jax.make_array_from_process_local_data`) and gathers results with `to_host`; a
"model" group never spans two processes (`create_mesh`).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mian_jax.data import pipeline
from mian_jax.errors import ConfigError


MESH_AXES = ("data", "model")


def create_mesh(devices=None, model: int = 1) -> jax.sharding.Mesh:
  """A 2-D mesh ("data", "model") over `devices` (default: every device of every process):
  groups of `model` consecutive devices form the "model" axis, the groups the "data" axis.

  Raises:
    ConfigError: `model` does not divide the number of devices, or (several processes) the
      devices of one process, so that a "model" group would span two processes.
  """
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ConfigError(f"sharding.model={model} must be a positive divisor of the "
                      f"{len(devices)} devices")
  per_process = collections.Counter(d.process_index for d in devices)
  if any(count % model for count in per_process.values()):
    raise ConfigError(f"sharding.model={model} must divide each process's devices "
                      f"({dict(per_process)}): a model group may not span processes")
  return jax.sharding.Mesh(np.asarray(devices).reshape(len(devices) // model, model), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)


def row_sharded_fields(features, sharding_config) -> frozenset[str]:
  """Names of the categorical fields whose embedding tables are row-sharded over "model":
  those with at least `row_shard_min_rows` ids (when > 0) and those in `row_shard_fields`.

  Raises:
    ConfigError: `row_shard_fields` names a field the data does not have, or is not
      categorical.
  """
  fields = {f.name: f for group in (features.item_fields, features.user_fields,
                                    features.context_fields) for f in group}
  named = {x.strip() for x in sharding_config.row_shard_fields.split(",") if x.strip()}
  categorical = sorted(n for n, f in fields.items() if f.is_categorical)
  unknown = sorted(named - set(categorical))
  if unknown:
    raise ConfigError(f"sharding.row_shard_fields names {unknown}, which are not categorical "
                      f"fields of the data ({categorical})")
  by_size = {n for n, f in fields.items() if f.is_categorical and
             sharding_config.row_shard_min_rows > 0 and
             f.vocab_size >= sharding_config.row_shard_min_rows}
  return frozenset(named | by_size)


def pad_rows(features, fields: frozenset[str], row_multiple: int):
  """`features` with the vocab_size of `fields` rounded up to a multiple of `row_multiple`, so
  that their tables split evenly over any "model" axis size that divides it."""
  if row_multiple < 1:
    raise ConfigError(f"sharding.row_multiple={row_multiple} must be at least 1")

  def pad(group):
    return tuple(dataclasses.replace(f, vocab_size=-(-f.vocab_size // row_multiple) * row_multiple)
                 if f.name in fields else f for f in group)

  return dataclasses.replace(features, item_fields=pad(features.item_fields),
                             user_fields=pad(features.user_fields),
                             context_fields=pad(features.context_fields))


def state_shardings(state, mesh: jax.sharding.Mesh, tables):
  """A NamedSharding for every leaf of `state` (a TrainState, or its `jax.eval_shape`):
  P("model", None) for a leaf that is, or mirrors (an optimiser moment), one of `tables`
  (flattened parameter paths, e.g. ("embedding", "item_embedding", "embed_item_id",
  "embedding")), P() for the rest."""
  tables = [tuple(t) for t in tables]
  rows, replicated = NamedSharding(mesh, P("model", None)), NamedSharding(mesh, P())

  def leaf(path, x):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    sharded = len(x.shape) == 2 and any(keys[-len(t):] == t for t in tables)
    return rows if sharded else replicated

  return jax.tree_util.tree_map_with_path(leaf, state)


def shardings_of(tree):
  """The sharding of every array leaf of `tree`."""
  return jax.tree.map(lambda x: x.sharding, tree)


def to_global(batch, mesh):
  """Assembles this process's part of a batch into global arrays sharded along "data".

  With one process the batch is the global batch, and one `jax.device_put` of the whole tree
  costs about half of a `make_array_from_process_local_data` per leaf (CPU, batch 128:
  ~340 µs against ~610 µs; docs/performance.md).
  """
  sharding = NamedSharding(mesh, P("data"))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


@jax.tree_util.register_pytree_node_class
class PackedBatch:
  """A batch whose leaves travel as one [B, K] int32 array (`pack_to_global`).

  Every leaf [B, ...] of 4-byte values is viewed as int32 columns; `layout` (static) records each
  leaf's trailing shape and dtype. `unpack()` restores the nested batch inside a jitted step, so
  the split costs no extra dispatch. One host-to-device copy instead of one per leaf: on CPU a
  batch of 128 goes to the device in ~60 µs instead of ~340 µs (docs/performance.md).
  """

  def __init__(self, packed, layout, treedef):
    self.packed, self.layout, self.treedef = packed, layout, treedef

  def tree_flatten(self):
    return (self.packed,), (self.layout, self.treedef)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(children[0], *aux)

  def unpack(self):
    leaves, start = [], 0
    for shape, dtype in self.layout:
      width = math.prod(shape)
      column = self.packed[:, start:start + width]
      leaves.append(jax.lax.bitcast_convert_type(column, jnp.dtype(dtype)).reshape(
          (self.packed.shape[0],) + shape))
      start += width
    return jax.tree.unflatten(self.treedef, leaves)


def pack_to_global(batch, mesh):
  """This process's part of a batch as a global `PackedBatch` sharded along "data" (or, if a
  leaf is not 4 bytes wide, as `to_global` returns it)."""
  leaves, treedef = jax.tree.flatten(batch)
  if not leaves or not all(x.dtype.itemsize == 4 and x.ndim >= 1 for x in leaves):
    return to_global(batch, mesh)
  rows = leaves[0].shape[0]
  packed = np.concatenate([np.ascontiguousarray(x).reshape(rows, -1).view(np.int32)
                           for x in leaves], axis=1)
  # dtype.str, not dtype.name: numpy builds .name anew on every access (~2 µs a leaf).
  layout = tuple((tuple(x.shape[1:]), x.dtype.str) for x in leaves)
  sharding = NamedSharding(mesh, P("data"))
  if jax.process_count() == 1:
    return PackedBatch(jax.device_put(packed, sharding), layout, treedef)
  return PackedBatch(jax.make_array_from_process_local_data(sharding, packed), layout, treedef)


def local_part(batch):
  """This process's rows of a batch built identically on every process."""
  part = pipeline.local_slice(len(batch["label"]), jax.process_index(), jax.process_count())
  return jax.tree.map(lambda x: x[part], batch)


def to_host(tree):
  """Global (sharded) arrays -> NumPy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
