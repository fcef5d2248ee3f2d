"""Scores raw records with a trained checkpoint: rows of your own logs in, one score per row out
(docs/serving.md, "Predict": what each source reads, what is written).

  python -m mian_jax.predict --workdir=runs/mine --input=new.csv --output=scores.parquet \
      [--step=latest|best|N] [--attention] [--skip_bad_rows] [--batch_size=N]
"""

from __future__ import annotations

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
from mian_jax.data import interaction_log, pipeline
from mian_jax.data import records as records_lib
from mian_jax.errors import ConfigError, DataError

PROGRESS_EVERY_S = 10.0  # a progress line at most this often (so only on large inputs)
# data.source -> the module whose predict_reader / encode_records read and encode raw records.
RAW_RECORD_SOURCES = {"tabular": "mian_jax.data.tabular", "amazon": "mian_jax.data.amazon",
                      "amazon_like": "mian_jax.data.amazon",
                      "movielens": "mian_jax.data.movielens"}


def output_format(path: str) -> str:
  """"parquet" or "csv", by the file's extension; ConfigError for another."""
  fmt = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}.get(
      os.path.splitext(path)[1].lower())
  if fmt is None:
    raise ConfigError(f"--output={path}: expected a .parquet, .pq or .csv file")
  return fmt


def source_module(config, workdir: str):
  """The data module that reads and encodes raw records of `config.data.source`; DataError for
  a source without raw records."""
  if config.data.source not in RAW_RECORD_SOURCES:
    raise DataError(f"predict scores raw records of the sources {sorted(RAW_RECORD_SOURCES)}; "
                    f"{workdir} was trained on data.source={config.data.source!r}, which has "
                    "none (score its prepared splits with python -m mian_jax.evaluate)")
  return importlib.import_module(RAW_RECORD_SOURCES[config.data.source])


def read_input(path: str, tabular_config,
               skip_bad_rows: bool) -> tuple[records_lib.Records, dict[str, Any]]:
  """The records of `path` (`records.read_records`) and its bad rows ("bad": how many,
  "reasons": {reason: count}, "first_bad": e.g. "line 7 (reason) 'value'"); DataError naming
  the earliest malformed row unless `skip_bad_rows`."""
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
  if config.data.source != "tabular":
    return None
  c = config.data.tabular
  if records.labelled or (c.behavior_source, c.behavior_rows) != ("log", "clicks"):
    return None
  return (f"{os.path.basename(path)} has no label column {c.label!r}: no row is taken as a past "
          "click, so every behaviour history is empty (the run builds histories from the "
          "user's earlier clicks). Give the earlier rows with their labels (1 = clicked) in a "
          f"{c.label!r} column, and leave the label empty on the rows to score")


def score_columns(run: steps.Run, state, columns: Mapping[str, np.ndarray], num_rows: int,
                  batch_size: int, with_attention: bool = False) -> dict[str, np.ndarray]:
  """{"prob": [N], with `with_attention` "attention.<module>": [N, n]} (NumPy) of encoded
  columns, scored in fixed-size batches (the last padded with row 0), one in flight while the
  previous one is fetched."""
  if batch_size % jax.device_count():
    raise ConfigError(f"--batch_size={batch_size} must be a multiple of the "
                      f"{jax.device_count()} devices")
  eval_step = run.eval_step if not with_attention else steps.make_eval_step(
      run.mesh, with_attention=True, state_sharding=sharding.shardings_of(state))
  parts: list[dict[str, np.ndarray]] = []
  start_time, last_report = time.monotonic(), time.monotonic()

  def fetch(out, count):
    out = sharding.to_host(out)
    part = {"prob": np.asarray(out["prob"])[:count]}
    for name, weights in out.get("attention", {}).items():
      part[f"attention.{name}"] = np.asarray(weights)[:count]
    parts.append(part)

  pending = None
  for start in range(0, num_rows, batch_size):
    count = min(batch_size, num_rows - start)
    rows = np.concatenate([np.arange(start, start + count),
                           np.zeros(batch_size - count, np.int64)])
    out = eval_step(state, sharding.to_global(pipeline.gather_batch(columns, run.schema, rows),
                                              run.mesh))
    if pending is not None:
      fetch(*pending)
    pending = (out, count)
    now = time.monotonic()
    if now - last_report >= PROGRESS_EVERY_S:
      done = start + count
      rate = done / (now - start_time)
      logging.info("Scored %d of %d rows (%.0f rows/s, ETA %.0f s)", done, num_rows, rate,
                   (num_rows - done) / rate)
      last_report = now
  if pending is not None:
    fetch(*pending)
  if not parts:
    return {"prob": np.zeros(0, np.float32)}
  return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def attention_column_names(module: str, width: int,
                           names: Mapping[str, tuple[str, ...]]) -> list[str]:
  """`attention.<module>.<name>` for each of a module's `width` weights: its field or part
  names, else `hist<k>` (behaviour slot k, 0 = the newest)."""
  over = names.get(module)
  if over is None or len(over) != width:
    over = tuple(f"hist{k}" for k in range(width))
  return [f"attention.{module}.{name}" for name in over]


def output_table(records: records_lib.Records, reader, outputs: Mapping[str, np.ndarray],
                 names: Mapping[str, tuple[str, ...]]) -> pa.Table:
  """The kept input rows' key columns as read, `input_row`, `score`, and the attention."""
  keys = [reader.user_id, records.groups["item"][0][0], reader.timestamp]
  if records.labelled:
    keys.append(reader.label)
  table = records.table.select(list(dict.fromkeys(keys))).take(pa.array(records.kept))
  columns = {"input_row": records.kept.astype(np.int64),
             "score": outputs["prob"].astype(np.float32)}
  for key, weights in outputs.items():
    if key.startswith("attention."):
      module = key[len("attention."):]
      for k, name in enumerate(attention_column_names(module, weights.shape[1], names)):
        columns[name] = weights[:, k].astype(np.float32)
  clash = [name for name in columns if name in table.column_names]
  if clash:
    raise DataError(f"the input's key column(s) {clash} have the name of an output column; "
                    "rename them in the input")
  for name, values in columns.items():
    table = table.append_column(name, pa.array(values))
  return table


def write_table_atomic(table: pa.Table, path: str) -> None:
  """Writes Parquet or CSV (by the extension) through a temporary file and a rename."""
  fmt = output_format(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    with fileio.atomic_path(path) as tmp:
      (pq.write_table if fmt == "parquet" else pa_csv.write_csv)(table, tmp)
  except OSError as e:
    raise DataError(f"cannot write {path} ({e.strerror or e})") from None


def predict(workdir: str, input_path: str, output_path: str, step: int | str = "latest",
            with_attention: bool = False, skip_bad_rows: bool = False,
            batch_size: int = 0) -> dict[str, Any]:
  """Scores the raw records of `input_path` with a checkpoint of `workdir`, writes them to
  `output_path` and `<output_path>.stats.json`; returns the stats. `batch_size` 0: the run's
  eval.batch_size."""
  if jax.process_count() > 1:
    raise ConfigError("predict runs in one process; start it without MIAN_JAX_DISTRIBUTED")
  if batch_size < 0:
    raise ConfigError(f"--batch_size={batch_size}: expected a positive number of rows, or 0 "
                      "for the run's eval.batch_size")
  output_path = os.path.abspath(output_path)
  output_format(output_path)
  if output_path == os.path.abspath(input_path):
    raise ConfigError("--output must not be the --input file")
  started = time.monotonic()
  config = workdir_lib.recorded_config(workdir)
  source = source_module(config, workdir)
  reader = source.predict_reader(config.data)
  records, bad = read_input(input_path, reader, skip_bad_rows)  # a bad row stops before the model
  warnings = [w for w in (unlabelled_history_warning(config, records, input_path),) if w]
  for warning in warnings:
    logging.warning("%s", warning)
  logging.info("Read %d rows of %s (%d malformed rows skipped)", len(records.log) + bad["bad"],
               input_path, bad["bad"])
  run, state, _ = workdir_lib.restore_run(workdir, step, config)
  columns, unseen = source.encode_records(records, run.data_dir, config.data)
  num_rows = len(records.log)
  logging.info("Scoring %d rows of %s with step %d of %s", num_rows, input_path,
               int(jax.device_get(state.step)), workdir)
  outputs = score_columns(run, state, columns, num_rows,
                          batch_size or config.eval.batch_size, with_attention)
  names = evaluate.attention_names(run)
  write_table_atomic(output_table(records, reader, outputs, names), output_path)
  stats = {
      "workdir": os.path.abspath(workdir),
      "step": int(jax.device_get(state.step)),
      "input": os.path.abspath(input_path),
      "output": output_path,
      "rows_read": num_rows + int(bad["bad"]),
      "rows_scored": num_rows,
      "rows_skipped": int(bad["bad"]),
      "skipped_reasons": bad["reasons"],
      "first_skipped": bad["first_bad"],
      "unseen": unseen,
      "warnings": warnings,
      "seconds": round(time.monotonic() - started, 3),
  }
  writers.write_json_atomic(f"{output_path}.stats.json", stats)
  seen = ", ".join(f"{field} {count}" for field, count in unseen.items() if count) or "none"
  logging.info("Wrote %d scores to %s (%d rows skipped; unseen or missing values: %s)",
               num_rows, output_path, stats["rows_skipped"], seen)
  return stats


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Workdir of a training run (tabular, amazon, "
                      "amazon_like or movielens source).")
  flags.DEFINE_string("input", None, "Raw records: CSV, Parquet (.parquet/.pq) or JSON lines "
                      "(.jsonl/.ndjson/.json), in the columns of the run's source.")
  flags.DEFINE_string("output", None, "Scores to write: .parquet/.pq or .csv.")
  flags.DEFINE_string("step", "latest", "Checkpoint: latest, best (of validation AUC) or a step "
                      "number.")
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
