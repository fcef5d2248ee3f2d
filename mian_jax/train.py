"""Training and evaluation: create_train_state, train_step, eval_step, train_and_evaluate.

Data parallelism: `jax.jit` over a 1-D device mesh with axis "data". The global batch is sharded
along "data" (each device holds batch_size / num_devices rows); parameters and optimizer state are
replicated. XLA inserts the gradient all-reduce. This is the API the pinned JAX (0.10) recommends
(pmap is in maintenance mode), and it needs no hand-written collectives, which is where shard_map
ports go wrong (docs/training.md). In a multi-host run every process builds its part of the
global batch from its own shard of the data (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import parameter_overview
from flax import traverse_util
from flax.training import train_state as train_state_lib
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from mian_jax import checkpointing
from mian_jax import config_checks
from mian_jax import data as data_lib
from mian_jax import metrics as metrics_lib
from mian_jax import models
from mian_jax import optim
from mian_jax import sparse
from mian_jax import workdir as workdir_lib
from mian_jax import workdir_lock
from mian_jax import writers
from mian_jax.data import pipeline
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError, NonFiniteLossError, Preempted

TrainState = train_state_lib.TrainState
_NO_DECAY = ("bias", "scale", "score_bias")


# ----------------------------------------------------------------------------- setup


def create_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def create_optimizer(train_config: ConfigDict) -> optax.GradientTransformation:
  """Adam (§4.3), dense or lazy (`train.optimizer`); see `mian_jax/optim.py`."""
  return optim.create_optimizer(train_config)


def create_train_state(model, tx, batch, rng: jax.Array, mesh) -> TrainState:
  """Initialises parameters (replicated over the mesh) from `rng` and a sample batch."""
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(rng):
    params = model.init({"params": rng, "dropout": rng}, batch, train=False)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  return init(rng)


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


# ----------------------------------------------------------------------------- steps


def l2_penalty(params, embedding_sq_norm: jax.Array, weights: jax.Array, scope: str):
  """The L2 term of §4.3, coefficient applied by the caller (docs/model.md, "L2").

  "batch_embeddings": mean over examples of the squared norm of the embeddings each looked up.
  "all_weights":      sum of squares of every parameter except biases and LayerNorm scales.
  """
  if scope == "batch_embeddings":
    return jnp.sum(embedding_sq_norm * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  if scope == "all_weights":
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(jnp.sum(x**2) for path, x in leaves if path[-1].key not in _NO_DECAY)
  return jnp.zeros((), jnp.float32)


def weighted_bce(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  """Eq. (18), averaged over examples with weight > 0. float32 throughout."""
  losses = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), labels)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def loss_and_grads(state: TrainState, batch, dropout_rng: jax.Array, *, l2_weight: float,
                   l2_scope: str, sparse_embeddings: bool = False):
  """The training loss of eq. (18) plus L2 (and a model's own aux loss), and its gradient.

  With `sparse_embeddings` the gradient of each embedding table is `optim.IndexedRows` (the rows
  the batch looked up, `mian_jax/sparse.py`); loss and every other gradient are unchanged.
  Returns ((loss, bce, l2), grads with the structure of state.params).
  """

  def loss_fn(variables, batch):
    logits, aux = state.apply_fn(variables, batch, train=True, rngs={"dropout": dropout_rng})
    bce = weighted_bce(logits, batch["label"], batch["weight"])
    l2 = l2_penalty(variables["params"], aux["embedding_sq_norm"], batch["weight"], l2_scope)
    # aux["aux_loss"]: a model's own extra loss, already weighted (DIEN's alpha * L_aux).
    return bce + l2_weight * l2 + aux.get("aux_loss", 0.0), (bce, l2)

  if not sparse_embeddings:
    (loss, (bce, l2)), grads = jax.value_and_grad(
        lambda p: loss_fn({"params": p}, batch), has_aux=True)(state.params)
    return (loss, bce, l2), grads

  tables = sparse.find_tables(state.params)
  dense, table_params = sparse.split_params(state.params, tables)
  local_batch, distinct = sparse.localize_ids(batch, sparse.table_fields(tables, table_params))
  rows = sparse.gather_rows(table_params, tables, distinct)

  def sparse_loss_fn(dense, rows):
    params = traverse_util.unflatten_dict({**dense, **table_params})  # the tables go unread
    return loss_fn({"params": params, sparse.SPARSE_ROWS: sparse.rows_collection(rows)},
                   local_batch)

  (loss, (bce, l2)), (dense_grads, row_grads) = jax.value_and_grad(
      sparse_loss_fn, argnums=(0, 1), has_aux=True)(dense, rows)
  return (loss, bce, l2), sparse.merge_grads(dense_grads, row_grads, tables, distinct)


def train_step(state: TrainState, batch, rng: jax.Array, *, l2_weight: float, l2_scope: str,
               sparse_embeddings: bool = False):
  """One optimisation step on a global batch. Pure; jitted once by the caller.

  Dropout masks come from fold_in(rng, step), so a resumed run draws the same masks. With
  `sparse_embeddings`, `state.tx` must accept row-sparse gradients (`optim.lazy_adam`).
  `batch` is a nested batch or a `PackedBatch` of one.
  Returns (new_state, metrics) with scalar metrics "loss", "bce", "l2".
  """
  if isinstance(batch, PackedBatch):
    batch = batch.unpack()
  dropout_rng = jax.random.fold_in(rng, state.step)
  (loss, bce, l2), grads = loss_and_grads(state, batch, dropout_rng, l2_weight=l2_weight,
                                          l2_scope=l2_scope, sparse_embeddings=sparse_embeddings)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optim.apply_updates(state.params, updates),
                            opt_state=opt_state)
  return new_state, {"loss": loss, "bce": bce, "l2": l2}


def eval_step(state: TrainState, batch, *, with_attention: bool):
  """Click probabilities [B] (and attention weights) for a batch, deterministic."""
  logits, aux = state.apply_fn({"params": state.params}, batch, train=False)
  out = {"prob": jax.nn.sigmoid(logits)}
  if with_attention:
    out["attention"] = aux["attention"]
  return out


def make_train_step(train_config: ConfigDict, mesh):
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step = functools.partial(train_step, l2_weight=train_config.l2_weight,
                           l2_scope=train_config.l2_scope,
                           sparse_embeddings=train_config.get("optimizer", "adam") == "lazy_adam")
  return jax.jit(step, in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(mesh, with_attention: bool = False):
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(functools.partial(eval_step, with_attention=with_attention),
                 in_shardings=(replicated, data), out_shardings=data)


# ----------------------------------------------------------------------------- evaluation


def _to_host(tree):
  """Global (sharded) arrays -> NumPy on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def predict_split(state, data_dir: str, schema: schema_lib.Schema, split: str,
                  batch_size: int, mesh, with_attention: bool = False) -> dict[str, Any]:
  """Runs the model over a whole split; returns NumPy arrays in split order.

  Keys: "prob" [N], "label" [N], "group_id" [N], "extra.<name>" [N], and with
  `with_attention` "attention.<module>" [N, n] for each enabled attention module.
  """
  columns = schema_lib.load_split(data_dir, split, schema)
  step_fn = make_eval_step(mesh, with_attention)
  outputs, rows = [], []
  for batch, batch_rows in pipeline.eval_batches(columns, schema, split, batch_size,
                                                 jax.process_index(), jax.process_count()):
    outputs.append(step_fn(state, to_global(batch, mesh)))
    rows.append(batch_rows)
  if not outputs:
    raise DataError(f"split {split!r} of {data_dir} is empty")
  outputs = _to_host(outputs)
  rows = np.concatenate(_to_host([to_global(r, mesh) for r in rows]))
  keep = rows >= 0
  rows = rows[keep]
  flat = {"prob": np.concatenate([o["prob"] for o in outputs])[keep]}
  if with_attention:
    for name in outputs[0]["attention"]:
      flat[f"attention.{name}"] = np.concatenate([o["attention"][name] for o in outputs])[keep]
  order = np.argsort(rows, kind="stable")
  result = {k: v[order] for k, v in flat.items()}
  result["label"] = np.asarray(columns["label"])
  result["group_id"] = np.asarray(columns["group_id"])
  for name in schema.extra_columns:
    result[f"extra.{name}"] = np.asarray(columns[f"extra.{name}"])
  return result


def split_metrics(predictions: dict[str, Any]) -> dict[str, float | int]:
  """Exact metrics of a split's predictions; NonFiniteLossError if a score is not finite."""
  bad = int(np.sum(~np.isfinite(predictions["prob"])))
  if bad:
    raise NonFiniteLossError(f"the model predicts non-finite scores for {bad} of "
                             f"{predictions['prob'].size} examples: its parameters are broken")
  return metrics_lib.compute_metrics(predictions["label"], predictions["prob"],
                                     predictions["group_id"],
                                     click_prob=predictions.get("extra.click_prob"))


def write_text_atomic(path: str, text: str) -> None:
  """Writes a file on process 0 through a temporary file and a rename: readers never see half
  a file, and the other processes of a multi-process run write nothing."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, content: dict) -> None:
  """Writes strict JSON atomically (`write_text_atomic`). A non-finite number, which JSON
  cannot hold, is written as null with a warning naming it."""
  write_text_atomic(path, json.dumps(_finite_or_null(content, path), indent=2, sort_keys=True,
                                     allow_nan=False))


def _finite_or_null(value, path: str, key: str = ""):
  if isinstance(value, dict):
    return {k: _finite_or_null(v, path, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_null(v, path, key) for v in value]
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    logging.warning("%s: %s is %s, written as null", path, key, value)
    return None
  return value


# ----------------------------------------------------------------------------- loop


def load_model_and_state(config: ConfigDict, mesh):
  """Prepares/loads the data, builds the model and a fresh (replicated) train state."""
  data_dir, schema = data_lib.ensure_prepared(config.data)
  model = models.create_model(config.model, schema.features)
  sample_columns = schema_lib.load_split(data_dir, "valid", schema, validate=False)
  sample = pipeline.gather_batch(sample_columns, schema, np.zeros(jax.device_count(), np.int64))
  state = create_train_state(model, create_optimizer(config.train),
                             to_global(_local_part(sample), mesh),
                             jax.random.PRNGKey(config.train.seed), mesh)
  return data_dir, schema, model, state


def _local_part(batch):
  """This process's rows of a batch built identically on every process."""
  part = pipeline.local_slice(len(batch["label"]), jax.process_index(), jax.process_count())
  return jax.tree.map(lambda x: x[part], batch)


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  return time.strftime("%H:%M:%S", time.gmtime(max(seconds, 0)))


def check_loss(step: int, history: list[dict[str, float]], last_saved: int | None,
               max_bce: float) -> None:
  """Raises NonFiniteLossError if a logged loss is non-finite or its cross-entropy exceeds
  `max_bce` (a diverged run: its logits are huge, so every later prediction saturates)."""
  for m in history:
    finite = all(math.isfinite(v) for v in m.values())
    if finite and m["bce"] <= max_bce:
      continue
    where = (f"the last good checkpoint is step {last_saved}" if last_saved is not None
             else "no checkpoint was written")
    what = (f"non-finite loss {m}" if not finite else
            f"cross-entropy {m['bce']:.4g} above train.max_bce={max_bce:g} (diverged)")
    raise NonFiniteLossError(
        f"{what} by step {step}; training stopped and {where} "
        "(lower train.learning_rate or check the data for extreme values)")


def improves(auc: float, best: float | None) -> bool:
  """Whether a validation AUC beats the best so far (strictly: a tie keeps the earlier step;
  an undefined AUC, NaN, never does)."""
  return math.isfinite(auc) and (best is None or auc > best)


def stopped_early(meta: dict[str, Any], patience: int) -> bool:
  """Whether `patience` validations in a row brought no better AUC (patience 0: never)."""
  return patience > 0 and meta.get("evals_since_best", 0) >= patience


class StopSignals:
  """Turns SIGTERM and SIGINT into a request to stop after the current step.

  Schedulers and preemptible machines send SIGTERM before they kill; the loop then saves a
  checkpoint at the step it reached and raises `Preempted`. A second signal gets the previous
  handler (a second Ctrl-C interrupts at once). In a multi-process run the processes agree
  every `sync_every` steps (a tiny all-gather), so all save the same step.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, sync_every: int):
    self.sync_every = sync_every
    self.signum = 0
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    logging.warning("Received %s: saving a checkpoint after this step, then stopping",
                    signal.Signals(signum).name)

  def requested(self, step: int) -> int:
    """The signal number to stop for (0: none), the same on every process."""
    if jax.process_count() == 1:
      return self.signum
    if step % self.sync_every:
      return 0
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))


def run_header(config: ConfigDict, workdir: str, data_dir: str, schema, state, start_step: int,
               total_steps: int, steps_per_epoch: int) -> str:
  """The few lines a run logs before its first progress line (the full config is in
  `<workdir>/config.json`, the parameter table in `<workdir>/parameters.txt`)."""
  num_params = int(parameter_overview.count_parameters(state.params))
  examples = ", ".join(f"{s} {n:,}" for s, n in schema.num_examples)
  if start_step >= total_steps > 0 and start_step:
    steps = (f"already at step {start_step:,}, at or past the budget of {total_steps:,} steps: "
             "nothing to train, evaluating")
  else:
    epochs = total_steps / steps_per_epoch
    steps = (f"steps {start_step:,} -> {total_steps:,} ({epochs:.3g} "
             f"epoch{'' if epochs == 1 else 's'} of {steps_per_epoch:,})")
  return "\n".join([
      f"Run in {workdir} ({'resumed' if start_step else 'new'}); config: "
      f"{workdir_lib.config_path(workdir)}",
      f"  model {config.model.name}: {num_params:,} parameters (table: "
      f"{os.path.join(workdir, 'parameters.txt')})",
      f"  data {config.data.source}: {data_dir} ({examples} examples)",
      f"  train {steps}; global batch {config.train.batch_size} on {jax.device_count()} "
      f"device(s); validation every {config.train.eval_every_steps}, checkpoint every "
      f"{config.checkpoint.every_steps} steps",
  ])


def closing_line(workdir: str, results: dict[str, dict[str, Any]]) -> str:
  test = results["test"]
  return (f"Done: test AUC {test['auc']:.4f} at step {test['step']} ({test['selected']}). "
          f"Metrics: {os.path.join(workdir, 'eval')}; checkpoints: "
          f"{checkpointing.checkpoint_dir(workdir)} (best: "
          f"{checkpointing.best_checkpoint_dir(workdir)}); TensorBoard: "
          f"{os.path.join(workdir, 'metrics')}; predictions: python -m mian_jax.evaluate "
          f"--workdir={workdir} --step=best --predictions")


def total_train_steps(train_config: ConfigDict, steps_per_epoch: int) -> int:
  """The step budget: `train.num_train_steps`, or `train.num_epochs` of the training split.
  Raises ConfigError if that is no step at all."""
  if train_config.num_train_steps > 0:
    return train_config.num_train_steps
  total = int(train_config.num_epochs * steps_per_epoch)
  if total < 1:
    raise ConfigError(f"config.train.num_epochs={train_config.num_epochs:g} of "
                      f"{steps_per_epoch} steps per epoch is 0 steps; train at least one step")
  return total


def train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  """Trains (resuming from `workdir` if it holds checkpoints), evaluates, returns final metrics.

  Validation runs every `train.eval_every_steps` and at the last step; each better AUC is saved
  to `<workdir>/checkpoints_best`. With `train.early_stopping_patience` > 0, training stops
  after that many validations without a better AUC. The reported parameters are those of the
  best validation step (`eval.report_step="best"`) or of the last step ("last"). SIGTERM or
  SIGINT saves a checkpoint at the step reached and raises `Preempted`; a rerun resumes there.

  Returns:
    {"valid": metrics, "test": metrics} of the reported parameters; each also carries
    "step", "selected", "best_step", "best_valid_auc" and "last_step".
  """
  config_checks.check_config(config, jax.device_count())
  workdir = os.path.abspath(workdir)
  workdir_lib.check_workdir_path(workdir)
  # The lock covers the checkpoint managers too: a second run's manager would delete the
  # first one's save in flight as a leftover temporary directory.
  with workdir_lock.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ConfigDict, workdir: str) -> dict[str, dict[str, Any]]:
  workdir_lib.check_rerun(workdir, config.to_dict())
  mesh = create_mesh()
  data_dir, schema, model, state = load_model_and_state(config, mesh)
  data_checksum = schema_lib.verify_dataset_checksum(data_dir)
  for split in ("valid", "test"):  # a corrupt evaluation split fails now, not after training
    schema_lib.load_split(data_dir, split, schema)
  batches = pipeline.TrainBatches(
      schema_lib.load_split(data_dir, "train", schema), schema, config.train.batch_size,
      seed=config.train.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  total_steps = total_train_steps(config.train, batches.steps_per_epoch)

  manager = checkpointing.create_manager(workdir, config.checkpoint)
  best_manager = checkpointing.create_best_manager(workdir)
  restored = checkpointing.restore(manager, state, workdir=workdir)
  meta = {"best_valid_auc": None, "best_step": None, "evals_since_best": 0}
  if restored is not None:
    state, restored_meta = restored
    meta.update(restored_meta)
    if meta.get("schema_fingerprint") != schema.fingerprint():
      raise DataError(f"the checkpoints in {workdir} were trained on data with another schema "
                      "(fingerprint differs); use a new --workdir")
    if meta.get("data_checksum", data_checksum) != data_checksum:
      raise DataError(f"the checkpoints in {workdir} were trained on other data ({data_dir} "
                      f"has checksum {data_checksum[:12]}, the run recorded "
                      f"{meta['data_checksum'][:12]}); use a new --workdir")
  meta.update(checkpointing.reconcile_best(best_manager, state, meta))
  start_step = int(state.step)
  patience = config.train.early_stopping_patience
  if stopped_early(meta, patience):
    logging.info("Stopped early at step %d (best validation AUC %s at step %s); not training "
                  "further", start_step, meta["best_valid_auc"], meta["best_step"])
    total_steps = min(total_steps, start_step)

  writer = writers.MetricWriter(os.path.join(workdir, "metrics"), resume_step=start_step)
  if start_step == 0:
    writer.write_hparams(config.to_dict())
  write_text_atomic(os.path.join(workdir, "parameters.txt"),
                    parameter_overview.get_parameter_overview(state.params) + "\n")
  write_json_atomic(workdir_lib.config_path(workdir), config.to_dict())
  logging.info("%s", run_header(config, workdir, data_dir, schema, state, start_step,
                                total_steps, batches.steps_per_epoch))

  step_fn = make_train_step(config.train, mesh)
  rng = jax.random.PRNGKey(config.train.seed + 1)
  last_saved = start_step if restored is not None else None
  pending: list[dict[str, jax.Array]] = []
  t_window, steps_window = time.perf_counter(), 0
  max_bce = config.train.max_bce

  def progress(step):
    return dict(step=step, epoch=step // batches.steps_per_epoch,
                examples_seen=step * config.train.batch_size,
                schema_fingerprint=schema.fingerprint(), data_checksum=data_checksum)

  def save_checkpoint(step):
    nonlocal last_saved
    check_loss(step, jax.device_get(pending), last_saved, max_bce)
    meta.update(progress(step))
    # The best checkpoint lands first, so no saved meta names a best step that is not on disk.
    checkpointing.finalize(best_manager)
    checkpointing.save(manager, state, meta)
    last_saved = step

  def validate(step):
    check_loss(step, jax.device_get(pending), last_saved, max_bce)  # never save a bad best
    valid = evaluate_split(state, data_dir, schema, "valid", config, mesh, writer, step)
    if improves(valid["auc"], meta["best_valid_auc"]):
      meta.update(best_valid_auc=valid["auc"], best_step=step, evals_since_best=0)
      checkpointing.save(best_manager, state, {**meta, **progress(step)})
    else:
      meta["evals_since_best"] += 1
    return valid

  last_valid = None
  try:
    with StopSignals(sync_every=config.train.log_every_steps) as signals:
      device_batches = batches.iterate(start_step, total_steps,
                                       transform=lambda batch: pack_to_global(batch, mesh))
      for step, batch in zip(range(start_step + 1, total_steps + 1), device_batches):
        state, step_metrics = step_fn(state, batch, rng)
        pending.append(step_metrics)
        steps_window += 1
        if step % config.train.log_every_steps == 0 or step == total_steps:
          history = jax.device_get(pending)
          check_loss(step, history, last_saved, max_bce)
          _log_progress(writer, step, total_steps, history,
                        steps_window / max(time.perf_counter() - t_window, 1e-9),
                        config.train.batch_size)
          pending, t_window, steps_window = [], time.perf_counter(), 0
        if step % config.train.eval_every_steps == 0 or step == total_steps:
          last_valid = validate(step)
          t_window = time.perf_counter()  # evaluation time is not training throughput
        stop = stopped_early(meta, patience)
        signum = signals.requested(step)
        if (step % config.checkpoint.every_steps == 0 or step == total_steps or stop or
            signum):
          save_checkpoint(step)
        if signum:
          manager.wait_until_finished()
          raise Preempted(signum, step, workdir)
        if stop:
          logging.info("Early stopping at step %d: no better validation AUC in %d evaluations "
                       "(best %s at step %s)", step, patience, meta["best_valid_auc"],
                       meta["best_step"])
          break

    final_step = int(state.step)
    if meta["best_step"] is None and (last_valid is None or last_valid["step"] != final_step):
      last_valid = validate(final_step)  # a workdir whose best step is unknown
    report_state, selection = select_reported_state(state, meta, config.eval.report_step,
                                                    best_manager)
    step = int(report_state.step)
    results = {}
    for split in ("valid", "test"):
      if split == "valid" and last_valid is not None and last_valid["step"] == step:
        result = last_valid
      else:  # valid scalars of this step were written when it was validated
        result = evaluate_split(report_state, data_dir, schema, split, config, mesh,
                                writer if split == "test" else None, step)
      results[split] = {**result, **selection}
      write_metrics(workdir, split, results[split], final=True)
    logging.info("%s", closing_line(workdir, results))
    return results
  finally:  # an async save in flight must land, also when training stops on an error
    for m in (manager, best_manager):
      checkpointing.close(m)  # also writes the checksums of its last saves
    writer.close()


def select_reported_state(state, meta: dict[str, Any], report_step: str, best_manager):
  """The parameters to report: `state` (the last step) or, with `report_step="best"`, those of
  the best validation step (restored from `best_manager` unless that is the last step).

  Returns (state, selection) where selection is {"selected", "best_step", "best_valid_auc",
  "last_step"}, written beside the metrics.
  """
  last_step = int(state.step)
  selected = report_step
  if selected == "best" and meta["best_step"] is None:
    logging.warning("No validation AUC was ever defined; reporting the last step")
    selected = "last"
  if selected == "best" and meta["best_step"] != last_step:
    best_manager.wait_until_finished()
    state, _ = checkpointing.restore(best_manager, state, step=meta["best_step"])
  logging.info("Reporting step %d (%s; best validation AUC %s at step %s)", int(state.step),
               selected, meta["best_valid_auc"], meta["best_step"])
  return state, {"selected": selected, "best_step": meta["best_step"],
                 "best_valid_auc": meta["best_valid_auc"], "last_step": last_step}


def write_metrics(workdir: str, split: str, result: dict[str, Any], final: bool) -> None:
  """Writes `eval/<split>_metrics_step<N>.json` and, if `final`, `eval/<split>_metrics.json`
  (the run's reported result)."""
  eval_dir = os.path.join(workdir, "eval")
  write_json_atomic(os.path.join(eval_dir, f"{split}_metrics_step{result['step']}.json"), result)
  if final:
    write_json_atomic(os.path.join(eval_dir, f"{split}_metrics.json"), result)


def evaluate_split(state, data_dir, schema, split, config, mesh, writer, step):
  """Exact metrics of `state` on a whole split, logged (and written to `writer` unless it is
  None); returns them with "step"."""
  result = split_metrics(predict_split(state, data_dir, schema, split, config.eval.batch_size,
                                       mesh))
  result["step"] = step
  if writer is not None:
    writer.write_scalars(step, {f"{split}/{k}": v for k, v in result.items()
                                if isinstance(v, (int, float)) and k != "step"})
  text = ", ".join(f"{k}={result[k]:.4f}" for k in ("auc", "gauc", "logloss", "oracle_auc")
                   if k in result)
  logging.info("%s @ step %d: %s (%d examples)", split, step, text, result["num_examples"])
  return result


def _log_progress(writer, step, total_steps, history, steps_per_second, batch_size):
  summary = {k: float(np.mean([m[k] for m in history])) for k in history[0]}
  summary["samples_per_second"] = steps_per_second * batch_size
  writer.write_scalars(step, {f"train/{k}": v for k, v in summary.items()})
  logging.info("step %d/%d | loss %.4f | %.0f samples/s | ETA %s", step, total_steps,
               summary["loss"], summary["samples_per_second"],
               _format_eta((total_steps - step) / steps_per_second))
