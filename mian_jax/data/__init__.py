"""Data sources. Each writes the prepared-data format of `schema.py`; training reads only that.

`config.data.source` picks the source (docs/data.md):
  "synthetic"  generated from `config.data.synthetic` (no download);
  "amazon"     Amazon Books / Electronics 2014 5-core (downloaded if missing);
  "amazon_like" generated shopping histories in the Amazon format, with the true probabilities;
  "movielens"  MovieLens-100K / 1M from their raw files;
  "tabular"    the user's own CSV / Parquet logs;
  "prepared"   an existing prepared directory given by `config.data.prepared_dir`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os

from absl import logging
from ml_collections import ConfigDict

from mian_jax.data import schema as schema_lib
from mian_jax.errors import ConfigError, DataError

# source name -> module whose `prepare(data_config, directory)` writes the prepared directory
# (imported on use, so a source's dependencies load only when it is used).
PREPARERS = {"synthetic": "mian_jax.data.synthetic", "amazon": "mian_jax.data.amazon",
             "amazon_like": "mian_jax.data.amazon_like",
             "movielens": "mian_jax.data.movielens", "tabular": "mian_jax.data.tabular"}


def cache_root() -> str:
  """Where prepared data sets are cached: $MIAN_JAX_CACHE, else ~/.cache/mian_jax."""
  default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                         "mian_jax")
  return os.environ.get("MIAN_JAX_CACHE", default)


def settings_key(data_config: ConfigDict) -> str:
  """A short hash of every data setting except where the result is stored."""
  settings = {k: v for k, v in data_config.to_dict().items() if k != "prepared_dir"}
  settings["format_version"] = schema_lib.FORMAT_VERSION  # a new format is prepared anew
  blob = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepared_dir(data_config: ConfigDict) -> str:
  if data_config.prepared_dir:
    return os.path.expanduser(data_config.prepared_dir)
  if data_config.source == "prepared":
    raise ConfigError("data.source='prepared' needs --config.data.prepared_dir=<directory>")
  return os.path.join(cache_root(), "prepared",
                      f"{data_config.source}-{settings_key(data_config)}")


def _clear_damaged(directory: str, in_cache: bool) -> None:
  """Makes room for preparing `directory`, which has no schema.json, so holds no prepared data.

  Nothing to do if it is absent or empty. A damaged cache entry (e.g. schema.json deleted) is
  removed and prepared again; a directory the user named is never deleted: DataError.
  """
  if not os.path.isdir(directory) or not os.listdir(directory):
    return
  if not in_cache:
    raise DataError(f"data.prepared_dir={directory} holds files but no schema.json, so it is no "
                    "(complete) prepared data set; delete it to prepare it there again, or "
                    "choose another directory")
  if os.path.isfile(os.path.join(directory, "schema.json")):  # prepared meanwhile by another
    return
  logging.warning("%s has no schema.json (a damaged cache entry); preparing it again", directory)
  schema_lib.discard(directory)


def ensure_prepared(data_config: ConfigDict) -> tuple[str, schema_lib.Schema]:
  """Returns (directory, schema) of the prepared data, preparing it first if needed.

  Raises:
    DataError / ConfigError with a one-line reason when the data is missing or does not
    match the config.
  """
  directory = prepared_dir(data_config)
  schema_path = os.path.join(directory, "schema.json")
  if not os.path.isfile(schema_path):
    if data_config.source == "prepared":
      raise DataError(f"no prepared data at {directory} (missing schema.json)")
    if data_config.source not in PREPARERS:
      raise ConfigError(f"unknown data.source {data_config.source!r}; "
                        f"expected one of {sorted(PREPARERS) + ['prepared']}")
    _clear_damaged(directory, in_cache=not data_config.prepared_dir)
    logging.info("Preparing %s data into %s", data_config.source, directory)
    importlib.import_module(PREPARERS[data_config.source]).prepare(data_config, directory)
  schema = schema_lib.read_schema(directory)
  if schema.features.max_seq_len != data_config.max_seq_len:
    raise DataError(f"{directory}: prepared with max_seq_len={schema.features.max_seq_len} "
                    f"but the config says data.max_seq_len={data_config.max_seq_len}")
  return directory, schema
