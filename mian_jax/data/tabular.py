"""The user's own logs as CSV or Parquet (docs/data.md, configs/tabular.py).

One row per example (an impression). `config.data.tabular` names the columns:

  label, user_id, timestamp      required in every row (label 0/1 or true/false; timestamp a
                                 number, e.g. Unix seconds, or a date-time string / Parquet
                                 timestamp, converted to seconds)
  item_fields / user_fields / context_fields
                                 "name:kind,..." with kind categorical (default) or numeric; the
                                 first item field is the item id
  behavior_fields                item fields that form the behaviour sequence, e.g. "item_id,cat"
  behavior_source = "log"        behaviours = the same user's rows with a strictly earlier
                                 timestamp (`behavior_rows`: "clicks" = label 1 only, or "all"),
                                 built like MovieLens: no future information can leak in
  behavior_source = "list"       `behavior_columns` = "field:column,..." name list columns holding
                                 each row's behaviours oldest first (Parquet lists, or CSV strings
                                 separated by `list_sep`); their correctness is the user's job

Splits: `path` = one file cut by time (the last `test_fraction` of rows by timestamp = test, the
`valid_fraction` before = valid), or `train_path`, `valid_path`, `test_path` = pre-split files.

Bad rows (counted per file, in stats.json["bad_rows"]; above data.max_bad_row_ratio the
preparation fails): CSV lines with too many fields, a missing or unparsable label, user id,
timestamp or item id, a non-numeric numeric field, behaviour list columns of unequal length.
A missing categorical value maps to the OOV id 1. A named column absent from the file, a missing
or empty file: DataError.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from ml_collections import ConfigDict

from mian_jax.data import logs
from mian_jax.errors import DataError

_TRUE = ("1", "1.0", "true", "True", "TRUE")
_FALSE = ("0", "0.0", "false", "False", "FALSE")


def _file_format(path: str, fmt: str) -> str:
  if fmt != "auto":
    if fmt not in ("csv", "parquet"):
      raise DataError(f"data.tabular.format={fmt!r}; expected 'auto', 'csv' or 'parquet'")
    return fmt
  return "parquet" if path.lower().endswith((".parquet", ".pq")) else "csv"


def read_table(path: str, c: ConfigDict, bad: logs.BadRows) -> pa.Table:
  """Reads one CSV (all columns as strings) or Parquet file; counts CSV lines with too many or
  too few fields as malformed."""
  if not os.path.isfile(path):
    raise DataError(f"file not found: {path}")
  name = os.path.basename(path)
  try:
    if _file_format(path, c.format) == "parquet":
      table = pq.read_table(path)
      invalid = []
    else:
      with open(path, newline="", encoding=c.encoding) as f:
        header = next(csv.reader(f, delimiter=c.csv_sep), None)
      if not header:
        raise DataError(f"{path} is empty (no header line)")
      invalid = []
      handler = lambda row: invalid.append(row.text) or "skip"  # noqa: E731
      table = pa_csv.read_csv(
          path, read_options=pa_csv.ReadOptions(encoding=c.encoding, use_threads=False),
          parse_options=pa_csv.ParseOptions(delimiter=c.csv_sep, invalid_row_handler=handler),
          convert_options=pa_csv.ConvertOptions(column_types={h: pa.string() for h in header},
                                                strings_can_be_null=True))
  except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read {path}: {' '.join(str(e).split())[:300]}") from None
  total = table.num_rows + len(invalid)
  if total == 0:
    raise DataError(f"{path} is empty (no data rows)")
  bad.record(name, total, np.arange(total) >= table.num_rows, "wrong number of fields",
             lines=[""] * table.num_rows + invalid)
  return table


def _timestamps(col: pa.ChunkedArray) -> np.ndarray:
  """Seconds as float64 (NaN = unparsable) from numbers, numeric strings, dates or timestamps."""
  if pa.types.is_timestamp(col.type) or pa.types.is_date(col.type):
    s = pd.to_datetime(col.to_pandas(), utc=True, errors="coerce")
    return (s.astype("int64") / 1e9).where(s.notna()).to_numpy(np.float64, na_value=np.nan)
  s = col.to_pandas()
  num = pd.to_numeric(s, errors="coerce")
  if num.notna().sum() >= s.notna().sum():  # all present values are numbers
    return num.to_numpy(np.float64, na_value=np.nan)
  when = pd.to_datetime(s.astype(object), utc=True, errors="coerce", format="mixed")
  return (when.astype("int64") / 1e9).where(when.notna()).to_numpy(np.float64, na_value=np.nan)


def _labels(col: pa.ChunkedArray) -> np.ndarray:
  """0/1 as float32; NaN where the value is neither."""
  s = col.to_pandas().astype(object).astype(str).str.strip()
  return np.where(s.isin(_TRUE), 1.0, np.where(s.isin(_FALSE), 0.0, np.nan))


def _as_list_array(col: pa.ChunkedArray, sep: str) -> pa.Array:
  """A list column as a ListArray; CSV strings are split on `sep`, empty strings = empty list."""
  arr = col.combine_chunks()
  if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
    return arr
  s = arr.cast(pa.string())
  empty = pc.equal(pc.utf8_trim_whitespace(s), "")
  s = pc.if_else(empty, pa.scalar(None, pa.string()), s)
  return pc.split_pattern(s, sep)


def _field_columns(c: ConfigDict):
  groups = {g: logs.parse_fields(c[f"{g}_fields"], f"data.tabular.{g}_fields")
            for g in ("item", "user", "context")}
  if not groups["item"]:
    raise DataError("data.tabular.item_fields must name at least the item id column")
  behavior = tuple(x.strip() for x in c.behavior_fields.split(",") if x.strip())
  return groups, behavior


def _check_config(c: ConfigDict, groups, behavior):
  item_kinds = dict(groups["item"])
  for name in behavior:
    if item_kinds.get(name) != "categorical":
      raise DataError(f"data.tabular.behavior_fields: {name!r} must be a categorical item field")
  if c.behavior_source not in ("log", "list"):
    raise DataError(f"data.tabular.behavior_source={c.behavior_source!r}; expected 'log' or 'list'")
  if c.behavior_rows not in ("clicks", "all"):
    raise DataError(f"data.tabular.behavior_rows={c.behavior_rows!r}; expected 'clicks' or 'all'")
  if groups["item"][0][1] != "categorical":
    raise DataError("data.tabular.item_fields: the first field (the item id) must be categorical")


def _behavior_columns(c: ConfigDict, behavior) -> dict[str, str]:
  pairs = dict(p.strip().split(":", 1) for p in c.behavior_columns.split(",") if ":" in p)
  missing = [b for b in behavior if b not in pairs]
  if missing:
    raise DataError(f"data.tabular.behavior_columns must map every behaviour field "
                    f"('field:column,...'); missing {missing}")
  return {k.strip(): v.strip() for k, v in pairs.items()}


def _table_to_log(table: pa.Table, name: str, split_code: int | None, c: ConfigDict, groups,
                  behavior, bad: logs.BadRows):
  """One file's rows -> (log frame, {field: ListArray} or None); bad rows counted and dropped."""
  needed = {c.label: "label", c.user_id: "user_id", c.timestamp: "timestamp"}
  for g, fields in groups.items():
    needed.update({f: f"{g}_fields" for f, _ in fields})
  list_cols = _behavior_columns(c, behavior) if c.behavior_source == "list" else {}
  needed.update({col: "behavior_columns" for col in list_cols.values()})
  absent = [f"{col!r} ({key})" for col, key in needed.items() if col not in table.column_names]
  if absent:
    raise DataError(f"{name}: column(s) {', '.join(absent)} named in data.tabular not found; "
                    f"the file has {table.column_names}")
  n = table.num_rows
  ok = np.ones(n, bool)

  def flag(mask, reason):
    nonlocal ok
    bad.record(name, 0, ok & mask, reason)
    ok &= ~mask

  label = _labels(table[c.label])
  flag(np.isnan(label), f"label {c.label!r} is not 0/1")
  user = table[c.user_id].to_pandas()
  flag(user.isna().to_numpy(), f"user id {c.user_id!r} missing")
  ts = _timestamps(table[c.timestamp])
  flag(~np.isfinite(ts), f"timestamp {c.timestamp!r} missing or unparsable")
  item_id = groups["item"][0][0]
  flag(table[item_id].to_pandas().isna().to_numpy(), f"item id {item_id!r} missing")
  frame = {}
  for g, fields in groups.items():
    for f, kind in fields:
      values = table[f].to_pandas()
      if kind == "numeric":
        values = pd.to_numeric(values, errors="coerce")
        flag(~np.isfinite(values.to_numpy(np.float64, na_value=np.nan)),
             f"numeric field {f!r} missing or not a number")
      frame[f"{g}.{f}"] = values
  lists = None
  if list_cols:
    lists = {b: _as_list_array(table[col], c.list_sep) for b, col in list_cols.items()}
    lengths = [pc.fill_null(pc.list_value_length(a), 0).to_numpy() for a in lists.values()]
    flag(np.any([x != lengths[0] for x in lengths], axis=0), "behaviour lists of unequal length")
  log = pd.DataFrame({"user": user.astype(str), "timestamp": ts, "label": label, **frame})
  log["split"] = np.int8(split_code if split_code is not None else 0)
  keep = pa.array(ok)
  if lists is not None:
    lists = {b: a.filter(keep) for b, a in lists.items()}
  return log[ok].reset_index(drop=True), lists


def read_log(data_config: ConfigDict, bad: logs.BadRows):
  """All files -> (log, ListBehaviours or None)."""
  c = data_config.tabular
  groups, behavior = _field_columns(c)
  _check_config(c, groups, behavior)
  split_paths = [c.train_path, c.valid_path, c.test_path]
  if c.path and any(split_paths):
    raise DataError("data.tabular: give either path (split by time) or train_path, valid_path "
                    "and test_path, not both")
  if c.path:
    files = [(os.path.expanduser(c.path), None)]
  elif all(split_paths):
    files = [(os.path.expanduser(p), i) for i, p in enumerate(split_paths)]
  else:
    raise DataError("data.tabular: set path (one file, split by time) or all of train_path, "
                    "valid_path and test_path")
  parts = []
  for path, code in files:
    table = read_table(path, c, bad)
    parts.append(_table_to_log(table, os.path.basename(path), code, c, groups, behavior, bad))
  bad.check()
  log = pd.concat([p[0] for p in parts], ignore_index=True)
  if c.path:
    log["split"] = logs.time_split(log["timestamp"].to_numpy(), c.valid_fraction,
                                   c.test_fraction)
  lists = None
  if c.behavior_source == "list":
    flat, offsets = {}, None
    for b in behavior:
      arrays = [p[1][b] for p in parts]
      lengths = np.concatenate([pc.fill_null(pc.list_value_length(a), 0).to_numpy()
                                for a in arrays]).astype(np.int64)
      offsets = np.concatenate([[0], np.cumsum(lengths)])
      values = pa.concat_arrays([pc.list_flatten(a).cast(pa.string()) for a in arrays])
      flat[b] = pd.Series(values.to_pandas(), dtype=object).str.strip()
    lists = logs.ListBehaviours(flat=flat, offsets=offsets)
  return log, groups, behavior, lists


def generate(data_config: ConfigDict):
  """Returns (schema, {split: columns}, stats) for the tabular settings in `data_config`."""
  c = data_config.tabular
  bad = logs.BadRows(data_config.max_bad_row_ratio)
  log, groups, behavior, lists = read_log(data_config, bad)
  spec = logs.LogSpec(item_fields=groups["item"], behavior_fields=behavior,
                      user_fields=groups["user"], context_fields=groups["context"],
                      max_seq_len=data_config.max_seq_len)
  mask = (log["label"].to_numpy() == 1) if c.behavior_rows == "clicks" else None
  source = f"tabular({c.path or c.train_path})"
  schema, splits, info = logs.build_examples(log, spec, source, behaviour_mask=mask, lists=lists)
  if c.path:
    split_text = (f"global time split: last {c.test_fraction:.0%} of rows by timestamp = test, "
                  f"the {c.valid_fraction:.0%} before = valid")
  else:
    split_text = "pre-split files (train_path, valid_path, test_path)"
  beh_text = (f"behaviours = the user's strictly earlier {c.behavior_rows} rows"
              if c.behavior_source == "log" else "behaviours = list columns of the input")
  item_id = f"item.{groups['item'][0][0]}"
  stats = {
      "source": "tabular",
      "protocol": (f"label = column {c.label!r}; {split_text}; {beh_text}, last "
                   f"{data_config.max_seq_len}; vocabularies from train only"),
      "num_rows": len(log),
      "num_users": int(log["user"].nunique()),
      "num_items": int(log[item_id].nunique()),
      "num_categories": (int(log[f"item.{c.category_field}"].nunique())
                         if f"item.{c.category_field}" in log else None),
      "vocab_sizes": info["vocab_sizes"],
      "numeric_standardisation": info["numeric"],
      "bad_rows": bad.summary(),
  }
  return schema, splits, stats


def prepare(data_config: ConfigDict, directory: str) -> None:
  """Reads the configured files and writes the prepared data (atomically) to `directory`."""
  schema, splits, stats = generate(data_config)
  logs.write_with_stats(directory, schema, splits, stats)

