"""Predictions and exact metrics of a split (training validates with them), and the command
that evaluates a checkpoint of a run (its recorded config unless --config is given), writing
`<workdir>/eval/<split>_metrics_step<N>.json` and, with --predictions, its predictions
`<split>_predictions_step<N>.parquet` (docs/training.md says their columns):

  python -m mian_jax.evaluate --workdir=runs/synthetic [--step=latest|best|N] \\
      [--split=valid|test] [--predictions] [--config=configs/synthetic.py] [--config.k=v ...]
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags, logging
from ml_collections import config_flags

from mian_jax import cli, fileio, sharding, steps, writers
from mian_jax import metrics as metrics_lib
from mian_jax import workdir as workdir_lib
from mian_jax.data import pipeline, vocab
from mian_jax.data import schema as schema_lib
from mian_jax.errors import DataError, NonFiniteLossError

PROGRESS_EVERY_S = 10.0  # a progress line at most this often (so only on large inputs)


def predict_columns(state, eval_step, columns, schema: schema_lib.Schema, split: str,
                    batch_size: int, mesh) -> dict[str, np.ndarray]:
  """`eval_step`'s outputs over the `columns` of a split, in split order: "prob" [N] and, if it
  gives attention, "attention.<module>" [N, n]; each batch fetched while the next one runs."""
  outputs, positions = [], []
  started = last_report = time.monotonic()
  for batch, rows in pipeline.eval_batches(columns, schema, split, batch_size,
                                           jax.process_index(), jax.process_count()):
    # One host-to-device copy per batch (`sharding.PackedBatch`), not one per column.
    outputs.append(eval_step(state, sharding.pack_to_global(batch, mesh)))
    positions.append(rows)
    if len(outputs) > 1:
      outputs[-2] = sharding.to_host(outputs[-2])
    now = time.monotonic()
    if now - last_report >= PROGRESS_EVERY_S:
      num_rows = schema.size(split)
      done = min(len(outputs) * batch_size, num_rows)
      rate = done / (now - started)
      logging.info("Scored %d of %d rows (%.0f rows/s, ETA %.0f s)", done, num_rows, rate,
                   (num_rows - done) / rate)
      last_report = now
  if not outputs:
    return {"prob": np.zeros(0, np.float32)}
  outputs[-1] = sharding.to_host(outputs[-1])
  if jax.process_count() > 1:  # every process needs every process's row positions
    positions = sharding.to_host([sharding.to_global(r, mesh) for r in positions])
  rows = np.concatenate(positions)
  keep = rows >= 0
  order = np.argsort(rows[keep], kind="stable")
  gather = lambda arrays: np.concatenate(arrays)[keep][order]  # noqa: E731
  return {"prob": gather([o["prob"] for o in outputs]),
          **{f"attention.{name}": gather([o["attention"][name] for o in outputs])
             for name in outputs[0].get("attention", {})}}


def predict_split(run: steps.Run, state, split: str, rows: np.ndarray | None = None,
                  eval_step=None) -> dict[str, Any]:
  """`predict_columns` of a split (or of its `rows`), with its "label", "group_id", "extra.*";
  by `eval_step` (default: the run's)."""
  columns, schema = run.split(split), run.schema
  if rows is not None:  # the subset in memory, seen by the batching as a split of its own
    columns = {name: np.asarray(column[rows]) for name, column in columns.items()}
    sizes = dict(schema.num_examples, **{split: len(rows)})
    schema = dataclasses.replace(schema, num_examples=tuple(sizes.items()))
  if not schema.size(split):
    raise DataError(f"split {split!r} of {run.data_dir} is empty")
  result = predict_columns(state, eval_step or run.eval_step, columns, schema, split,
                           run.config.eval.batch_size, run.mesh)
  for name in ("label", "group_id", *(f"extra.{n}" for n in schema.extra_columns)):
    result[name] = np.asarray(columns[name])
  return result


def split_metrics(predictions: dict[str, Any]) -> dict[str, float | int]:
  """Exact metrics of a split's predictions; NonFiniteLossError if a score is not finite."""
  if bad := int(np.sum(~np.isfinite(predictions["prob"]))):
    raise NonFiniteLossError(f"the model predicts non-finite scores for {bad} of "
                             f"{predictions['prob'].size} examples: its parameters are broken")
  return metrics_lib.compute_metrics(predictions["label"], predictions["prob"],
                                     predictions["group_id"],
                                     click_prob=predictions.get("extra.click_prob"))


def evaluate_split(run: steps.Run, state, split: str, step: int, writer=None,
                   rows: np.ndarray | None = None) -> dict[str, Any]:
  """Exact metrics of `state` on a whole split, or on its `rows` ("<split>_subsample"), logged
  and written to `writer` (if any); with "step" and, for a subsample, "subsample": True."""
  result = split_metrics(predict_split(run, state, split, rows=rows))
  result["step"], name = step, split
  if rows is not None:
    name, result["subsample"] = f"{split}_subsample", True
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


_SUBSAMPLE_STREAM = 0x5ab5  # `valid_subsample`'s draws, apart from other uses of train.seed


def valid_subsample(group_id: np.ndarray, num_examples: int, seed: int) -> np.ndarray | None:
  """The rows, in split order, of whole groups (gAUC's users) drawn in an order from `seed` until
  they hold `num_examples` rows; None (the whole split) for 0 or at least the split's size."""
  if num_examples <= 0 or num_examples >= len(group_id):
    return None
  _, group_of_row, sizes = np.unique(group_id, return_inverse=True, return_counts=True)
  order = np.random.default_rng([seed, _SUBSAMPLE_STREAM]).permutation(len(sizes))
  enough = int(np.searchsorted(np.cumsum(sizes[order]), num_examples)) + 1
  return np.flatnonzero(np.isin(group_of_row.ravel(), order[:enough]))


def write_metrics(workdir: str, split: str, result: dict[str, Any], final: bool) -> None:
  """Writes eval/<split>_metrics_step<N>.json and, if `final`, eval/<split>_metrics.json."""
  names = [f"{split}_metrics_step{result['step']}"] + ([f"{split}_metrics"] if final else [])
  for name in names:
    writers.write_json_atomic(os.path.join(workdir, "eval", f"{name}.json"), result)


def write_predictions(path: str, predictions: dict, run: steps.Run, split: str) -> None:
  """Writes a split's predictions atomically: row, the item and user_id ids (`<group>.<name>`),
  raw values (`<name>`, if in vocab/; None for OOV), score, label, group_id, extras, attention."""
  data_dir, schema, features = run.data_dir, run.schema, run.schema.features
  split_columns = run.split(split)
  columns: dict[str, Any] = {"row": np.arange(schema.size(split), dtype=np.int64)}
  fields = [f"item.{features.item_fields[0].name}"] + [
      f"user.{f.name}" for f in features.user_fields if f.name == "user_id"]
  has_vocab = os.path.isfile(os.path.join(data_dir, schema_lib.VOCAB_DIR, vocab.ENCODERS_FILE))
  vocabularies = vocab.load_vocabularies(data_dir) if has_vocab else {}
  for field in fields:
    columns[field] = ids = np.asarray(split_columns[field])
    vocabulary = vocabularies.get(field)
    if isinstance(vocabulary, vocab.Vocabulary) and vocabulary.values:  # an id past it: None
      by_id = np.asarray([None] * vocabulary.first_id + [*vocabulary.values, None], dtype=object)
      columns[field.split(".", 1)[1]] = by_id[np.minimum(ids, len(by_id) - 1)]
  columns.update(score=predictions["prob"], label=predictions["label"],
                 group_id=predictions["group_id"])
  columns.update({k.removeprefix("extra."): v for k, v in predictions.items()
                  if k.startswith("extra.")})
  columns.update({k.replace(".", "_", 1): pa.FixedSizeListArray.from_arrays(v.ravel(), v.shape[1])
                  for k, v in predictions.items() if k.startswith("attention.")})
  table = pa.table(columns).replace_schema_metadata(
      {f"attention_{k}": ",".join(v) for k, v in attention_names(run).items()})
  with fileio.atomic_path(path) as tmp:
    pq.write_table(table, tmp)


def attention_names(run: steps.Run) -> dict[str, tuple[str, ...]]:
  """What each attention module weighs: GIM's parts (if any), IUIM's user, ICIM's context fields."""
  features = run.schema.features
  gim = {"gim": run.model.gim_part_names()} if hasattr(run.model, "gim_part_names") else {}
  return {**gim, "iuim": tuple(f.name for f in features.user_fields),
          "icim": tuple(f.name for f in features.context_fields)}


def evaluate_checkpoint(config, workdir: str, step: int | str | None, split: str,
                        with_predictions: bool) -> dict:
  """Restores a checkpoint of `workdir` (`workdir.restore_run`) and evaluates it on `split`;
  writes its metrics (and, with `with_predictions`, its per-example predictions)."""
  run, state, meta = workdir_lib.restore_run(workdir, step, config)
  eval_step = steps.make_eval_step(run.mesh, with_attention=with_predictions,
                                   state_sharding=sharding.shardings_of(state))
  predictions = predict_split(run, state, split, eval_step=eval_step)
  result = {**split_metrics(predictions), "step": int(state.step)}
  if step == "best":
    result.update(selected="best", best_step=meta.get("best_step"),
                  best_valid_auc=meta.get("best_valid_auc"))
  write_metrics(workdir, split, result, final=False)
  logging.info("%s @ step %d: %s", split, result["step"], result)
  if with_predictions and jax.process_index() == 0:
    path = os.path.join(workdir, "eval", f"{split}_predictions_step{result['step']}.parquet")
    write_predictions(path, predictions, run, split)
    logging.info("Wrote predictions to %s", path)
  return result


def _define_flags() -> None:  # only as a command: training imports this module
  cli.define_checkpoint_flags("evaluate")
  flags.DEFINE_enum("split", "test", ["valid", "test"], "Split to evaluate.")
  flags.DEFINE_bool("predictions", False, "Also write per-example predictions to Parquet.")
  config_flags.DEFINE_config_file("config", None, "Config file used for training; default: the "
                                  "--workdir's recorded config.json.", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.init_process(argv)
  flag = flags.FLAGS
  result = cli.run_or_exit(lambda: evaluate_checkpoint(
      flag.config, flag.workdir, workdir_lib.parse_step(flag.step), flag.split, flag.predictions))
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in sorted(result.items())))


def parse_flags(argv):
  argv = workdir_lib.with_recorded_config(argv)
  cli.require_run(argv)
  return cli.parse_flags(argv)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=parse_flags)
