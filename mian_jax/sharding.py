"""Where arrays live: the ("data", "model") device mesh, the train state on it, and batches
placed on it (docs/training.md). The global batch is sharded along "data"; the state is
replicated but for the embedding tables `config.sharding` names, row-sharded along "model"."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from mian_jax.errors import ConfigError


def create_mesh(devices=None, model: int = 1) -> jax.sharding.Mesh:
  """A ("data", "model") mesh over `devices` (default: all): groups of `model` consecutive
  devices along "model". ConfigError unless `model` divides each process's devices."""
  devices = list(jax.devices() if devices is None else devices)
  if model < 1 or len(devices) % model:
    raise ConfigError(f"sharding.model={model} must be a positive divisor of the "
                      f"{len(devices)} devices")
  per_process = collections.Counter(d.process_index for d in devices)
  if any(count % model for count in per_process.values()):
    raise ConfigError(f"sharding.model={model} must divide each process's devices "
                      f"({dict(per_process)}): a model group may not span processes")
  return jax.sharding.Mesh(np.asarray(devices).reshape(len(devices) // model, model),
                           ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def row_sharded_fields(features, sharding_config) -> frozenset[str]:
  """The categorical fields whose tables are row-sharded: those of `row_shard_min_rows` ids or
  more (if > 0) and those `row_shard_fields` names (ConfigError unless categorical fields)."""
  categorical = {f.name: f.vocab_size for f in features.fields().values() if f.is_categorical}
  named = {x.strip() for x in sharding_config.row_shard_fields.split(",") if x.strip()}
  unknown = sorted(named - set(categorical))
  if unknown:
    raise ConfigError(f"sharding.row_shard_fields names {unknown}, which are not categorical "
                      f"fields of the data ({sorted(categorical)})")
  min_rows = sharding_config.row_shard_min_rows
  return frozenset(named | {n for n, v in categorical.items() if 0 < min_rows <= v})


def pad_rows(features, fields: frozenset[str], row_multiple: int):
  """`features` with the vocab sizes of `fields` rounded up to a multiple of `row_multiple`."""

  def pad(f):
    size = -(-f.vocab_size // row_multiple) * row_multiple
    return dataclasses.replace(f, vocab_size=size) if f.name in fields else f

  groups = ("item_fields", "user_fields", "context_fields")
  return dataclasses.replace(features, **{g: tuple(map(pad, getattr(features, g))) for g in groups})


def state_shardings(state, mesh: jax.sharding.Mesh, tables):
  """A NamedSharding for every leaf of `state` (or its `jax.eval_shape`): P("model", None) for a
  leaf that is, or mirrors (an optimiser moment), one of `tables` (path tuples), else P()."""
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
  """This process's part of a batch as global arrays sharded along "data" (one process: one
  `device_put` of the tree, about half the cost; docs/performance.md)."""
  sharding = NamedSharding(mesh, P("data"))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed"],
                   meta_fields=["layout", "treedef"])
@dataclasses.dataclass(frozen=True)
class PackedBatch:
  """A batch whose 4-byte leaves [B, ...] travel as one [B, K] int32 array: one host-to-device
  copy, not one per leaf (docs/performance.md). `layout` (static) holds each leaf's trailing
  shape and dtype; `unpack()` restores the batch inside a jitted step."""

  packed: jax.Array
  layout: tuple[tuple[tuple[int, ...], str], ...]
  treedef: Any

  def unpack(self):
    ends = np.cumsum([math.prod(shape) for shape, _ in self.layout])[:-1]
    columns = jnp.split(self.packed, ends, axis=1)
    return jax.tree.unflatten(self.treedef, [
        jax.lax.bitcast_convert_type(c, jnp.dtype(dtype)).reshape(c.shape[:1] + shape)
        for c, (shape, dtype) in zip(columns, self.layout)])


def pack_to_global(batch, mesh):
  """This process's part of a batch as a global `PackedBatch` (`to_global`'s if not all 4-byte)."""
  leaves, treedef = jax.tree.flatten(batch)
  if not leaves or not all(x.dtype.itemsize == 4 and x.ndim >= 1 for x in leaves):
    return to_global(batch, mesh)
  rows = leaves[0].shape[0]
  packed = np.concatenate([np.ascontiguousarray(x).reshape(rows, -1).view(np.int32)
                           for x in leaves], axis=1)
  # dtype.str, not dtype.name: numpy builds .name anew on every access (~2 µs a leaf).
  layout = tuple((tuple(x.shape[1:]), x.dtype.str) for x in leaves)
  return PackedBatch(to_global(packed, mesh), layout, treedef)


def process_zero_verdict(error: str, elsewhere: str) -> str:
  """Process 0's `error` ("": none) on every process, the others saying `elsewhere`: one
  verdict for all, or the processes would part ways."""
  if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(np.int32(bool(error))):
    return error or elsewhere
  return error


def to_host(tree):
  """Global (sharded) arrays -> NumPy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
