"""Evaluation: predictions and exact metrics of a split, and the evaluation of a saved checkpoint.

As a library: `predict_split`, `split_metrics`, `evaluate_split`, `write_metrics`,
`write_predictions` (training validates and reports with them) and `evaluate_checkpoint`.
As a command:

  python -m mian_jax.evaluate --workdir=runs/synthetic [--step=latest|best|N] \
      [--split=valid|test] [--predictions] [--config=configs/synthetic.py] [--config.k=v ...]

The config is the workdir's recorded one (config.json) unless --config is given; either way
it must agree with the recorded config on every key that shapes the run
(`mian_jax.workdir.check_rerun`); `eval.batch_size` may differ.

`--step=best` restores `<workdir>/checkpoints_best` (the step of the best validation AUC),
`latest` (the default) the newest checkpoint, N that step. Writes
`<workdir>/eval/<split>_metrics_step<N>.json` (auc, logloss, gauc, step, num_examples, and
oracle_auc where the data knows the click probability), so the `<split>_metrics.json` that
training reported is never overwritten; with --predictions also
`<workdir>/eval/<split>_predictions_step<N>.parquet`: one row per example, in split order, with
its keys (`row`, its 0-based position in the split; the item id, and the user id where a user
field is named user_id, as ids `item.<name>` and, where the prepared data keeps vocabularies, as
raw values `<name>`), score, label, group id and the model's attention weights (one list column
per attention module). Prepared splits keep no timestamps; `row` joins to them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags, logging
from ml_collections import config_flags

from mian_jax import checkpointing, cli, config_checks, fileio, sharding, steps, writers
from mian_jax import metrics as metrics_lib
from mian_jax import workdir as workdir_lib
from mian_jax.data import pipeline, vocab
from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError, NonFiniteLossError


def predict_split(state, eval_step, data_dir: str, schema: schema_lib.Schema, split: str,
                  batch_size: int, mesh, with_attention: bool = False,
                  rows: np.ndarray | None = None) -> dict[str, Any]:
  """Runs the model over a whole split, or its `rows` only; returns NumPy arrays in split
  order (of those rows).

  `eval_step` is `steps.make_eval_step(mesh, with_attention)` (a `Run`'s `eval_step` has no
  attention). Keys: "prob" [N], "label" [N], "group_id" [N], "extra.<name>" [N], and with
  `with_attention` "attention.<module>" [N, n] for each enabled attention module.
  """
  columns = schema_lib.load_split(data_dir, split, schema)
  if rows is not None:  # the subset in memory, seen by the batching as a split of its own
    columns = {name: np.asarray(column[rows]) for name, column in columns.items()}
    sizes = dict(schema.num_examples, **{split: len(rows)})
    schema = dataclasses.replace(schema, num_examples=tuple(sizes.items()))
  outputs, positions = [], []
  for batch, batch_rows in pipeline.eval_batches(columns, schema, split, batch_size,
                                                 jax.process_index(), jax.process_count()):
    # One host-to-device copy per batch (`sharding.PackedBatch`), not one per column.
    outputs.append(eval_step(state, sharding.pack_to_global(batch, mesh)))
    positions.append(batch_rows)
  if not outputs:
    raise DataError(f"split {split!r} of {data_dir} is empty")
  outputs = sharding.to_host(outputs)
  if jax.process_count() > 1:  # every process needs every process's row positions
    positions = sharding.to_host([sharding.to_global(r, mesh) for r in positions])
  rows = np.concatenate(positions)
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


def evaluate_split(run: steps.Run, state, split: str, step: int, writer=None,
                   rows: np.ndarray | None = None) -> dict[str, Any]:
  """Exact metrics of `state` on a whole split, or on its `rows` only (a subsample, named
  "<split>_subsample"), logged (and written to `writer` unless it is None); returns them with
  "step" and, for a subsample, "subsample": True."""
  result = split_metrics(predict_split(state, run.eval_step, run.data_dir, run.schema, split,
                                       run.config.eval.batch_size, run.mesh, rows=rows))
  result["step"] = step
  name = split if rows is None else f"{split}_subsample"
  if rows is not None:
    result["subsample"] = True
  if writer is not None:
    writer.write_scalars(step, scalars(name, result))
  text = ", ".join(f"{k}={result[k]:.4f}" for k in ("auc", "gauc", "logloss", "oracle_auc")
                   if k in result)
  logging.info("%s @ step %d: %s (%d examples)", name, step, text, result["num_examples"])
  return result


def scalars(name: str, result: dict[str, Any]) -> dict[str, float]:
  """The numbers of a split's result as "<name>/<metric>" scalars for a `MetricWriter`."""
  return {f"{name}/{k}": v for k, v in result.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


# The stream of `valid_subsample`'s draws, apart from every other use of train.seed.
_SUBSAMPLE_STREAM = 0x5ab5


def valid_subsample(group_id: np.ndarray, num_examples: int, seed: int) -> np.ndarray | None:
  """The rows, in split order, of whole groups (users: gAUC's groups) drawn in a random order
  from `seed` until they hold at least `num_examples` rows; None (the whole split) for
  `num_examples` 0 or at least the split's size.

  A pure function of its arguments, so a resumed run validates on the same rows.
  """
  if num_examples <= 0 or num_examples >= len(group_id):
    return None
  _, group_of_row, sizes = np.unique(group_id, return_inverse=True, return_counts=True)
  order = np.random.default_rng([seed, _SUBSAMPLE_STREAM]).permutation(len(sizes))
  enough = int(np.searchsorted(np.cumsum(sizes[order]), num_examples)) + 1
  chosen = np.zeros(len(sizes), bool)
  chosen[order[:enough]] = True
  return np.flatnonzero(chosen[group_of_row.ravel()])


def write_metrics(workdir: str, split: str, result: dict[str, Any], final: bool) -> None:
  """Writes `eval/<split>_metrics_step<N>.json` and, if `final`, `eval/<split>_metrics.json`
  (the run's reported result)."""
  eval_dir = os.path.join(workdir, "eval")
  writers.write_json_atomic(
      os.path.join(eval_dir, f"{split}_metrics_step{result['step']}.json"), result)
  if final:
    writers.write_json_atomic(os.path.join(eval_dir, f"{split}_metrics.json"), result)


def prediction_keys(data_dir: str, schema: schema_lib.Schema, split: str) -> dict[str, Any]:
  """What joins a split's predictions back to the data, in split order: `row` (0-based within
  the split) and, for the item id (the first item field) and a user field named user_id, the
  ids (`item.<name>`) and, where the prepared data keeps the field's vocabulary, the raw
  values (`<name>`; None for the out-of-vocabulary id). Hashed fields keep only their ids."""
  columns = schema_lib.load_split(data_dir, split, schema, validate=False)
  keys: dict[str, Any] = {"row": np.arange(schema.size(split), dtype=np.int64)}
  features = schema.features
  fields = [f"item.{features.item_fields[0].name}"] + [
      f"user.{f.name}" for f in features.user_fields if f.name == "user_id"]
  has_vocab = os.path.isfile(os.path.join(data_dir, schema_lib.VOCAB_DIR, vocab.ENCODERS_FILE))
  vocabularies = vocab.load_vocabularies(data_dir) if has_vocab else {}
  for field in fields:
    ids = np.asarray(columns[field])
    keys[field] = ids
    vocabulary = vocabularies.get(field)
    if isinstance(vocabulary, vocab.Vocabulary) and vocabulary.values:
      values = np.asarray(vocabulary.values, dtype=object)
      k = ids.astype(np.int64) - vocabulary.first_id
      known = (k >= 0) & (k < len(values))
      keys[field.split(".", 1)[1]] = np.where(known, values[np.clip(k, 0, len(values) - 1)],
                                              None)
  return keys


def write_predictions(path: str, predictions: dict, attention_names: dict[str, tuple],
                      keys: dict[str, Any] | None = None) -> None:
  """Writes per-example predictions atomically (temporary file, then rename): the `keys`
  columns (`prediction_keys`) first, then score, label, group_id, extras and attention."""
  columns = {**(keys or {}), "score": predictions["prob"], "label": predictions["label"],
             "group_id": predictions["group_id"]}
  for key, values in predictions.items():
    if key.startswith("extra."):
      columns[key[len("extra."):]] = values
  table = pa.table(columns)
  for key, values in predictions.items():
    if key.startswith("attention."):
      name = key[len("attention."):]
      table = table.append_column(f"attention_{name}",
                                  pa.FixedSizeListArray.from_arrays(values.ravel(),
                                                                    values.shape[1]))
  metadata = {f"attention_{k}": ",".join(v) for k, v in attention_names.items()}
  table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
  with fileio.atomic_path(path) as tmp:
    pq.write_table(table, tmp)


def parse_step(text: str) -> int | str:
  """"latest", "best" or a step number (an int)."""
  if text in ("latest", "best"):
    return text
  try:
    return int(text)
  except ValueError:
    raise ConfigError(f"--step={text!r}: expected latest, best or a step number") from None


def attention_names(run: steps.Run) -> dict[str, tuple[str, ...]]:
  """What each attention module's weights are over, for the predictions' metadata: GIM's parts
  (the model's `gim_part_names`, if it has a GIM), IUIM's user fields, ICIM's context fields."""
  names = {}
  if hasattr(run.model, "gim_part_names"):
    names["gim"] = run.model.gim_part_names()
  names["iuim"] = tuple(f.name for f in run.schema.features.user_fields)
  names["icim"] = tuple(f.name for f in run.schema.features.context_fields)
  return names


def restore_checkpoint(config, workdir: str, step: int | str | None = "latest"):
  """`steps.setup(config)` and one checkpoint of `workdir` restored into its state.

  Args:
    step: "latest" (or None), "best" (from `checkpoints_best`) or a step number.

  Returns:
    (steps.Run, the restored TrainState, the checkpoint's meta).

  Raises:
    ConfigError: `config` does not mean the workdir's run (`workdir.check_rerun`).
    DataError: no (readable) checkpoint, or one trained on other data.
  """
  config_checks.check_config(config, jax.device_count())
  workdir_lib.check_workdir_path(workdir)
  workdir_lib.check_rerun(workdir, config.to_dict())
  step = "latest" if step is None else step
  directory = (checkpointing.best_checkpoint_dir(workdir) if step == "best" else
               checkpointing.checkpoint_dir(workdir))
  if not os.path.isdir(directory) or not os.listdir(directory):
    raise DataError(f"no checkpoints in {workdir} (expected {directory})")
  run = steps.setup(config)
  manager = (checkpointing.create_best_manager(workdir, read_only=True) if step == "best" else
             checkpointing.create_manager(workdir, config.checkpoint, read_only=True))
  restored = checkpointing.restore(manager, run.state,
                                   step=step if isinstance(step, int) else None)
  manager.close()
  if restored is None:
    raise DataError(f"no readable checkpoint in {directory}")
  state, meta = restored
  if meta.get("schema_fingerprint") != run.schema.fingerprint():
    raise DataError(f"checkpoint in {workdir} was trained on data with another schema")
  if meta.get("data_checksum", run.data_checksum) != run.data_checksum:
    raise DataError(f"checkpoint in {workdir} was trained on other data than {run.data_dir}")
  return run, state, meta


def evaluate_checkpoint(config, workdir: str, step: int | str | None, split: str,
                        with_predictions: bool) -> dict:
  """Restores a checkpoint of `workdir` (`restore_checkpoint`) and evaluates it on `split`;
  writes its metrics (and, with `with_predictions`, its per-example predictions)."""
  run, state, meta = restore_checkpoint(config, workdir, step)
  eval_step = steps.make_eval_step(run.mesh, with_attention=with_predictions,
                                   state_sharding=sharding.shardings_of(state))
  predictions = predict_split(state, eval_step, run.data_dir, run.schema, split,
                              config.eval.batch_size, run.mesh, with_attention=with_predictions)
  result = split_metrics(predictions)
  result["step"] = int(state.step)
  if step == "best":
    result.update(selected="best", best_step=meta.get("best_step"),
                  best_valid_auc=meta.get("best_valid_auc"))
  write_metrics(workdir, split, result, final=False)
  logging.info("%s @ step %d: %s", split, result["step"], result)
  if with_predictions and jax.process_index() == 0:
    path = os.path.join(workdir, "eval", f"{split}_predictions_step{result['step']}.parquet")
    write_predictions(path, predictions, attention_names(run),
                      prediction_keys(run.data_dir, run.schema, split))
    logging.info("Wrote predictions to %s", path)
  return result


def _define_flags() -> None:
  """The command's flags; defined only when run as a command, since training imports this
  module as a library."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run (holds checkpoints/).")
  flags.DEFINE_string("step", "latest", "Checkpoint to evaluate: latest, best (of validation "
                      "AUC) or a step number.")
  flags.DEFINE_enum("split", "test", ["valid", "test"], "Split to evaluate.")
  flags.DEFINE_bool("predictions", False, "Also write per-example predictions to Parquet.")
  config_flags.DEFINE_config_file("config", None, "Config file used for training; default: the "
                                  "--workdir's recorded config.json.", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.init_process(argv)
  flag = flags.FLAGS
  result = cli.run_or_exit(lambda: evaluate_checkpoint(flag.config, flag.workdir,
                                                       parse_step(flag.step), flag.split,
                                                       flag.predictions))
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(result.items())))


def parse_flags(argv):
  argv = workdir_lib.with_recorded_config(argv)
  cli.require_run(argv)
  return cli.parse_flags(argv)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=parse_flags)
