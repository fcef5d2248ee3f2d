"""Scores raw records with a trained checkpoint: rows of your own logs in, one score per row out
(docs/serving.md, "Predict": what each source reads, what is written).

  python -m mian_jax.predict --workdir=runs/mine --input=new.csv --output=scores.parquet \\
      [--step=latest|best|N] [--attention] [--skip_bad_rows] [--batch_size=N]
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from absl import app, flags, logging

from mian_jax import cli, evaluate, fileio, sharding, steps, writers
from mian_jax import workdir as workdir_lib
from mian_jax.data import interaction_log
from mian_jax.data import records as records_lib
from mian_jax.errors import ConfigError, DataError

# data.source -> the module whose predict_reader / encode_records read and encode raw records.
RAW_RECORD_SOURCES = {"tabular": "mian_jax.data.tabular", "amazon": "mian_jax.data.amazon",
                      "amazon_like": "mian_jax.data.amazon", "movielens": "mian_jax.data.movielens"}


def read_input(path: str, tabular_config,
               skip_bad_rows: bool) -> tuple[records_lib.Records, dict[str, Any]]:
  """(The records of `path`, {"bad": count, "reasons": {reason: count}, "first_bad": "line 7
  (reason) 'value'"}); DataError naming the earliest malformed row unless `skip_bad_rows`."""
  bad = interaction_log.BadRows(max_ratio=1.0, earliest=True)
  records = records_lib.read_records(path, tabular_config, bad, records_lib.file_format(path))
  name = os.path.basename(path)
  summary = {"bad": 0, "reasons": {}, "first_bad": None, **bad.summary().get(name, {})}
  if summary["bad"] and not skip_bad_rows:
    raise DataError(f"{name} {summary['first_bad']}: a malformed row ({summary['bad']} in all: "
                    f"{summary['reasons']}); fix it, or pass --skip_bad_rows to skip and count "
                    "such rows")
  return records, summary


def unlabelled_history_warning(config, records: records_lib.Records, path: str) -> str | None:
  """The warning for an input without a label column whose behaviours are the user's earlier
  clicks (tabular, behavior_rows="clicks"): every history is empty. None otherwise."""
  c = config.data.get("tabular")  # only a tabular config has one
  if (config.data.source != "tabular" or records.labelled
      or (c.behavior_source, c.behavior_rows) != ("log", "clicks")):
    return None
  return (f"{os.path.basename(path)} has no label column {c.label!r}: no row is taken as a past "
          "click, so every behaviour history is empty (the run builds histories from the "
          "user's earlier clicks). Give the earlier rows with their labels (1 = clicked) in a "
          f"{c.label!r} column, and leave the label empty on the rows to score")


def output_table(records: records_lib.Records, reader, outputs: Mapping[str, np.ndarray],
                 names: Mapping[str, tuple[str, ...]]) -> pa.Table:
  """The kept input rows' key columns as read, `input_row`, `score`, and the attention weights
  `attention.<module>.<name>`: a field or part name, else `hist<k>` (slot k, 0 = the newest)."""
  keys = [reader.user_id, records.groups["item"][0][0], reader.timestamp]
  if records.labelled:
    keys.append(reader.label)
  table = records.table.select(list(dict.fromkeys(keys))).take(pa.array(records.kept))
  columns = {"input_row": records.kept.astype(np.int64),
             "score": outputs["prob"].astype(np.float32)}
  for key, weights in outputs.items():
    if key.startswith("attention."):
      over = names.get(key[len("attention."):], ())
      if len(over) != weights.shape[1]:
        over = [f"hist{k}" for k in range(weights.shape[1])]
      columns.update({f"{key}.{name}": weights[:, k].astype(np.float32)
                      for k, name in enumerate(over)})
  if clash := [name for name in columns if name in table.column_names]:
    raise DataError(f"the input's key column(s) {clash} have the name of an output column; "
                    "rename them in the input")
  return pa.table({**dict(zip(table.column_names, table.columns)), **columns})


def predict(workdir: str, input_path: str, output_path: str, step: int | str = "latest",
            with_attention: bool = False, skip_bad_rows: bool = False,
            batch_size: int = 0) -> dict[str, Any]:
  """Scores `input_path` with a checkpoint of `workdir` into `output_path` and its .stats.json;
  returns the stats. `batch_size` 0: the run's eval.batch_size."""
  cli.check_one_process("predict")
  if batch_size < 0:
    raise ConfigError(f"--batch_size={batch_size}: expected a positive number of rows, or 0 "
                      "for the run's eval.batch_size")
  output_path = os.path.abspath(output_path)
  write = {".parquet": pq.write_table, ".pq": pq.write_table, ".csv": pa_csv.write_csv}.get(
      os.path.splitext(output_path)[1].lower())
  if write is None:
    raise ConfigError(f"--output={output_path}: expected a .parquet, .pq or .csv file")
  if output_path == os.path.abspath(input_path):
    raise ConfigError("--output must not be the --input file")
  started = time.monotonic()
  config = workdir_lib.recorded_config(workdir)
  batch_size = batch_size or config.eval.batch_size
  if batch_size % jax.device_count():
    raise ConfigError(f"--batch_size={batch_size} must be a multiple of the "
                      f"{jax.device_count()} devices")
  if config.data.source not in RAW_RECORD_SOURCES:
    raise DataError(f"predict scores raw records of the sources {sorted(RAW_RECORD_SOURCES)}; "
                    f"{workdir} was trained on data.source={config.data.source!r}, which has "
                    "none (score its prepared splits with python -m mian_jax.evaluate)")
  source = importlib.import_module(RAW_RECORD_SOURCES[config.data.source])
  reader = source.predict_reader(config.data)
  records, bad = read_input(input_path, reader, skip_bad_rows)  # a bad row stops before the model
  warnings = [w for w in (unlabelled_history_warning(config, records, input_path),) if w]
  for warning in warnings:
    logging.warning("%s", warning)
  logging.info("Read %d rows of %s (%d malformed rows skipped)", len(records.log) + bad["bad"],
               input_path, bad["bad"])
  run, state, _ = workdir_lib.restore_run(workdir, step, config)
  columns, unseen = source.encode_records(records, run.data_dir, config.data)
  num_rows, step = len(records.log), int(jax.device_get(state.step))
  logging.info("Scoring %d rows of %s with step %d of %s", num_rows, input_path, step, workdir)
  eval_step = run.eval_step if not with_attention else steps.make_eval_step(
      run.mesh, with_attention=True, state_sharding=sharding.shardings_of(state))
  schema = dataclasses.replace(run.schema, num_examples=(("predict", num_rows),))
  outputs = evaluate.predict_columns(state, eval_step, columns, schema, "predict", batch_size,
                                     run.mesh)
  table = output_table(records, reader, outputs, evaluate.attention_names(run))
  os.makedirs(os.path.dirname(output_path), exist_ok=True)
  try:
    with fileio.atomic_path(output_path) as tmp:
      write(table, tmp)
  except OSError as e:
    raise DataError(f"cannot write {output_path} ({e.strerror or e})") from None
  stats = {"workdir": os.path.abspath(workdir), "step": step,
           "input": os.path.abspath(input_path), "output": output_path,
           "rows_read": num_rows + int(bad["bad"]), "rows_scored": num_rows,
           "rows_skipped": int(bad["bad"]), "skipped_reasons": bad["reasons"],
           "first_skipped": bad["first_bad"], "unseen": unseen, "warnings": warnings,
           "seconds": round(time.monotonic() - started, 3)}
  writers.write_json_atomic(f"{output_path}.stats.json", stats)
  seen = ", ".join(f"{field} {count}" for field, count in unseen.items() if count) or "none"
  logging.info("Wrote %d scores to %s (%d rows skipped; unseen or missing values: %s)",
               num_rows, output_path, stats["rows_skipped"], seen)
  return stats


def _define_flags() -> None:
  cli.define_checkpoint_flags("score", "tabular, amazon, amazon_like or movielens source")
  flags.DEFINE_string("input", None, "Raw records: CSV, Parquet (.parquet/.pq) or JSON lines "
                      "(.jsonl/.ndjson/.json), in the columns of the run's source.")
  flags.DEFINE_string("output", None, "Scores to write: .parquet/.pq or .csv.")
  flags.DEFINE_bool("attention", False, "Also write each attention weight as a column.")
  flags.DEFINE_bool("skip_bad_rows", False, "Skip and count malformed rows instead of stopping "
                    "at the first.")
  flags.DEFINE_integer("batch_size", 0, "Rows per scored batch (0: the run's eval.batch_size).")
  flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  cli.init_process(argv)
  flag = flags.FLAGS
  stats = cli.run_or_exit(lambda: predict(
      flag.workdir, flag.input, flag.output, workdir_lib.parse_step(flag.step), flag.attention,
      flag.skip_bad_rows, flag.batch_size))
  unseen = sum(stats["unseen"].values())
  print(f"scored {stats['rows_scored']} rows with step {stats['step']} to {stats['output']} "
        f"({stats['rows_skipped']} skipped, {unseen} unseen or missing values; "
        f"{stats['output']}.stats.json)")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
