"""`setup(config)`: the one place a config becomes data, a model, a fresh train state and the
jitted train and eval steps. The loss is eq. (18) plus the L2 term of §4.3 (docs/model.md)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state as train_state_lib
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mian_jax import data as data_lib
from mian_jax import models
from mian_jax import optim
from mian_jax import sharding
from mian_jax.data import pipeline
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError

TrainState = train_state_lib.TrainState
_NO_DECAY = ("bias", "scale", "score_bias")
L2_SCOPES = ("batch_embeddings", "all_weights", "none")  # config.train.l2_scope (`l2_penalty`)


def l2_penalty(params, embedding_sq_norm: jax.Array, weights: jax.Array, scope: str):
  """The L2 term of §4.3 without its coefficient (docs/model.md, "L2"): the mean squared norm of
  the embeddings each example looked up, or the sum of squares of all weights."""
  if scope == "batch_embeddings":
    return jnp.sum(embedding_sq_norm * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  if scope == "all_weights":
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(jnp.sum(x**2) for path, x in leaves if path[-1].key not in _NO_DECAY)
  return jnp.zeros((), jnp.float32)


def loss_and_grads(state: TrainState, batch, dropout_rng: jax.Array, *, l2_weight: float,
                   l2_scope: str, sparse_embeddings: bool = False):
  """((loss, bce, l2), grads) of eq. (18) plus L2 (and a model's aux loss); with
  `sparse_embeddings`, each table's gradient is `optim.IndexedRows`."""

  def loss_fn(variables, batch):
    logits, aux = state.apply_fn(variables, batch, train=True, rngs={"dropout": dropout_rng})
    losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), batch["label"])
    bce = jnp.sum(losses * batch["weight"]) / jnp.maximum(jnp.sum(batch["weight"]), 1.0)  # (18)
    l2 = l2_penalty(variables["params"], aux["embedding_sq_norm"], batch["weight"], l2_scope)
    # aux["aux_loss"]: a model's own extra loss, already weighted (DIEN's alpha * L_aux).
    return bce + l2_weight * l2 + aux.get("aux_loss", 0.0), (bce, l2)

  if sparse_embeddings:
    (loss, (bce, l2)), grads = optim.value_and_grad(loss_fn, state.params, batch)
  else:
    (loss, (bce, l2)), grads = jax.value_and_grad(
        lambda p: loss_fn({"params": p}, batch), has_aux=True)(state.params)
  return (loss, bce, l2), grads


def train_step(state: TrainState, batch, rng: jax.Array, *, l2_weight: float, l2_scope: str,
               sparse_embeddings: bool = False):
  """(new_state, {"loss", "bce", "l2"}) of a global batch (or its `PackedBatch`); dropout from
  fold_in(rng, step), so a resumed run draws the same masks."""
  batch = batch.unpack() if isinstance(batch, sharding.PackedBatch) else batch
  dropout_rng = jax.random.fold_in(rng, state.step)
  (loss, bce, l2), grads = loss_and_grads(state, batch, dropout_rng, l2_weight=l2_weight,
                                          l2_scope=l2_scope, sparse_embeddings=sparse_embeddings)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optim.apply_updates(state.params, updates),
                            opt_state=opt_state)
  return new_state, {"loss": loss, "bce": bce, "l2": l2}


def eval_step(state: TrainState, batch, *, with_attention: bool, chunk_rows: int = 0,
              data_shards: int = 1):
  """{"prob": [B]} (and "attention") for a batch (or its `PackedBatch`). With `chunk_rows` > 0,
  each device's rows are computed that many at a time when that divides them (`_in_chunks`)."""
  batch = batch.unpack() if isinstance(batch, sharding.PackedBatch) else batch
  rows = jax.tree.leaves(batch)[0].shape[0] // data_shards if chunk_rows else 0
  if 0 < chunk_rows < rows and rows % chunk_rows == 0:
    step = functools.partial(eval_step, state, with_attention=with_attention)
    return _in_chunks(step, batch, chunk_rows * data_shards)
  logits, aux = state.apply_fn({"params": state.params}, batch, train=False)
  out = {"prob": jax.nn.sigmoid(logits)}
  if with_attention:
    out["attention"] = aux["attention"]
  return out


def _in_chunks(fn, batch, chunk: int):
  """fn(batch) as a `lax.map` over chunks of `chunk` rows of a [B, ...] tree; chunk j holds rows
  j, j + B/chunk, ..., so each device gives rows to each chunk and no row leaves its device."""
  b = jax.tree.leaves(batch)[0].shape[0]
  split = lambda x: jnp.swapaxes(x.reshape(chunk, b // chunk, *x.shape[1:]), 0, 1)  # noqa: E731
  out = jax.lax.map(fn, jax.tree.map(split, batch))
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(b, *x.shape[2:]), out)


def create_train_state(model, tx, batch, rng: jax.Array, mesh,
                       row_sharded_fields: frozenset[str] = frozenset()) -> TrainState:
  """A state initialised from `rng` and a sample batch; `row_sharded_fields`' tables row-sharded."""

  def init(rng):
    params = model.init({"params": rng, "dropout": rng}, batch, train=False)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  abstract = jax.eval_shape(init, rng)
  tables = [t.path for t in optim.find_tables(abstract.params) if t.field in row_sharded_fields]
  return jax.jit(init, out_shardings=sharding.state_shardings(abstract, mesh, tables))(rng)


# XLA:CPU deadlocks once more than 32 runs of a program with collectives are in flight per
# device while its client thread pool has fewer than 2 threads per device, e.g. 2 CPU devices
# on 2 cores (docs/performance.md, "DIN hung with two CPU devices").
MAX_STEPS_IN_FLIGHT_ON_CPU = 8
# Rows of a device's batch an eval step computes at a time on CPUs: MIAN's attention then stays
# in cache (docs/training.md, "What a validation costs").
EVAL_CHUNK_ROWS_ON_CPU = 128
# What a bounded train step waits for: its metrics (its state is donated to the next call).
_METRICS = operator.itemgetter(1)


class BoundedStep:
  """A jitted step that keeps at most `limit` calls unfinished: a call first waits for the
  oldest one's `track(output)` (None: the whole output). Other attributes: `step`'s."""

  def __init__(self, step, limit: int, track=_METRICS):
    self.step, self.limit, self._pending = step, limit, collections.deque()
    self._track = track or (lambda out: out)

  def __call__(self, *args, **kwargs):
    while len(self._pending) >= self.limit:
      jax.block_until_ready(self._pending.popleft())
    out = self.step(*args, **kwargs)
    self._pending.append(self._track(out))
    return out

  def __getattr__(self, name):
    return getattr(self.step, name)


def bound_in_flight(step, mesh, limit: int | None = None, track=_METRICS):
  """`step` as a `BoundedStep` of `limit` (None: MAX_STEPS_IN_FLIGHT_ON_CPU on several local
  CPU devices, else 0: `step` itself)."""
  if limit is None:
    cpus = len(mesh.local_devices) > 1 and mesh.local_devices[0].platform == "cpu"
    limit = MAX_STEPS_IN_FLIGHT_ON_CPU if cpus else 0
  return BoundedStep(step, limit, track) if limit > 0 else step


def make_train_step(train_config: ConfigDict, mesh, state_sharding=None):
  """The jitted train step; `state_sharding`: the state's (None: replicated)."""
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state_sharding = replicated if state_sharding is None else state_sharding
  step = functools.partial(train_step, l2_weight=train_config.l2_weight,
                           l2_scope=train_config.l2_scope,
                           sparse_embeddings=train_config.optimizer == "lazy_adam")
  return bound_in_flight(jax.jit(step, in_shardings=(state_sharding, data, replicated),
                                 out_shardings=(state_sharding, replicated), donate_argnums=(0,)),
                         mesh)


def make_eval_step(mesh, with_attention: bool = False, state_sharding=None):
  """The jitted eval step, on CPUs in chunks of EVAL_CHUNK_ROWS_ON_CPU rows per device; bounded
  like the train step, since row-sharded lookups are collectives."""
  data = NamedSharding(mesh, P("data"))
  state_sharding = NamedSharding(mesh, P()) if state_sharding is None else state_sharding
  cpu = mesh.local_devices[0].platform == "cpu"
  step = functools.partial(eval_step, with_attention=with_attention,
                           chunk_rows=EVAL_CHUNK_ROWS_ON_CPU if cpu else 0,
                           data_shards=mesh.shape["data"])
  return bound_in_flight(jax.jit(step, in_shardings=(state_sharding, data), out_shardings=data),
                         mesh, track=None)


@dataclasses.dataclass(frozen=True)
class Run:
  """What `setup` builds: `data_checksum` is the data's verified SHA-256 ("" unless verified);
  `state` a fresh one from `train.seed`; `train_step` donates its state."""

  config: ConfigDict
  mesh: jax.sharding.Mesh
  data_dir: str
  schema: schema_lib.Schema
  data_checksum: str
  model: Any
  state: TrainState
  train_step: Callable
  eval_step: Callable
  splits: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict, repr=False)

  def split(self, name: str) -> dict[str, np.ndarray]:
    """A split's memory-mapped columns, checked against the schema once per run."""
    if name not in self.splits:
      self.splits[name] = schema_lib.load_split(self.data_dir, name, self.schema)
    return self.splits[name]

  def train_batches(self) -> pipeline.TrainBatches:
    """This process's training batches, in the order of `train.seed`."""
    return pipeline.TrainBatches(
        self.split("train"), self.schema,
        self.config.train.batch_size, seed=self.config.train.seed,
        process_index=jax.process_index(), process_count=jax.process_count())


def setup(config: ConfigDict, mesh: jax.sharding.Mesh | None = None,
          verify_data: bool = True) -> Run:
  """The `Run` of `config` on `mesh` (default: all devices), the data re-hashed if `verify_data`."""
  mesh = sharding.create_mesh(model=config.sharding.model) if mesh is None else mesh
  data_dir, schema = data_lib.ensure_prepared(config.data)
  checksum = schema_lib.verify_dataset_checksum(data_dir) if verify_data else ""
  sample_columns = schema_lib.load_split(data_dir, "valid", schema, validate=False)
  sample = pipeline.gather_batch(sample_columns, schema, np.zeros(jax.device_count(), np.int64))
  part = pipeline.local_slice(len(sample["label"]), jax.process_index(), jax.process_count())
  sample = sharding.to_global(jax.tree.map(lambda x: x[part], sample), mesh)
  return Run(config, mesh, data_dir, schema, checksum,
             *build(config, schema.features, sample, mesh))


def build(config: ConfigDict, features: schema_lib.FeatureSpec, sample, mesh):
  """(model, state, train_step, eval_step) of `config` for `features` on `mesh`, the state
  initialised from `sample` (a global batch), the tables `config.sharding` names row-sharded."""
  shard = config.sharding
  if shard.row_multiple % mesh.shape["model"]:
    raise ConfigError(f"sharding.model={mesh.shape['model']} must divide "
                      f"sharding.row_multiple={shard.row_multiple}")
  row_sharded = sharding.row_sharded_fields(features, shard)
  model = models.create_model(config.model,
                              sharding.pad_rows(features, row_sharded, shard.row_multiple))
  state = create_train_state(model, optim.create_optimizer(config.train), sample,
                             jax.random.PRNGKey(config.train.seed), mesh, row_sharded)
  state_sharding = sharding.shardings_of(state)
  return (model, state, make_train_step(config.train, mesh, state_sharding),
          make_eval_step(mesh, state_sharding=state_sharding))
