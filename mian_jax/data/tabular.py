"""The user's own logs, one row per example (docs/data.md "Your own logs", configs/tabular.py),
read by `records.py` in the columns and fields `config.data.tabular` names."""

from __future__ import annotations

import functools
import os

import numpy as np
import pandas as pd
from ml_collections import ConfigDict

from mian_jax.data import interaction_log, vocab
from mian_jax.data import records as records_lib
from mian_jax.errors import DataError


def input_files(c: ConfigDict) -> list[tuple[str, int | None]]:
  """[(path, split code or None)]: `path` (split by time) or the three pre-split files."""
  split_paths = [c.train_path, c.valid_path, c.test_path]
  if c.path and any(split_paths):
    raise DataError("data.tabular: give either path (split by time) or train_path, valid_path "
                    "and test_path, not both")
  if c.path:
    return [(os.path.expanduser(c.path), None)]
  if all(split_paths):
    return [(os.path.expanduser(p), i) for i, p in enumerate(split_paths)]
  raise DataError("data.tabular: set path (one file, split by time) or all of train_path, "
                  "valid_path and test_path")


def raw_files(data_config: ConfigDict, download: bool = False) -> list[str]:
  """The files preparation reads, in order; DataError if one is missing (never downloaded)."""
  del download  # the user's own files
  paths = [path for path, _ in input_files(data_config.tabular)]
  if missing := [p for p in paths if not os.path.isfile(p)]:
    raise DataError(f"file not found: {missing[0]}")
  return paths


def behavior_mask(log: pd.DataFrame, behavior_rows: str) -> np.ndarray | None:
  """The rows that are behaviours: the clicks (label 1) for "clicks", None (all) for "all"."""
  return (log["label"].to_numpy() == 1) if behavior_rows == "clicks" else None


def predict_reader(data_config: ConfigDict) -> ConfigDict:
  """How predict reads records to score: the configured columns (`records.read_records`)."""
  return data_config.tabular


def encode_records(records: records_lib.Records, directory: str,
                   data_config: ConfigDict) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Records -> (a prepared split's columns but group_id; unseen or missing values per field)."""
  log = records.log
  raw = {f"{group}.{name}": log[f"{group}.{name}"].to_numpy(
             object if kind == "categorical" else np.float64)
         for group, fields in records.groups.items() for name, kind in fields}
  indices, hist_len = interaction_log.history_indices(
      log, data_config.max_seq_len, behavior_mask(log, data_config.tabular.behavior_rows),
      records.lists)
  return records_lib.encode(records, directory, raw, records.behavior, indices, hist_len)


def generate(data_config: ConfigDict):
  """(schema, {split: columns}, stats, write_vocabularies for `schema.write_prepared`)."""
  c = data_config.tabular
  bad = interaction_log.BadRows(data_config.max_bad_row_ratio)
  groups, behavior, hashed = records_lib.config_fields(c)
  # (log, lists, row source) of each file; its raw table is dropped at once (memory)
  parts = [records_lib.read_file(path, c, groups, behavior, bad, split_code=code)[1:]
           for path, code in input_files(c)]
  bad.check()
  log = pd.concat([p[0] for p in parts], ignore_index=True)
  if c.path:
    log["split"] = interaction_log.time_split(log["timestamp"].to_numpy(), c.valid_fraction,
                                              c.test_fraction)
  lists = (records_lib.list_behaviors([p[1] for p in parts], behavior)
           if c.behavior_source == "list" else None)
  describe_row = records_lib.row_describer([p[2] for p in parts])
  del parts  # each file's log is in `log` now
  schema, splits, info = interaction_log.build_examples(
      log, groups, behavior, data_config.max_seq_len, f"tabular({c.path or c.train_path})",
      lists=lists, describe_row=describe_row,
      behavior_mask=behavior_mask(log, c.behavior_rows), hash_buckets=hashed)
  split_text = (f"global time split: last {c.test_fraction:.0%} of rows by timestamp = test, "
                f"the {c.valid_fraction:.0%} before = valid" if c.path
                else "pre-split files (train_path, valid_path, test_path)")
  beh_text = (f"behaviours = the user's strictly earlier {c.behavior_rows} rows"
              if c.behavior_source == "log" else "behaviours = list columns of the input")
  item_id = f"item.{groups['item'][0][0]}"
  hash_text = "".join(f"; {field} hashed into {n} buckets (no vocabulary)"
                      for field, n in hashed.items())
  category = f"item.{c.category_field}"
  stats = {
      "source": "tabular",
      "protocol": (f"label = column {c.label!r}; {split_text}; {beh_text}, last "
                   f"{data_config.max_seq_len}; vocabularies from train only{hash_text}"),
      "num_rows": len(log), "num_users": int(log["user"].nunique()),
      "num_items": int(log[item_id].nunique()),
      "num_categories": int(log[category].nunique()) if category in log else None,
      "vocab_sizes": info["vocab_sizes"], "numeric_standardisation": info["numeric"],
      "bad_rows": bad.summary()}
  write_vocabularies = functools.partial(
      vocab.write_vocabularies, vocabularies=info["vocabularies"], encoders=info["encoders"],
      note=("tabular: field <group>.<name> is the input column <name>; a categorical raw value "
            "is the cell's text (Parquet values as str(value), list values stripped), looked up "
            "in its vocabulary or hashed (encoder hash), a numeric one is standardised"))
  return schema, splits, stats, write_vocabularies


def prepare(data_config: ConfigDict, directory: str) -> None:
  """Reads the configured files and writes the prepared data (atomically) to `directory`."""
  interaction_log.write_with_stats(directory, *generate(data_config))
