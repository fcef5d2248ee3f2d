"""Scores raw records with a trained checkpoint: rows of your own logs in, one score per row out.

  python -m mian_jax.predict --workdir=runs/mine --input=new.csv --output=scores.parquet \
      [--step=latest|best|N] [--attention] [--skip_bad_rows] [--batch_size=N]

Supported so far: workdirs trained on the tabular source (configs/tabular.py). The config is
the workdir's recorded one (config.json); the checkpoint is restored as `evaluate` restores it.

Input: CSV, Parquet or JSON lines (by extension: .parquet/.pq, .jsonl/.ndjson/.json, else CSV
with the config's csv_sep and encoding), in the columns `config.data.tabular` names. Each file
is read and checked as preparation reads a file of the log (`tabular.read_records`), except
that the label column is optional and an empty label means "unknown" (the row is scored; it is
never a click in a later row's behaviours). JSON values are read as their text, as CSV cells
are. Values are encoded with the prepared data's saved vocabularies and encoders
(`mian_jax/data/vocab.py`): an unseen or missing categorical value is the out-of-vocabulary id 1,
counted per field. Behaviours are built as preparation built them (`tabular.history_indices`):
with behavior_source="log", from the earlier rows of the same user *in the input* (clicks
only with behavior_rows="clicks"), so give the rows to score together with the history they
should see; with "list", from the input's list columns.

Output: Parquet or CSV (by the extension of --output), written atomically, one row per input
row in input order (rows skipped with --skip_bad_rows are left out): the input's user id, item
id, timestamp and, if present, label columns as read, `score` (the click probability), and
with --attention one column `attention.<module>.<name>` per attention weight (a field or part
name, or `hist<k>` for behaviour slot k, 0 = the newest). Beside it, `<output>.stats.json`:
rows read, scored and skipped (with reasons and the first bad line), unseen values per field,
step and time.

A malformed row (docs/data.md, "Your own logs") stops the command with one line naming its
file line, unless --skip_bad_rows, which drops such rows and counts them.
"""

from __future__ import annotations

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

from mian_jax import cli, evaluate, recorded_config, sharding, steps, writers
from mian_jax import workdir as workdir_lib
from mian_jax.data import interaction_log, pipeline, tabular, vocab
from mian_jax.errors import ConfigError, DataError

PROGRESS_EVERY_S = 10.0  # a progress line at most this often (so only on large inputs)
_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl",
            ".json": "jsonl"}


def input_format(path: str) -> str:
  """"parquet", "jsonl" or "csv", by the file's extension."""
  return _FORMATS.get(os.path.splitext(path)[1].lower(), "csv")


def output_format(path: str) -> str:
  """"parquet" or "csv", by the file's extension; ConfigError for another."""
  fmt = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}.get(
      os.path.splitext(path)[1].lower())
  if fmt is None:
    raise ConfigError(f"--output={path}: expected a .parquet, .pq or .csv file")
  return fmt


def load_config(workdir: str):
  """The recorded config of a workdir trained on the tabular source.

  Raises:
    DataError: no such workdir or no recorded config; a source predict does not support yet.
  """
  if not os.path.isdir(workdir):
    raise DataError(f"--workdir={workdir} does not exist")
  if workdir_lib.read_recorded_config(workdir) is None:
    raise DataError(f"{workdir} has no {workdir_lib.CONFIG_FILE}: it is not a training workdir")
  config = recorded_config.get_config(workdir)
  if config.data.source != "tabular":
    raise DataError(f"predict supports the tabular source (configs/tabular.py) so far; "
                    f"{workdir} was trained on data.source={config.data.source!r}")
  return config


class _BadRows(interaction_log.BadRows):
  """`interaction_log.BadRows` that also keeps, per file, the earliest bad row (by file line),
  whatever the reason it was found for first."""

  def __init__(self):
    super().__init__(max_ratio=1.0)
    self.earliest: dict[str, tuple[int, str]] = {}

  def record(self, name, total, bad, reason, line_numbers=None, lines=None) -> None:
    super().record(name, total, bad, reason, line_numbers, lines)
    if np.any(bad):
      i = int(np.flatnonzero(bad)[0])
      where = int(line_numbers[i]) if line_numbers is not None else i + 1
      if name not in self.earliest or where < self.earliest[name][0]:
        one = interaction_log.BadRows(max_ratio=1.0)
        one.record(name, total, bad, reason, line_numbers, lines)
        self.earliest[name] = (where, one.files[name]["first_bad"])


def read_input(path: str, tabular_config, skip_bad_rows: bool,
               fmt: str | None = None) -> tuple[tabular.Records, dict[str, Any]]:
  """The records of `path` (`tabular.read_records`) and its bad rows ("bad": how many,
  "reasons": {reason: count}, "first_bad": the earliest, e.g. "line 7 (reason) 'value'").

  Raises:
    DataError: a malformed row, the earliest named by its file line, unless `skip_bad_rows`.
  """
  bad = _BadRows()
  records = tabular.read_records(path, tabular_config, bad, fmt or input_format(path))
  name = os.path.basename(path)
  summary = {"bad": 0, "reasons": {}, **bad.summary().get(name, {}),
             "first_bad": bad.earliest.get(name, (0, None))[1]}
  if summary["bad"] and not skip_bad_rows:
    raise DataError(f"{name} {summary['first_bad']}: a malformed row ({summary['bad']} in all: "
                    f"{summary['reasons']}); fix it, or pass --skip_bad_rows to skip and count "
                    "such rows")
  return records, summary


def encode_records(records: tabular.Records, vocabularies: Mapping[str, vocab.Vocabulary],
                   encoders: Mapping[str, Any], tabular_config,
                   max_seq_len: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Records -> the columns of a prepared split (with label, without group_id) and the number
  of unseen or missing values per categorical field ({"item.item_id": 3, ...})."""
  log = records.log
  columns, unseen = {}, {}
  for group, fields in records.groups.items():
    for name, kind in fields:
      field = f"{group}.{name}"
      raw = log[field].to_numpy(object if kind == "categorical" else np.float64)
      columns[field], count = vocab.encode_field(vocabularies, encoders, field, raw)
      if kind == "categorical":
        unseen[field] = count
  indices, columns["hist_len"] = tabular.history_indices(
      log, max_seq_len, tabular.behaviour_mask(log, tabular_config.behavior_rows),
      records.lists)
  for name in records.behavior:
    if records.lists is None:  # the behaviours are rows of the input
      ids = columns[f"item.{name}"]
    else:
      ids, unseen[f"hist.{name}"] = vocabularies[f"item.{name}"].encode(records.lists.flat[name])
    columns[f"hist.{name}"] = np.where(indices >= 0, ids[np.maximum(indices, 0)] if len(ids)
                                       else 0, 0).astype(np.int32)
  columns["label"] = np.nan_to_num(log["label"].to_numpy(np.float32))
  return columns, unseen


def score_columns(run: steps.Run, state, columns: Mapping[str, np.ndarray], num_rows: int,
                  batch_size: int, with_attention: bool = False) -> dict[str, np.ndarray]:
  """Scores encoded columns in fixed-size batches (the last padded with row 0), one batch in
  flight while the previous one is fetched.

  Returns:
    {"prob": [N], and with `with_attention` "attention.<module>": [N, n]} as NumPy arrays.
  """
  if batch_size % jax.device_count():
    raise ConfigError(f"--batch_size={batch_size} must be a multiple of the "
                      f"{jax.device_count()} devices")
  eval_step = (steps.make_eval_step(run.mesh, with_attention=True) if with_attention
               else run.eval_step)
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
  names (`evaluate.attention_names`), else `hist<k>` (behaviour slot k, 0 = the newest)."""
  over = names.get(module)
  if over is None or len(over) != width:
    over = tuple(f"hist{k}" for k in range(width))
  return [f"attention.{module}.{name}" for name in over]


def output_table(records: tabular.Records, tabular_config, outputs: Mapping[str, np.ndarray],
                 names: Mapping[str, tuple[str, ...]]) -> pa.Table:
  """The key columns of the kept input rows as read, `score`, and one column per attention
  weight."""
  c = tabular_config
  keys = [c.user_id, records.groups["item"][0][0], c.timestamp]
  if c.label in records.table.column_names:
    keys.append(c.label)
  table = records.table.select(list(dict.fromkeys(keys))).take(pa.array(records.kept))
  columns = {"score": outputs["prob"].astype(np.float32)}
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
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    if fmt == "parquet":
      pq.write_table(table, tmp)
    else:
      pa_csv.write_csv(table, tmp)
    os.replace(tmp, path)
  except OSError as e:
    raise DataError(f"cannot write {path} ({e.strerror or e})") from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def predict(workdir: str, input_path: str, output_path: str, step: int | str = "latest",
            with_attention: bool = False, skip_bad_rows: bool = False,
            batch_size: int = 0) -> dict[str, Any]:
  """Scores the raw records of `input_path` with a checkpoint of `workdir` and writes them to
  `output_path` (and `<output_path>.stats.json`); returns the stats (module docstring).

  Args:
    batch_size: rows per scored batch; 0 = the run's eval.batch_size.
  """
  if jax.process_count() > 1:
    raise ConfigError("predict runs in one process; start it without MIAN_JAX_DISTRIBUTED")
  output_path = os.path.abspath(output_path)
  output_format(output_path)
  if output_path == os.path.abspath(input_path):
    raise ConfigError("--output must not be the --input file")
  started = time.monotonic()
  config = load_config(workdir)
  c = config.data.tabular
  records, bad = read_input(input_path, c, skip_bad_rows)  # a bad row stops before the model
  logging.info("Read %d rows of %s (%d malformed rows skipped)", len(records.log) + bad["bad"],
               input_path, bad["bad"])
  run, state, _ = evaluate.restore_checkpoint(config, workdir, step)
  columns, unseen = encode_records(records, vocab.load_vocabularies(run.data_dir),
                                   vocab.load_encoders(run.data_dir), c,
                                   run.schema.features.max_seq_len)
  num_rows = len(records.log)
  logging.info("Scoring %d rows of %s with step %d of %s", num_rows, input_path,
               int(jax.device_get(state.step)), workdir)
  outputs = score_columns(run, state, columns, num_rows,
                          batch_size or config.eval.batch_size, with_attention)
  names = evaluate.attention_names(run)
  write_table_atomic(output_table(records, c, outputs, names), output_path)
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
      "seconds": round(time.monotonic() - started, 3),
  }
  writers.write_json_atomic(f"{output_path}.stats.json", stats)
  seen = ", ".join(f"{field} {count}" for field, count in unseen.items() if count) or "none"
  logging.info("Wrote %d scores to %s (%d rows skipped; unseen or missing values: %s)",
               num_rows, output_path, stats["rows_skipped"], seen)
  return stats


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Workdir of a training run on the tabular source.")
  flags.DEFINE_string("input", None, "Raw records: CSV, Parquet (.parquet/.pq) or JSON lines "
                      "(.jsonl/.ndjson/.json), in the columns of the run's data.tabular.")
  flags.DEFINE_string("output", None, "Scores to write: .parquet/.pq or .csv.")
  flags.DEFINE_string("step", "latest", "Checkpoint: latest, best (of validation AUC) or a step "
                      "number.")
  flags.DEFINE_bool("attention", False, "Also write each attention weight as a column.")
  flags.DEFINE_bool("skip_bad_rows", False, "Skip and count malformed rows instead of stopping "
                    "at the first.")
  flags.DEFINE_integer("batch_size", 0, "Rows per scored batch (0: the run's eval.batch_size).")
  flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.init_process()
  flag = flags.FLAGS
  stats = cli.run_or_exit(lambda: predict(
      flag.workdir, flag.input, flag.output, evaluate.parse_step(flag.step), flag.attention,
      flag.skip_bad_rows, flag.batch_size))
  unseen = sum(stats["unseen"].values())
  print(f"scored {stats['rows_scored']} rows with step {stats['step']} to {stats['output']} "
        f"({stats['rows_skipped']} skipped, {unseen} unseen or missing values; "
        f"{stats['output']}.stats.json)")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
